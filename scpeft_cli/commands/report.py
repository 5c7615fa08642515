"""`scpeft report DIR...`: compare run dirs in tables and a chart, and gate CI on thresholds or a baseline."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.markup import escape

from scpeft_cli.console import console, info, warn
from scpeft_cli.errors import UserError
from scpeft_cli.report.formatting import default_metric
from scpeft_cli.report.gates import (
    Failure,
    check_known,
    failed_jobs,
    parse_requirement,
    read_baseline,
    regressions,
    unmet_requirements,
)
from scpeft_cli.report.outputs import write_report
from scpeft_cli.report.runs import find_run_dirs, load_run
from scpeft_cli.report.summary import strategies, summarize
from scpeft_cli.report.table import print_table, summary_table

DESCRIPTION = """\
Aggregate run dirs written by `scpeft train` (single runs and -m sweeps) into one comparison:
seeds are averaged per configuration (its overrides without seed=), failed and crashed jobs are
counted, and the baselines recorded in metrics.json get their own rows. Writes summary.csv/.md,
per_class_f1.csv/.md (rarest cell types first) and comparison.png, and prints the summary.
With --require or --baseline it is a CI gate; a configuration with failed jobs then fails too."""

EPILOG = """\
examples:
  scpeft report outputs/multirun/2024-05-01_12-00-00
  scpeft report outputs/multirun/A outputs/multirun/B --out reports/ab --metric balanced_accuracy
  scpeft report outputs/multirun/nightly --require "macro_f1>=0.8" --require "accuracy >= 0.85"
  scpeft report outputs/multirun/nightly --baseline reports/last/summary.csv --max-drop 0.02

exit codes:
  0  report written; every gate passed (without a gate, failed jobs are only reported)
  1  a gate failed: each failing configuration is printed
  2  usage error: no run dirs found, unreadable baseline, bad expression or unknown metric"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scpeft report", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "dirs", nargs="+", type=Path, metavar="DIR", help="a run dir, or a folder searched recursively for run dirs"
    )
    parser.add_argument("--out", type=Path, help="folder for the report files (default: the first DIR)")
    parser.add_argument(
        "--require", action="append", default=[], metavar="EXPR",
        help="'METRIC OP NUMBER' (OP: >= <= > < ==) that every configuration's mean must meet; repeatable",
    )
    parser.add_argument(
        "--baseline", type=Path, metavar="SUMMARY_CSV", help="an earlier summary.csv to check for regressions of --metric"
    )
    parser.add_argument(
        "--max-drop", type=float, metavar="D", help="largest allowed fall of the --metric mean below --baseline (default 0)"
    )
    parser.add_argument(
        "--metric", default=None, help="metric of the chart and the --baseline check (default: macro_f1, or the task's first score)"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = report(args)
    except UserError as err:
        print(f"scpeft report: error: {err}", file=sys.stderr)
        code = err.exit_code
    sys.exit(code)


def report(args: argparse.Namespace) -> int:
    """Returns the exit code; usage errors are raised as UserError before any file is written."""
    if args.max_drop is not None and (args.baseline is None or args.max_drop < 0):
        raise UserError("--max-drop needs --baseline and a value >= 0")
    requirements = [parse_requirement(text) for text in args.require]
    runs = [load_run(path) for path in find_run_dirs(args.dirs)]
    if not runs:
        raise UserError(f"no run dirs (with metrics.json, failed.json or .hydra/) under {', '.join(map(str, args.dirs))}")
    summary = summarize(runs)
    args.metric = args.metric or default_metric(summary) or "macro_f1"
    baseline = read_baseline(args.baseline, metric=args.metric) if args.baseline else None
    for requirement in requirements:
        check_known(strategies(summary), requirement.metric, option="--require")
    check_known(summary, args.metric, option="--metric")

    out = args.out or args.dirs[0]
    try:
        written = write_report(out, summary, runs, metric=args.metric)
    except OSError as err:
        raise UserError(f"cannot write the report to {out}: {err.strerror or err}") from None
    print_table(summary_table(summary))
    for row in summary[summary["n_failed"] > 0].itertuples():
        warn(escape(f"{row.configuration}: {row.n_failed} failed job(s): {row.errors}"))
    for path in written:
        info(escape(f"wrote {path}"))

    gated = bool(requirements) or baseline is not None
    failures = (failed_jobs(summary) if gated else []) + unmet_requirements(summary, requirements)
    if baseline is not None:
        regressed, notes = regressions(summary, baseline, metric=args.metric, max_drop=args.max_drop or 0.0)
        for note in notes:
            info(escape(note))
        failures += regressed
    return _verdict(failures, gated=gated)


def _verdict(failures: list[Failure], *, gated: bool) -> int:
    for failure in failures:
        console.print(
            f"[bold red]FAIL[/] {escape(failure.configuration)}: {escape(failure.check)} = {escape(failure.value)}"
            f" (required: {escape(failure.requirement)})"
        )
    if failures:
        console.print(f"[bold red]gate failed[/] for {len({f.configuration for f in failures})} configuration(s)")
        return 1
    if gated:
        console.print("[bold green]all gates passed[/]")
    return 0
