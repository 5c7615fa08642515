"""A run's configuration name: the overrides that tell it apart from the other runs being reported.

Seeds are averaged and Hydra's own settings do not define a configuration; overrides every run shares
(e.g. `backbone=scgpt_small` given to the whole sweep) are left out so the names stay short. Runs without
overrides of their own are named by their backbone and peft options (`backbone=scgpt_small peft=full`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from scpeft_cli.report.runs import Run


def configuration_namer(runs: Sequence[Run]) -> Callable[[Run], str]:
    """name(run) for the runs of one report."""
    kept = [frozenset(_kept(run)) for run in runs]
    shared = frozenset.intersection(*kept) if kept else frozenset()

    def name(run: Run) -> str:
        own = sorted(_kept(run))
        distinguishing = [override for override in own if override not in shared] or own
        if distinguishing:
            return " ".join(distinguishing)
        if run.strategy:  # the option names (`peft=head_only`), never a class name
            return f"backbone={run.backbone} peft={run.strategy}" if run.backbone else f"peft={run.strategy}"
        return "default"

    return name


def _kept(run: Run) -> list[str]:
    return [override for override in run.overrides if not _ignored(override)]


def _ignored(override: str) -> bool:
    """`seed=1`, `+seed=1`, `hydra.job.chdir=true`, `hydra/launcher=joblib` do not define a configuration."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key == "seed" or re.split(r"[./]", key)[0] == "hydra"
