"""Shared helpers of the benchmark scripts: result tables (console, CSV, markdown) and machine facts.

Not a benchmark itself; the scripts import it as `_common` (they run as `python benchmarks/NAME.py`).
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
from collections.abc import Sequence
from pathlib import Path

# SCPEFT_BENCH_RESULTS redirects the tables (the benchmark smoke test writes them to a temporary folder)
RESULTS_DIR = Path(os.environ.get("SCPEFT_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def machine() -> dict[str, str]:
    """What the figures were measured on (written under every markdown table)."""
    import torch

    try:
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "n/a"
    device = "cpu"
    if torch.cuda.is_available():
        device = f"cuda ({torch.cuda.get_device_name(0)})"
    return {
        "date": _dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpus": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_end": load,
        "cuda": device,
    }


def fmt(value, digits: int = 3) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:  # nan
            return "n/a"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def print_table(title: str, rows: Sequence[dict], columns: Sequence[str]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain fallback
        print(f"\n{title}\n" + markdown_table(rows, columns))
        return
    table = Table(title=title)
    for column in columns:
        table.add_column(
            column,
            justify="left"
            if column in {"strategy", "size", "implementation", "mode", "method", "setting"}
            else "right",
        )
    for row in rows:
        table.add_row(*(fmt(row.get(c)) for c in columns))
    Console(width=max(120, sum(len(c) + 3 for c in columns))).print(table)


def write_results(
    stem: str, rows: Sequence[dict], columns: Sequence[str], *, title: str, notes: Sequence[str] = ()
) -> tuple[Path, Path]:
    """benchmarks/results/{stem}.csv (every key of the rows) and {stem}.md (the chosen columns + notes)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    all_keys: list[str] = []
    for row in rows:
        all_keys += [k for k in row if k not in all_keys]
    csv_path = RESULTS_DIR / f"{stem}.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=all_keys)
        writer.writeheader()
        writer.writerows(rows)
    facts = machine()
    md = [f"## {title}", "", markdown_table(rows, columns), ""]
    md += [f"- {note}" for note in notes]
    md.append(
        f"- measured {facts['date']} on {facts['cpus']} CPUs ({facts['torch_threads']} torch threads), torch {facts['torch']}, "
        f"Python {facts['python']}, {facts['cuda']}; load average at the end {facts['load_average_at_end']}"
    )
    md_path = RESULTS_DIR / f"{stem}.md"
    md_path.write_text("\n".join(md) + "\n")
    print_table(title, rows, columns)
    print(f"wrote {csv_path} and {md_path}")
    return csv_path, md_path
