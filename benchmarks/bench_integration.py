"""Batch integration on the simulated-batch oracle: a sweep of strategies x seeds through `scpeft train -m`,
then one row per strategy (mean over seeds) and per baseline (PCA, Harmony, zero-shot), with time per epoch.

    python benchmarks/bench_integration.py                       # scgpt_small, full/encoder_prompt/token_prompt, seeds 0,1
    python benchmarks/bench_integration.py --epochs 2 --seeds 0  # a quick look

The sweep is the acceptance command of the integration task, run on the simulated batches of
`scpeft_cli/data/simulated.py` written as an .h5ad (the cells of `data=pbmc68k_batches`): all 765 genes of
pbmc68k_reduced, so the 1200-HVG default keeps every gene (766 tokens per cell).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import write_results

from scpeft_cli.data.simulated import write_simulated_h5ad

SCORES = ("avg_bio", "avg_batch", "overall", "nmi", "ari", "asw_label", "asw_batch", "graph_connectivity", "pcr_batch")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="scgpt_small")
    parser.add_argument("--strategies", default="full,encoder_prompt,token_prompt")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--out", default=None, help="sweep dir (default: a temporary one)")
    parser.add_argument("--override", nargs="*", default=[], help="more overrides, e.g. task.objectives.dsbn=false")
    parser.add_argument("--suffix", default="")
    args = parser.parse_args(argv)

    work = Path(args.out or tempfile.mkdtemp(prefix="scpeft-integration-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "simulated.h5ad"
    write_simulated_h5ad(data)
    sweep = work / "sweep"
    subprocess.run(
        [sys.executable, "-m", "scpeft_cli", "train", "-m", "task=integration", f"backbone={args.backbone}",
         "data=h5ad", f"data.path={data}", "data.batch_key=batch", "data.label_key=bulk_labels",
         f"peft={args.strategies}", f"seed={args.seeds}", f"trainer.max_epochs={args.epochs}", "trainer.patience=null",
         "evaluation.umap=false", f"hydra.sweep.dir={sweep}", *args.override],
        check=True,
    )  # fmt: skip
    runs = [json.loads(path.read_text()) for path in sorted(sweep.glob("*/metrics.json"))]
    rows = []
    for strategy in args.strategies.split(","):
        group = [m for m in runs if m["peft"] == strategy]
        rows.append({
            "embedding": strategy, "runs": len(group),
            **{key: float(np.mean([m[key] for m in group])) for key in SCORES},
            "trainable_params": group[0]["trainable_params"],
            "seconds_per_epoch": float(np.mean([m["train_seconds"] / m["epochs_run"] for m in group])),
            "peak_memory_mb": float(np.mean([m["peak_memory_mb"] for m in group])),
        })  # fmt: skip
    for name in runs[0]["baselines"]:
        rows.append({"embedding": f"baseline: {name}", "runs": len(runs),
                     **{key: float(np.mean([m["baselines"][name][key] for m in runs])) for key in SCORES if key in runs[0]["baselines"][name]}})  # fmt: skip
    write_results(
        f"integration_simulated{args.suffix}", rows,
        ["embedding", "runs", "avg_bio", "avg_batch", "overall", "asw_batch", "graph_connectivity", "pcr_batch",
         "trainable_params", "seconds_per_epoch", "peak_memory_mb"],
        title=f"Batch integration on simulated batches ({args.backbone}, {args.epochs} epochs, seeds {args.seeds}"
        + (f", {' '.join(args.override)}" if args.override else "") + ")",
        notes=[
            f"backbone {args.backbone}: pretrained {runs[0]['pretrained']} (no checkpoint can be downloaded here, so the "
            "strategies adapt a RANDOM backbone; zero-shot is that random backbone)",
            "scpeft_cli/data/simulated.py: pbmc68k_reduced, 3 batches, gene-wise log-normal factors (sd 0.8) and a depth factor "
            "(sd 0.3) per batch, Poisson-redrawn counts; scores on all 700 cells, metrics as scib 1.1.7",
            f"sweep dir: {sweep}",
        ],
    )  # fmt: skip


if __name__ == "__main__":
    main()
