"""A run's configuration name: its overrides minus the seed (seeds are averaged) and Hydra's own settings."""

from __future__ import annotations

import re

from scpeft_cli.report.runs import Run


def configuration(run: Run) -> str:
    kept = sorted(override for override in run.overrides if not _ignored(override))
    if kept:
        return " ".join(kept)
    if run.finished:
        return f"backbone={run.metrics.get('backbone')} peft={run.metrics.get('peft')}"
    return "default"


def _ignored(override: str) -> bool:
    """`seed=1`, `+seed=1`, `hydra.job.chdir=true`, `hydra/launcher=joblib` do not define a configuration."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key == "seed" or re.split(r"[./]", key)[0] == "hydra"
