"""summary.md and per_class_f1.md: tables a person reads in a pull request, a wiki or a notebook."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from scpeft_cli.report.formatting import main_metrics, mean_std_text


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """First column left-aligned (names), the others right-aligned (numbers)."""
    lines = [_line(header), "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(lines + [_line(row) for row in rows]) + "\n"


def _line(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(cell).replace("|", "\\|").replace("\n", " ") for cell in cells) + " |"


def summary_markdown(summary: pd.DataFrame) -> str:
    metrics = main_metrics(summary)
    rows = [
        [row["configuration"], row["n_runs"], row["n_failed"], *(mean_std_text(row, metric, no_std="") for metric in metrics)]
        for row in summary.to_dict("records")
    ]
    text = (
        "# Summary\n\nmean ± sample std over seeds (a single run shows no std).\n\n"
        + markdown_table(["configuration", "n runs", "n failed", *metrics], rows)
    )
    failed = summary[summary["n_failed"] > 0]
    if len(failed):
        text += "\n## Failed jobs\n\n" + "".join(f"- `{row.configuration}`: {row.errors}\n" for row in failed.itertuples())
    return text


def per_class_markdown(table: pd.DataFrame) -> str:
    """F1 per cell type (3 decimals), rarest types first."""
    configurations = list(table.columns[2:])
    rows = [
        [row["cell_type"], f"{row['support']:,.0f}", *("" if pd.isna(row[c]) else f"{row[c]:.3f}" for c in configurations)]
        for row in table.to_dict("records")
    ]
    return "# Test F1 per cell type\n\nmean over seeds; rarest types first.\n\n" + markdown_table(
        ["cell_type", "support", *configurations], rows
    )
