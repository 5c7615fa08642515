"""Training step cost of full fine-tuning vs encoder_prompt vs LoRA at release size: scBERT and scFoundation.

    python benchmarks/bench_performers.py                      # both backbones, 1 warmup + 3 timed rounds
    python benchmarks/bench_performers.py --backbones scbert --steps 5 --no-memory

Each backbone is assembled from the composed config (`backbone=scbert|scfoundation`, release sizes,
random init: no checkpoint here) over synthetic prepared cells whose var_names become the gene panel:
16,906 genes for scBERT (16,907 positions a cell, the release length), 19,264 for scFoundation. Counts
are Poisson with ~10% non-zero; scFoundation's cells then have ~1,900 expressed genes, i.e. ~1,900
tokens with T and S (under `backbone.max_seq_len=2048`, which therefore cuts nothing).

A step: train mode (the config's dropout), forward, cross-entropy on the head, zero_grad, backward,
AdamW step over the trainable parameters; the trainer's memory settings are applied as the trainer
applies them. All three strategies of a backbone are built in one process; `--warmup` untimed rounds,
then `--steps` rounds of one step of each strategy in turn (full, encoder_prompt, lora), so each step
is paired with full's step of the same round: ratio_to_full is the median of the per-round ratios.
Optionally (`--memory`, default on) one further step per strategy under LiveTensorMemory (peak bytes
held by live tensors over those at the step's start, with gradients cleared and a fresh AdamW, so
the AdamW state's creation is counted).
Writes benchmarks/results/performers_release.csv / .md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as bench_strategies: stable CPU timings

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_strategies import compose_config  # noqa: E402

BACKBONES = {
    "scbert": {"overrides": ["backbone=scbert"], "n_genes": 16906},
    "scfoundation": {"overrides": ["backbone=scfoundation", "backbone.max_seq_len=2048"], "n_genes": 19264},
}
STRATEGIES = {"full": ["peft=full"], "encoder_prompt": ["peft=encoder_prompt"], "lora": ["peft=lora"]}
N_CLASSES = 18
COLUMNS = ["backbone", "strategy", "trainable_params", "step_seconds", "ratio_to_full", "peak_live_mb"]


def synthetic_cells(n_genes: int, n_cells: int, *, seed: int, nonzero: float = 0.10):
    """Prepared cells (log-normalised AnnData) of Poisson counts with ~`nonzero` of the entries non-zero."""
    import numpy as np
    import pandas as pd
    import scipy.sparse as sp

    from scpeft_cli.data.loading import prepare

    rng = np.random.default_rng(seed)
    lam = -np.log(1.0 - nonzero)  # P(count > 0) = nonzero
    counts = rng.poisson(lam, size=(n_cells, n_genes)).astype(np.float32)
    obs = pd.DataFrame(index=[f"cell{i}" for i in range(n_cells)])
    with contextlib.redirect_stdout(io.StringIO()):
        return prepare(
            sp.csr_matrix(counts),
            obs=obs,
            genes=[f"G{i}" for i in range(n_genes)],
            source="bench",
            path=None,
            label_key=None,
            gene_key=None,
            layer=None,
            min_cells_per_class=0,
            drop_unlabeled=False,
        )


class Run:
    """One strategy of one backbone, built for training: model, AdamW, one collated batch."""

    def __init__(self, backbone: str, strategy: str, cells, batch_size: int):
        import torch

        from scpeft_cli.assembly import assemble, parameter_counts
        from scpeft_cli.tokenizers.cache import tokenize_cells

        torch.manual_seed(0)
        cfg = compose_config(BACKBONES[backbone]["overrides"] + STRATEGIES[strategy] + [f"task.n_classes={N_CLASSES}"])
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the "randomly initialised" warning
            parts = assemble(cfg, head_settings={"n_classes": N_CLASSES}, cells=cells)
        self.build_s = time.perf_counter() - t0
        self.model = parts.model
        trainer_cfg = cfg.get("trainer", {})
        self.model.backbone.set_memory_options(  # as the trainer does with its settings
            grad_checkpointing=trainer_cfg.get("grad_checkpointing", False),
            recompute_frozen_qkv=trainer_cfg.get("recompute_frozen_qkv", True),
        )
        tokenizer = parts.backbone.tokenizer
        with contextlib.redirect_stdout(io.StringIO()):
            tokens = tokenize_cells(tokenizer, cells, seed=0, cache_dir=None)
        batch = tokenizer.collate([tokens.cell(i) for i in range(batch_size)])
        batch["labels"] = torch.arange(batch_size) % N_CLASSES
        self.batch = batch
        first = next(v for v in batch.values() if torch.is_tensor(v) and v.dim() == 2)
        self.positions = int(first.shape[1])
        self.tokens_per_cell = [len(tokens.cell(i)[0]) for i in range(batch_size)]
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-4)
        counts = parameter_counts(self.model)
        self.trainable_params = int(counts["trainable_params"])
        self.total_params = int(counts["total_params"])
        self.dropout = cfg.backbone.get("dropout")
        self.attention_dropout = cfg.backbone.get("attention_dropout")

    def step(self, optimizer=None) -> float:
        import torch.nn.functional as F

        optimizer = optimizer or self.optimizer
        self.model.train()
        t0 = time.perf_counter()
        logits = self.model(self.batch)[0]
        loss = F.cross_entropy(logits, self.batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - t0


def bench_backbone(backbone: str, args) -> tuple[list[dict], dict]:
    import torch
    from live_memory import LiveTensorMemory

    batch_size = args.batch_scbert if backbone == "scbert" else args.batch_scfoundation
    t0 = time.perf_counter()
    cells = synthetic_cells(BACKBONES[backbone]["n_genes"], max(batch_size, 2), seed=0)
    runs = {s: Run(backbone, s, cells, batch_size) for s in STRATEGIES}
    print(f"{backbone}: built {len(runs)} strategies in {time.perf_counter() - t0:.0f} s", flush=True)
    for w in range(args.warmup):
        for s, run in runs.items():
            print(f"  {backbone} warmup {w + 1} {s}: {run.step():.2f} s", flush=True)
    times: dict[str, list[float]] = {s: [] for s in runs}
    for r in range(args.steps):
        for s, run in runs.items():
            times[s].append(run.step())
        print(f"  {backbone} round {r + 1}: " + ", ".join(f"{s} {times[s][-1]:.2f} s" for s in runs), flush=True)
    peaks = {}
    if args.memory:
        for s, run in runs.items():
            run.model.zero_grad(set_to_none=True)
            gc.collect()
            with LiveTensorMemory() as live:
                run.step(torch.optim.AdamW(run.trainable, lr=1e-4))
            peaks[s] = live.peak_megabytes
            print(f"  {backbone} {s}: peak live tensors {peaks[s]:.0f} MB", flush=True)
    rows = []
    for s, run in runs.items():
        ratios = [own / full for own, full in zip(times[s], times["full"], strict=True)]
        row = {
            "backbone": backbone,
            "strategy": s,
            "trainable_params": run.trainable_params,
            "total_params": run.total_params,
            "step_seconds": statistics.median(times[s]),
            "ratio_to_full": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "step_times_s": " ".join(f"{t:.3f}" for t in times[s]),
            "batch": batch_size,
            "positions": run.positions,
            "tokens_per_cell": " ".join(map(str, run.tokens_per_cell)),
            "dropout": run.dropout,
            "attention_dropout": run.attention_dropout,
            "threads": torch.get_num_threads(),
            "build_s": run.build_s,
        }
        if s in peaks:
            row["peak_live_mb"] = peaks[s]
        rows.append(row)
    info = {
        "batch": batch_size,
        "positions": runs["full"].positions,
        "tokens": runs["full"].tokens_per_cell,
        "dropout": runs["full"].dropout,
        "attention_dropout": runs["full"].attention_dropout,
        "total_params": runs["full"].total_params,
        "wall_s": time.perf_counter() - t0,
    }
    del runs
    gc.collect()
    return rows, info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES), choices=list(BACKBONES))
    parser.add_argument("--batch-scbert", type=int, default=1)
    parser.add_argument("--batch-scfoundation", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds (one step of each strategy)")
    parser.add_argument("--steps", type=int, default=3, help="timed rounds (one step of each strategy)")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="one extra profiled step per strategy for the live-tensor peak")
    parser.add_argument("--suffix", default="", help="appended to the result file name")
    args = parser.parse_args(argv)

    import warnings

    import _common
    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(os.cpu_count())
    started = time.perf_counter()
    rows, notes = [], []
    columns = COLUMNS if args.memory else COLUMNS[:-1]

    def write(rows, notes):
        _common.write_results(
            f"performers_release{args.suffix}", rows, columns,
            title="Performer-family backbones at release size: step cost vs full fine-tuning (CPU)", notes=notes,
        )

    for backbone in args.backbones:
        b_rows, info = bench_backbone(backbone, args)
        rows += b_rows
        tokens = info["tokens"]
        notes.append(
            f"{backbone} ({' '.join(BACKBONES[backbone]['overrides'])}; random init, {info['total_params']:,} parameters "
            f"with the {N_CLASSES}-class head; panel {BACKBONES[backbone]['n_genes']:,} genes): batch {info['batch']}, "
            f"{info['positions']:,} positions per batch row (tokens per cell {', '.join(f'{t:,}' for t in tokens)}); "
            f"dropout {info['dropout']}, attention dropout {info['attention_dropout']} (config defaults); "
            f"{info['wall_s']:.0f} s wall"
        )
        write(rows, notes + ["partial: written after each backbone"])  # a killed run keeps what it finished
    notes += [
        "synthetic prepared cells: Poisson counts with ~10% of entries non-zero (log-normalised by `prepare`); scBERT "
        "reads every panel gene (16,906 + <cls> = 16,907 positions, the release length); scFoundation reads the "
        "expressed genes plus T and S (~1,900 tokens; backbone.max_seq_len=2048 cuts none)",
        f"step: train mode, forward, cross-entropy, zero_grad, backward, AdamW (lr 1e-4) over the trainable parameters; "
        f"all strategies of a backbone in one process, {args.warmup} untimed round(s), then {args.steps} rounds of "
        "one step of each (full, encoder_prompt, lora); step_seconds: median; ratio_to_full: median of the "
        "per-round ratios to full's step of the same round (min/max in the CSV); trainer memory defaults "
        "(recompute_frozen_qkv=true, no gradient checkpointing)",
        f"torch threads {torch.get_num_threads()} (os.cpu_count()); OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
    ]
    if args.memory:
        notes.append(
            "peak_live_mb: peak bytes held by live tensors (LiveTensorMemory, profiler allocation events) during one "
            "extra step per strategy, gradients cleared and a fresh AdamW (its state created in the step), over "
            "the live bytes at the step's start (model weights and batch not counted)"
        )
    notes.append(f"total run {time.perf_counter() - started:.0f} s")
    write(rows, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
