"""The CI gates: --require thresholds, failed jobs and --baseline regressions; each failure names its row."""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from scpeft_cli.errors import UserError
from scpeft_cli.report.baselines import BASELINE
from scpeft_cli.report.summary import metric_names, strategies

OPERATORS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq}
EXPRESSION = re.compile(r"^\s*([A-Za-z_]\w*)\s*(>=|<=|==|>|<)\s*(\S+)\s*$")


@dataclass(frozen=True)
class Requirement:
    metric: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"


@dataclass(frozen=True)
class Failure:
    configuration: str
    check: str
    value: str
    requirement: str


def parse_requirement(text: str) -> Requirement:
    match = EXPRESSION.match(text)
    try:
        threshold = float(match.group(3)) if match else math.nan
    except ValueError:
        threshold = math.nan
    if not math.isfinite(threshold):
        raise UserError(f"--require {text!r}: expected METRIC OP NUMBER with OP one of >=, <=, >, <, == (e.g. 'macro_f1>=0.8')")
    return Requirement(match.group(1), match.group(2), threshold)


def check_known(summary: pd.DataFrame, metric: str, *, option: str) -> None:
    """A misspelt metric must not pass a gate silently; when every run failed there is nothing to check against."""
    known = metric_names(summary)
    if known and metric not in known:
        raise UserError(f"{option}: no configuration has the metric '{metric}' (known: {', '.join(known)})")


def failed_jobs(summary: pd.DataFrame) -> list[Failure]:
    """Under a gate, a configuration whose jobs died fails: its mean would otherwise hide the dead runs."""
    rows = strategies(summary)
    return [
        Failure(row.configuration, "jobs", f"{row.n_failed} failed: {row.errors}", "every job finishes")
        for row in rows[rows["n_failed"] > 0].itertuples()
    ]


def unmet_requirements(summary: pd.DataFrame, requirements: list[Requirement]) -> list[Failure]:
    failures = []
    for row in strategies(summary).to_dict("records"):
        for requirement in requirements:
            value = row.get(f"{requirement.metric}_mean", math.nan)
            if pd.isna(value) or not OPERATORS[requirement.op](value, requirement.threshold):
                failures.append(Failure(row["configuration"], requirement.metric, _number(value), str(requirement)))
    return failures


def read_baseline(path: Path, *, metric: str) -> pd.DataFrame:
    """An earlier summary.csv; read before this report's files are written, which may replace it."""
    try:
        old = pd.read_csv(path, float_precision="round_trip")  # an unchanged mean must compare equal
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UserError(f"--baseline {path}: cannot read it ({reason})") from None
    missing = sorted({"configuration", f"{metric}_mean"} - set(old.columns))
    if missing:
        raise UserError(f"--baseline {path}: not a summary.csv with --metric {metric} (no column {', '.join(missing)})")
    return old


def regressions(summary: pd.DataFrame, old: pd.DataFrame, *, metric: str, max_drop: float) -> tuple[list[Failure], list[str]]:
    """Failures where the mean fell by more than `max_drop`, and notes on configurations found on one side only."""
    column = f"{metric}_mean"
    new_rows = strategies(summary)
    old_rows = old[old["peft"] != BASELINE] if "peft" in old.columns else old
    new = dict(zip(new_rows["configuration"], new_rows[column], strict=True))
    before = dict(zip(old_rows["configuration"], old_rows[column], strict=True))
    notes = [f"{name}: not in the baseline, not compared" for name in new if name not in before]
    notes += [f"{name}: in the baseline only, not compared" for name in before if name not in new]
    failures = [
        Failure(name, metric, f"{_number(value)} (baseline {_number(before[name])})", f"drop <= {max_drop:g}")
        for name, value in new.items()
        if name in before and not pd.isna(before[name]) and (pd.isna(value) or value < before[name] - max_drop)
    ]
    return failures, notes


def _number(value: float) -> str:
    return "no finished run" if pd.isna(value) else f"{value:.6g}"
