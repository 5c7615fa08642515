"""Write the report files: summary.csv/.md, per_class_f1.csv/.md and comparison.png."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from scpeft_cli import artifacts
from scpeft_cli.report.markdown import per_class_markdown, summary_markdown
from scpeft_cli.report.per_class import per_class_f1
from scpeft_cli.report.plot import plot_comparison
from scpeft_cli.report.runs import Run


def write_report(out: Path, summary: pd.DataFrame, runs: list[Run], *, metric: str) -> list[Path]:
    """The paths written; per-class tables need per_class.csv files and the chart needs a value of `metric`."""
    written = [out / "summary.csv", out / "summary.md"]
    artifacts.write_csv(written[0], summary)
    artifacts.write_text(written[1], summary_markdown(summary))
    per_class = per_class_f1(runs)
    if per_class is not None:
        written += [out / "per_class_f1.csv", out / "per_class_f1.md"]
        artifacts.write_csv(written[-2], per_class)
        artifacts.write_text(written[-1], per_class_markdown(per_class))
    if f"{metric}_mean" in summary and summary[f"{metric}_mean"].notna().any():
        written.append(out / "comparison.png")
        plot_comparison(written[-1], summary, metric=metric)
    return written
