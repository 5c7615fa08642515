"""Per-cell-type F1 per configuration, rare types first: where strategies differ most (the paper's rare-cell tables)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from scpeft_cli.report.configuration import configuration_namer
from scpeft_cli.report.runs import Run

COLUMNS = {"cell_type", "f1", "support"}


def per_class_f1(runs: list[Run]) -> pd.DataFrame | None:
    """cell_type, support (from the first run that has the type), then mean F1 over seeds per configuration."""
    frames = []
    name = configuration_namer(runs)
    for run in runs:
        table = _read(run.path / "per_class.csv") if run.finished else None
        if table is not None:
            frames.append(table.assign(configuration=name(run)))
    if not frames:
        return None
    data = pd.concat(frames, ignore_index=True)
    f1 = data.pivot_table(index="cell_type", columns="configuration", values="f1", aggfunc="mean", sort=False)
    table = f1.reindex(columns=list(dict.fromkeys(data["configuration"])))
    table.insert(0, "support", data.groupby("cell_type", sort=False)["support"].first())
    table.columns.name = None
    return table.reset_index().sort_values(["support", "cell_type"], kind="stable", ignore_index=True)


def _read(path: Path) -> pd.DataFrame | None:
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError):
        return None
    return table if COLUMNS <= set(table.columns) else None
