"""Baseline rows: a baseline is computed the same way in every run of a seed, so each seed counts once."""

from __future__ import annotations

from typing import Any

from scpeft_cli.console import warn
from scpeft_cli.report.runs import Run
from scpeft_cli.report.stats import mean_std, numeric

BASELINE = "baseline"  # the `peft` value that marks a baseline row
BACKBONE_DEPENDENT = frozenset({"zero_shot_knn"})  # computed on the backbone's embeddings


def baseline_rows(runs: list[Run]) -> list[dict[str, Any]]:
    per_seed: dict[str, dict[Any, dict[str, float]]] = {}
    backbones: dict[str, str] = {}
    inconsistent: set[str] = set()
    for run in runs:
        if not run.finished:
            continue
        backbone = str(run.metrics.get("backbone", ""))
        seed = run.metrics.get("seed", str(run.path))
        for name, metrics in (run.metrics.get("baselines") or {}).items():
            if not isinstance(metrics, dict):
                continue
            label = f"baseline: {name} ({backbone})" if name in BACKBONE_DEPENDENT else f"baseline: {name}"
            backbones.setdefault(label, backbone if name in BACKBONE_DEPENDENT else "")
            values = per_seed.setdefault(label, {}).setdefault(seed, numeric(metrics))
            if values != numeric(metrics):
                inconsistent.add(label)
    for label in sorted(inconsistent):
        warn(f"{label} differs between runs of the same seed (different data or split?); the first run's values are used")
    return [
        {
            "configuration": label,
            "backbone": backbones[label],
            "peft": BASELINE,
            "n_runs": len(seeds),
            "n_failed": 0,
            "errors": "",
            **mean_std(seeds.values()),
        }
        for label, seeds in per_seed.items()
    ]
