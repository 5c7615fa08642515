"""How numbers read in summary.md and on the console: "mean ± std" with a precision that suits each metric."""

from __future__ import annotations

from typing import Any

import pandas as pd

from scpeft_cli.report.summary import metric_names

MAIN_METRICS = (
    "accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "trainable_params", "trainable_fraction",
    "adapter_bytes", "train_seconds", "cells_per_second", "peak_memory_mb",
)
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
    """The columns a person compares first, among those that exist."""
    present = set(metric_names(summary))
    return [metric for metric in MAIN_METRICS if metric in present]


def mean_std_text(row: dict[str, Any], metric: str, *, no_std: str) -> str:
    """'0.812 ± 0.010'; a single run has no std, shown as `no_std` after the mean; a missing metric is ''."""
    mean, std = row.get(f"{metric}_mean"), row.get(f"{metric}_std")
    if mean is None or pd.isna(mean):
        return ""
    spec = FORMATS.get(metric, SCORE)
    if std is None or pd.isna(std):
        return f"{mean:{spec}} {no_std}".rstrip()
    return f"{mean:{spec}} ± {std:{spec}}"
