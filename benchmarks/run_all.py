"""Run the three benchmarks one after another (never in parallel: they would time each other).

    python benchmarks/run_all.py               # the full suite (~35 min on 2 CPU cores)
    python benchmarks/run_all.py --quick       # small sizes and 2,000 cells: a ~2 min smoke run
    python benchmarks/run_all.py --only layers tokenize
    python benchmarks/run_all.py --only activations   # the saved-for-backward diagnostic (~1 min)

Results land in benchmarks/results/ (each script writes its CSV + markdown table); afterwards this
prints the target checks of benchmarks/README.md from those CSVs. `--quick` writes *_quick files
so the full results are not overwritten by a smoke run.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BENCHES = ("strategies", "layers", "tokenize", "tokenize_geneformer")
OPTIONAL = ("activations",)  # diagnostic: run with --only ... activations


def commands(quick: bool, device: str) -> dict[str, list[str]]:
    py = sys.executable
    strategies = [py, str(HERE / "bench_strategies.py"), "--device", device]
    if quick:
        strategies += ["--sizes", "small", "--cycles", "5", "--memory-rounds", "1", "--suffix", "_quick"]
    layers = [py, str(HERE / "bench_layers.py")] + (["--sizes", "small", "--suffix", "_quick"] if quick else [])
    tokenize = [py, str(HERE / "bench_tokenize.py")] + (["--cells", "2000", "--suffix", "_quick"] if quick else [])
    tokenize_geneformer = [py, str(HERE / "bench_tokenize_geneformer.py")] + (
        ["--cells", "2000", "--suffix", "_quick"] if quick else []
    )
    activations = [py, str(HERE / "bench_saved_activations.py")] + (
        ["--size", "small", "--suffix", "_quick"] if quick else []
    )
    return {
        "strategies": strategies, "layers": layers, "tokenize": tokenize, "tokenize_geneformer": tokenize_geneformer,
        "activations": activations,
    }


def _read(name: str) -> list[dict]:
    path = RESULTS / name
    if not path.is_file():
        return []
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _f(row: dict, key: str) -> float:
    try:
        return float(row.get(key, "nan"))
    except ValueError:
        return float("nan")


def check_targets() -> list[str]:
    """The README's targets, from the CSVs in results/ (whatever the last full run wrote)."""
    lines = []
    whole = {r["strategy"]: r for r in _read("strategies_whole.csv") if r.get("step_s")}
    if whole:
        for name in ("encoder_prompt", "token_prompt"):
            if name in whole:
                for column, kind in (("live_memory_vs_full", "live-tensor peak"), ("memory_vs_full", "peak RSS growth")):
                    ratio = _f(whole[name], column)
                    lines.append(
                        f"{'MET    ' if ratio <= 0.5 else 'NOT MET'} {name} {kind} (whole) {ratio:.2f} x full (target <= 0.5)"
                    )
        for size, rows in (
            ("whole", whole),
            ("small", {r["strategy"]: r for r in _read("strategies_small.csv") if r.get("step_s")}),
        ):
            # gradient-checkpointed rows (*_ckptN) spend time for memory on purpose: not part of this target
            peft = {n: r for n, r in rows.items() if n != "full" and "_ckpt" not in n}
            slower = {n: _f(r, "step_time_vs_full") for n, r in peft.items() if _f(r, "step_time_vs_full") > 1}
            if peft:
                worst = max((_f(r, "step_time_vs_full"), n) for n, r in peft.items())
                spread = peft[worst[1]].get("step_vs_full_iqr")
                lines.append(
                    f"{'MET    ' if not slower else 'NOT MET'} every PEFT step time <= full ({size}): slowest {worst[1]} {worst[0]:.2f} x full"
                    + (f" (quartiles of its per-cycle ratios {spread})" if spread else "")
                    + (f"; above 1: {', '.join(f'{n} {v:.2f}' for n, v in slower.items())}" if slower else "")
                )
    tokenize = [r for r in _read("tokenize.csv") if r["setting"].startswith("max_len")]
    if tokenize:
        worst = min(_f(r, "speedup") for r in tokenize)
        lines.append(
            f"{'MET    ' if worst >= 10 else 'NOT MET'} tokenisation speedup {worst:.1f}x (lowest setting; target >= 10x)"
        )
    geneformer = _read("tokenize_geneformer.csv")
    if geneformer:
        for column, reference in (("speedup_vs_h5ad", "upstream's AnnData path"), ("speedup", "upstream's loom path")):
            worst = min(_f(r, column) for r in geneformer)
            lines.append(
                f"{'MET    ' if worst >= 10 else 'NOT MET'} Geneformer tokenisation {worst:.1f}x {reference} "
                "(lowest setting; target >= 10x)"
            )
    layers = _read("layers.csv")
    if layers:
        ok = all(r.get("outputs_identical") == "True" for r in layers)
        worst = max(_f(r, "ours_vs_reference") for r in layers)
        lines.append(
            f"{'MET    ' if ok and worst <= 1 else 'NOT MET'} layer stack vs nn.TransformerEncoder: identical outputs {ok}, "
            f"slowest ratio {worst:.2f} (target <= 1)"
        )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=BENCHES + OPTIONAL, default=list(BENCHES))
    parser.add_argument("--quick", action="store_true", help="small sizes only: a smoke run")
    parser.add_argument("--device", default="cpu", help="device of bench_strategies (cpu | cuda)")
    args = parser.parse_args(argv)
    failed = []
    for name, command in commands(args.quick, args.device).items():
        if name not in args.only:
            continue
        print(f"\n=== {name}: {' '.join(Path(c).name if c.endswith('.py') else c for c in command[1:])}", flush=True)
        started = time.perf_counter()
        code = subprocess.call(command)
        print(f"=== {name}: exit {code}, {time.perf_counter() - started:.0f} s", flush=True)
        if code:
            failed.append(name)
    if not args.quick:
        print("\nTargets (from benchmarks/results/*.csv):")
        for line in check_targets():
            print("  " + line)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
