"""How numbers read in summary.md and on the console: "mean ± std" with a precision that suits each metric."""

from __future__ import annotations

from typing import Any

import pandas as pd

from scpeft_cli.report.summary import metric_names

SCORES = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1")  # annotation's
EFFICIENCY = ("trainable_params", "trainable_fraction", "adapter_bytes", "train_seconds", "cells_per_second", "peak_memory_mb")
MAIN_METRICS = (*SCORES, *EFFICIENCY)
FORMATS = {
    "trainable_params": ",.0f",
    "adapter_bytes": ",.0f",
    "trainable_fraction": ".2%",
    "train_seconds": ",.1f",
    "cells_per_second": ",.1f",
    "peak_memory_mb": ",.1f",
}
SCORE = ".3f"


def main_metrics(summary: pd.DataFrame) -> list[str]:
    """The columns a person compares first, among those that exist: the task's scores (annotation's, or
    a task's first four metrics), then the efficiency columns."""
    names = metric_names(summary)
    scores = [metric for metric in SCORES if metric in names]
    scores = scores or [metric for metric in names if metric not in EFFICIENCY][:4]
    return [*scores, *(metric for metric in EFFICIENCY if metric in names)]


def default_metric(summary: pd.DataFrame) -> str | None:
    """The chart's metric when --metric is not given: macro F1 where the runs have it, else the first score."""
    scores = main_metrics(summary)
    return "macro_f1" if "macro_f1" in scores else (scores[0] if scores else None)


def mean_std_text(row: dict[str, Any], metric: str, *, no_std: str) -> str:
    """'0.812 ± 0.010'; a single run has no std, shown as `no_std` after the mean; a missing metric is ''."""
    mean, std = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
    if mean is None or pd.isna(mean):
        return ""
    spec = FORMATS.get(metric, SCORE)
    if std is None or pd.isna(std):
        return f"{mean:{spec}} {no_std}".rstrip()
    return f"{mean:{spec}} ± {std:{spec}}"
