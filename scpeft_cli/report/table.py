"""The summary as a rich table for the console: the same columns as summary.md."""

from __future__ import annotations

import pandas as pd
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from scpeft_cli.console import console
from scpeft_cli.report.baselines import BASELINE
from scpeft_cli.report.formatting import main_metrics, mean_std_text


def summary_table(summary: pd.DataFrame) -> Table:
    metrics = main_metrics(summary)
    table = Table(title="test metrics per configuration (mean ± std over seeds)")
    table.add_column("configuration", overflow="fold")
    for column in ("runs", "failed", *metrics):
        table.add_column(column, justify="right")
    previous = None
    for row in summary.to_dict("records"):
        if previous is not None and previous != BASELINE and row["peft"] == BASELINE:
            table.add_section()
        previous = row["peft"]
        table.add_row(
            Text(row["configuration"]),  # Text: names like peft.parts=[a,b] are not rich markup
            str(row["n_runs"]),
            Text(str(row["n_failed"]), style="bold red" if row["n_failed"] else ""),
            *(mean_std_text(row, metric, no_std="± –") for metric in metrics),
        )
    return table


def print_table(table: Table) -> None:
    """A terminal gets the window's width; a CI log (no terminal) the table's natural width, so nothing is cut."""
    if console.is_terminal:
        console.print(table)
        return
    natural = Measurement.get(console, console.options.update_width(10_000), table).maximum
    Console(file=console.file, width=natural, highlight=False).print(table)  # the shared console caps the width
