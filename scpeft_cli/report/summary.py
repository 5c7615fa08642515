"""The summary table: one row per configuration (seeds averaged, failures counted), then the baseline rows."""

from __future__ import annotations

from typing import Any

import pandas as pd

from scpeft_cli.report.baselines import BASELINE, baseline_rows
from scpeft_cli.report.configuration import configuration_namer
from scpeft_cli.report.runs import Run
from scpeft_cli.report.stats import mean_std, numeric


def summarize(runs: list[Run]) -> pd.DataFrame:
    """Columns: configuration, backbone, peft, n_runs, n_failed, errors, then M_mean, M_std per numeric metric."""
    groups: dict[str, list[Run]] = {}
    name = configuration_namer(runs)
    for run in runs:
        groups.setdefault(name(run), []).append(run)
    rows = [_strategy_row(name, group) for name, group in groups.items()]
    return pd.DataFrame(rows + baseline_rows(runs))


def _strategy_row(name: str, group: list[Run]) -> dict[str, Any]:
    finished = [run.metrics for run in group if run.finished]
    failed = [run for run in group if not run.finished]
    first = next((run for run in group if run.finished), group[0])
    return {
        "configuration": name,
        "backbone": first.backbone,  # option names, as in `backbone=scgpt_small peft=head_only`
        "peft": first.strategy,
        "n_runs": len(finished),
        "n_failed": len(failed),
        "errors": "; ".join(dict.fromkeys(run.error for run in failed)),
        **mean_std(numeric(metrics) for metrics in finished),
    }


def metric_names(summary: pd.DataFrame) -> list[str]:
    """Metrics that at least one row has a value for."""
    return [column[: -len("_mean")] for column in summary.columns if column.endswith("_mean") and summary[column].notna().any()]


def strategies(summary: pd.DataFrame) -> pd.DataFrame:
    """The rows that gates apply to: the trained configurations, not the baselines."""
    return summary[summary["peft"] != BASELINE]
