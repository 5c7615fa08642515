"""Training cost of every PEFT strategy relative to full fine-tuning: step time, cells/s, peak memory.

    python benchmarks/bench_strategies.py                       # whole-human + small, every strategy
    python benchmarks/bench_strategies.py --sizes small --cycles 10
    python benchmarks/bench_strategies.py --strategies full lora --device cuda --bf16

Every strategy's model is assembled from the composed config (`assemble`, random weights) with an
AdamW optimiser on its trainable parameters and one synthetic batch (`--batch` cells x `--tokens`
tokens, all real, `<cls>` first). A training step is forward, cross-entropy on the head, zero_grad,
backward, AdamW step (the trainer's order), in train mode with the config's dropout; the trainer's
memory settings are applied as the trainer applies them.

Step time is measured with every strategy built in one subprocess: `--warmup` untimed steps each,
then `--cycles` cycles of one step of each strategy in turn, the order reversed every other cycle.
Each step is paired with full fine-tuning's step of the same cycle, so a drift of the machine's speed
falls on both sides of a ratio; `step_time_vs_full` is the median of those per-cycle ratios, and its
quartiles are reported beside it. (Strategies timed in separate processes, one after another, gave
ratios that moved by 10-25% from run to run on this 2-core machine.)

Peak memory is measured with each strategy alone in a fresh subprocess (`--memory-steps` steps,
`--memory-rounds` times, medians): on CPU the peak growth of the process RSS over the RSS after
building model + optimiser + batch (`PeakMemory`, sampling /proc every 10 ms), and the peak of the
bytes held by live tensors over two further steps (`LiveTensorMemory`); on CUDA the allocator peak
(`torch.cuda.max_memory_allocated`) minus the memory allocated before the steps.
Writes benchmarks/results/strategies_{size}.csv / .md.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# OpenMP threads that spin while waiting make CPU timings erratic (2-6x) when another process uses the
# cores; passive waiting keeps them stable. Set OMP_WAIT_POLICY=ACTIVE to keep OpenMP's default.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SIZES = {
    # whole-human scGPT: 512-d, 12 layers, 60,697-row gene embedding (random weights)
    "whole": {
        "overrides": ["backbone=scgpt", "task.n_classes=18"],
        "n_genes": 2000,
        **{"warmup": 1, "cycles": 4, "memory_steps": 4, "memory_rounds": 1},
    },
    # the demo backbone with pbmc68k_reduced's gene count; its ~0.15 s steps need many cycles
    "small": {
        "overrides": ["backbone=scgpt_small", "task.n_classes=10"],
        "n_genes": 765,
        **{"warmup": 3, "cycles": 30, "memory_steps": 10, "memory_rounds": 3},
    },
}
MEASUREMENT = ("warmup", "cycles", "memory_steps", "memory_rounds")  # per size, each overridable on the command line

STRATEGIES = {
    "full": ["peft=full"],
    "head_only": ["peft=head_only"],
    "linear_probe": ["peft=linear_probe"],
    "token_prompt": ["peft=token_prompt"],
    "encoder_prompt": ["peft=encoder_prompt"],
    "encoder_prompt_package": ["peft=encoder_prompt", "peft.variant=package"],
    "prefix": ["peft=prefix"],
    "lora": ["peft=lora"],
    "hf_lora": ["peft=hf", "peft.method=lora"],
    # the attention memory trade: q/k/v kept instead of recomputed behind the frozen QKV projection
    "token_prompt_keep_qkv": ["peft=token_prompt", "trainer.recompute_frozen_qkv=false"],
    "encoder_prompt_keep_qkv": ["peft=encoder_prompt", "trainer.recompute_frozen_qkv=false"],
    "prefix_keep_qkv": ["peft=prefix", "trainer.recompute_frozen_qkv=false"],
    # not in the default set: the prompts with their first layers recomputed in the backward pass
    "token_prompt_ckpt2": ["peft=token_prompt", "trainer.grad_checkpointing=2"],
    "encoder_prompt_ckpt2": ["peft=encoder_prompt", "trainer.grad_checkpointing=2"],
    "encoder_prompt_ckpt3": ["peft=encoder_prompt", "trainer.grad_checkpointing=3"],
}
DEFAULT_STRATEGIES = [name for name in STRATEGIES if "_ckpt" not in name]

COLUMNS = [
    "strategy",
    "trainable_params",
    "trainable_pct",
    "build_s",
    "step_s",
    "cells_per_s",
    "peak_memory_mb",
    "live_peak_mb",
    "step_time_vs_full",
    "step_vs_full_iqr",
    "memory_vs_full",
    "live_memory_vs_full",
    "grads_mb",
    "optimizer_state_mb",
    "activations_etc_mb",
]


# ----------------------------------------------------------------------------------------------- worker
def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_hwm() -> bool:
    """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _hwm_bytes() -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from scpeft_cli.paths import config_dir

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=False)


def synthetic_batch(tokenizer, genes: list[str], *, batch: int, tokens: int, n_classes: int, seed: int):
    """`batch` cells of `tokens` tokens (no padding): <cls>, then random distinct genes with bins 1..n_bins-1."""
    import numpy as np
    import torch

    rng = np.random.default_rng(seed)
    vocab = tokenizer.vocab
    gene_ids = np.array([vocab.token_to_id[g] for g in genes], dtype=np.int64)
    cells = []
    for _ in range(batch):
        ids = rng.choice(gene_ids, size=tokens - 1, replace=tokens - 1 > len(gene_ids))
        values = rng.integers(1, tokenizer.n_bins, size=tokens - 1).astype(np.float32)
        cells.append(
            (np.concatenate([[vocab.cls_id], ids]), np.concatenate([[tokenizer.cls_value], values]).astype(np.float32))
        )
    out = tokenizer.collate(cells)
    assert not out["padding_mask"].any() and out["gene_ids"].shape == (batch, tokens)
    out["labels"] = torch.from_numpy(rng.integers(0, n_classes, size=batch))
    return out


class Run:
    """One strategy built for training: model, optimiser and a synthetic batch; `step()` is one timed step."""

    def __init__(self, spec: dict):
        import contextlib
        import io

        import anndata
        import pandas as pd
        import torch

        from scpeft_cli.assembly import assemble, parameter_counts

        torch.manual_seed(0)
        self.device = torch.device(spec["device"])
        cfg = compose_config(spec["overrides"])
        genes = [f"G{i:05d}" for i in range(spec["n_genes"])]
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the "randomly initialised" warning, once per build
            parts = assemble(cfg, head_settings={"n_classes": int(cfg.task.n_classes)}, cells=anndata.AnnData(var=pd.DataFrame(index=genes)))
        self.model = parts.model.to(self.device)
        self.task = parts.task
        trainer_cfg = cfg.get("trainer", {})
        checkpointing = True if spec["grad_checkpointing"] else trainer_cfg.get("grad_checkpointing", False)
        recompute_frozen_qkv = trainer_cfg.get("recompute_frozen_qkv", True)
        self.model.backbone.set_memory_options(  # what the trainer does with its settings
            grad_checkpointing=checkpointing, recompute_frozen_qkv=recompute_frozen_qkv
        )
        self.sync()
        build_s = time.perf_counter() - started
        batch = synthetic_batch(
            parts.backbone.tokenizer,
            genes,
            batch=spec["batch"],
            tokens=spec["tokens"],
            n_classes=int(cfg.task.n_classes),
            seed=1,
        )
        self.batch = {k: v.to(self.device) for k, v in batch.items()}
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-4)
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=spec["bf16"])
        self.model.train()
        counts = parameter_counts(self.model)
        self.facts = {
            "strategy": spec["strategy"],
            "size": spec["size"],
            "trainable_params": int(counts["trainable_params"]),
            "total_params": int(counts["total_params"]),
            "trainable_pct": 100 * counts["trainable_fraction"],
            "build_s": build_s,
            "batch": spec["batch"],
            "tokens": spec["tokens"],
            "dropout": float(cfg.backbone.dropout),
            "attention_dropout": float(cfg.backbone.attention_dropout),
            "device": str(self.device),
            "bf16": spec["bf16"],
            "grad_checkpointing": checkpointing,
            "recompute_frozen_qkv": recompute_frozen_qkv,
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", ""),
            "threads": torch.get_num_threads(),
            "overrides": " ".join(spec["overrides"]),
        }

    def sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self, optimizer=None) -> float:
        """forward, cross-entropy on the head, zero_grad, backward, AdamW step (the trainer's order); seconds"""
        optimizer = optimizer or self.optimizer
        self.sync()
        t0 = time.perf_counter()
        with self.autocast:
            logits, _ = self.model(self.batch)
        loss = self.task.loss(logits, self.batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        self.sync()
        return time.perf_counter() - t0


def alternating(items: list[str], index: int) -> list[str]:
    """`items` in order for even `index`, reversed for odd: a drift of the machine's speed falls on all alike."""
    return items if index % 2 == 0 else items[::-1]


def _set_threads(spec: dict) -> None:
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])


def memory_worker(spec: dict) -> dict:
    """Peak memory of `spec["steps"]` training steps of one strategy, alone in this process."""
    import torch
    from live_memory import LiveTensorMemory

    from scpeft_cli.training.resources import PeakMemory

    _set_threads(spec)
    run = Run(spec)
    cuda = run.device.type == "cuda"
    gc.collect()
    rss_before = _rss_bytes()
    allocated_before = torch.cuda.memory_allocated(run.device) if cuda else 0
    hwm_ok = not cuda and _reset_hwm()
    with PeakMemory(run.device, interval=0.01) as peak:
        for _ in range(spec["steps"]):
            run.step()
    peak_mb = peak.megabytes - allocated_before / 2**20 if cuda else peak.megabytes
    hwm = _hwm_bytes() if hwm_ok else None
    if cuda:
        live_peak_mb = peak_mb
    else:  # two more steps from the same start (no gradients, no AdamW state), profiled
        run.model.zero_grad(set_to_none=True)
        gc.collect()
        with LiveTensorMemory() as live:
            fresh = torch.optim.AdamW(run.trainable, lr=1e-4)
            run.step(fresh)
            run.step(fresh)
        live_peak_mb = live.peak_megabytes
    grads_mb = sum(p.numel() * p.element_size() for p in run.trainable) / 2**20
    state = run.optimizer.state.values()
    state_mb = sum(t.numel() * t.element_size() for s in state for t in s.values() if torch.is_tensor(t)) / 2**20
    return {
        **run.facts,
        "peak_memory_mb": peak_mb,
        "memory_kind": "cuda_allocator_peak_growth" if cuda else "cpu_peak_rss_growth",
        "live_peak_mb": live_peak_mb,
        "peak_rss_hwm_growth_mb": (hwm - rss_before) / 2**20 if hwm is not None else float("nan"),
        "rss_after_build_mb": rss_before / 2**20,
        "grads_mb": grads_mb,
        "optimizer_state_mb": state_mb,
        "activations_etc_mb": peak_mb - grads_mb - state_mb,
        "memory_steps": spec["steps"],
    }


def timing_worker(spec: dict) -> dict:
    """Step times of every strategy in one process, one step of each in turn per cycle (paired with full's)."""
    _set_threads(spec)
    runs = {
        strategy: Run({**spec, "strategy": strategy, "overrides": overrides}) for strategy, overrides in spec["runs"]
    }
    for _ in range(spec["warmup"]):
        for run in runs.values():
            run.step()
    times: dict[str, list[float]] = {strategy: [] for strategy in runs}
    for cycle in range(spec["cycles"]):
        for strategy in alternating(list(runs), cycle):
            times[strategy].append(runs[strategy].step())
    return {"times": times}


WORKERS = {"memory": memory_worker, "timing": timing_worker}


# ----------------------------------------------------------------------------------------------- parent
def combine_memory(runs: list[dict], fulls: list[dict]) -> dict:
    """One strategy's memory figures: medians over rounds, ratios paired with full's run of the same round."""
    ok = [
        (run, full)
        for run, full in zip(runs, fulls, strict=True)
        if "peak_memory_mb" in run and "peak_memory_mb" in full
    ]
    if not ok:
        return runs[0]
    row = dict(ok[0][0])
    row["peak_memory_mb"] = statistics.median(run["peak_memory_mb"] for run, _ in ok)
    row["activations_etc_mb"] = row["peak_memory_mb"] - row["grads_mb"] - row["optimizer_state_mb"]
    row["memory_vs_full"] = statistics.median(run["peak_memory_mb"] / full["peak_memory_mb"] for run, full in ok)
    row["live_peak_mb"] = statistics.median(run["live_peak_mb"] for run, _ in ok)
    row["live_memory_vs_full"] = statistics.median(run["live_peak_mb"] / full["live_peak_mb"] for run, full in ok)
    row["memory_rounds"] = len(ok)
    for key in ("peak_memory_mb", "live_peak_mb", "peak_rss_hwm_growth_mb"):
        row[f"{key}_by_round"] = " / ".join(str(run[key]) for run, _ in ok)
    return row


def step_time_figures(times: dict[str, list[float]], *, batch: int) -> dict[str, dict]:
    """Per strategy: median step time, and the median and quartiles of its per-cycle ratios to full's step."""
    figures = {}
    for strategy, seconds in times.items():
        ratios = [own / full for own, full in zip(seconds, times["full"], strict=True)]
        q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 else (ratios * 3)
        step_s = statistics.median(seconds)
        figures[strategy] = {
            "step_s": step_s,
            "cells_per_s": batch / step_s,
            "step_time_vs_full": statistics.median(ratios),
            "step_vs_full_q1": q1,
            "step_vs_full_q3": q3,
            "step_vs_full_iqr": f"{q1:.2f}-{q3:.2f}",
            "step_times_s": " ".join(f"{t:.3f}" for t in seconds),
        }
    return figures


def run_worker(mode: str, spec: dict, timeout: float) -> dict:
    """`mode`'s worker in a fresh subprocess (clean peak memory; no state shared with earlier runs)."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", mode, json.dumps(spec), "--worker-out", out.name],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            what = spec.get("strategy", "timing")
            raise RuntimeError(f"{spec['size']}/{what} failed (exit {proc.returncode}): " + " | ".join(tail))
        return json.loads(Path(out.name).read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["whole", "small"], choices=list(SIZES))
    parser.add_argument("--strategies", nargs="+", default=DEFAULT_STRATEGIES, choices=list(STRATEGIES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=701, help="tokens per cell including <cls>")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps of each strategy (default: whole 1, small 3)"
    )
    parser.add_argument(
        "--cycles",
        type=int,
        default=None,
        help="timed steps of each strategy, one of each in turn (default: whole 4, small 30)",
    )
    parser.add_argument(
        "--memory-steps", type=int, default=None, help="steps of each memory run (default: whole 4, small 10)"
    )
    parser.add_argument(
        "--memory-rounds",
        type=int,
        default=None,
        help="memory runs of each strategy, medians reported (default: whole 1, small 3)",
    )
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the forward pass")
    parser.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="recompute layer activations in backward (trainer.grad_checkpointing)",
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument(
        "--override", action="append", default=[], help="extra Hydra override for every run (repeatable)"
    )
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds per memory run, and per strategy of the timing run"
    )
    parser.add_argument("--suffix", default="", help="appended to the result file names")
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "SPEC"), help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        mode, spec = args.worker
        Path(args.worker_out).write_text(json.dumps(WORKERS[mode](json.loads(spec))))
        return 0

    import _common

    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device available")
    strategies = ["full"] + [s for s in args.strategies if s != "full"]  # the reference of every ratio
    if "hf_lora" in strategies and importlib.util.find_spec("peft") is None:
        print("skipping hf_lora: the huggingface `peft` library is not installed")
        strategies.remove("hf_lora")

    for size in args.sizes:
        setting = {key: SIZES[size][key] if getattr(args, key) is None else getattr(args, key) for key in MEASUREMENT}
        common = {
            "size": size,
            "n_genes": SIZES[size]["n_genes"],
            "batch": args.batch,
            "tokens": args.tokens,
            "device": args.device,
            "bf16": args.bf16,
            "threads": args.threads,
            "grad_checkpointing": args.grad_checkpointing,
        }
        overrides = {
            strategy: SIZES[size]["overrides"] + STRATEGIES[strategy] + args.override for strategy in strategies
        }

        memory_by_round: list[dict[str, dict]] = []
        for round_index in range(setting["memory_rounds"]):
            results = {}
            for strategy in alternating(strategies, round_index):
                spec = {
                    **common,
                    "strategy": strategy,
                    "overrides": overrides[strategy],
                    "steps": setting["memory_steps"],
                }
                t0 = time.perf_counter()
                try:
                    results[strategy] = row = run_worker("memory", spec, args.timeout)
                except (RuntimeError, subprocess.TimeoutExpired) as err:
                    print(f"  {size:>5} {strategy:<24} FAILED: {err}")
                    results[strategy] = {"strategy": strategy, "size": size, "error": str(err)[:300]}
                    continue
                print(
                    f"  {size:>5} {strategy:<24} memory: peak RSS growth {row['peak_memory_mb']:.0f} MB, live "
                    f"{row['live_peak_mb']:.0f} MB, trainable {row['trainable_params']:,}  (round {round_index + 1}/"
                    f"{setting['memory_rounds']}, {time.perf_counter() - t0:.0f} s wall)",
                    flush=True,
                )
            memory_by_round.append(results)
        rows = [
            combine_memory([results[strategy] for results in memory_by_round], [r["full"] for r in memory_by_round])
            for strategy in strategies
        ]

        timed = [strategy for strategy, row in zip(strategies, rows, strict=True) if "error" not in row]
        if "full" in timed:
            spec = {
                **common,
                "runs": [(strategy, overrides[strategy]) for strategy in timed],
                "warmup": setting["warmup"],
                "cycles": setting["cycles"],
            }
            print(
                f"  {size:>5} timing {len(timed)} strategies in one process, {setting['cycles']} cycles ...", flush=True
            )
            t0 = time.perf_counter()
            try:
                timing = run_worker("timing", spec, args.timeout * len(timed))
            except (RuntimeError, subprocess.TimeoutExpired) as err:
                print(f"  {size:>5} timing FAILED: {err}")
            else:
                figures = step_time_figures(timing["times"], batch=args.batch)
                for row in rows:
                    row.update(figures.get(row["strategy"], {}))
                    if row["strategy"] in figures:
                        print(
                            f"  {size:>5} {row['strategy']:<24} step {row['step_s']:.3f} s, "
                            f"{row['step_time_vs_full']:.3f} x full (quartiles {row['step_vs_full_iqr']})"
                        )
                print(f"  {size:>5} timing: {time.perf_counter() - t0:.0f} s wall", flush=True)

        first = next((r for r in rows if "peak_memory_mb" in r), {})
        notes = [
            f"size `{size}` ({' '.join(SIZES[size]['overrides'])}, random weights, {SIZES[size]['n_genes']} genes in the vocabulary); "
            f"batch {args.batch} cells x {args.tokens} tokens, no padding; AdamW on the trainable parameters; train mode, "
            f"dropout {first.get('dropout')}, attention dropout {first.get('attention_dropout')}; device {args.device}"
            f"{', bf16 autocast' if args.bf16 else ''}{', gradient checkpointing' if first.get('grad_checkpointing') else ''}",
            f"step time: every strategy built in one process, {setting['warmup']} untimed step(s) each, then "
            f"{setting['cycles']} cycles of one step of each strategy in turn (order reversed every other cycle); step_s: "
            "median of a strategy's steps; step_time_vs_full: median of its per-cycle ratios to full fine-tuning's step "
            "of the same cycle, step_vs_full_iqr their quartiles; cells_per_s = batch / step_s",
            "peak_memory_mb: "
            + (
                "CUDA allocator peak during the steps minus the memory allocated before them"
                if args.device.startswith("cuda")
                else "peak growth of the process RSS during the steps over the RSS after building model, optimiser and batch"
            )
            + f", {setting['memory_steps']} steps in a fresh process per strategy, median of {setting['memory_rounds']} "
            "round(s) (memory_vs_full: median of the per-round ratios); grads_mb / optimizer_state_mb: fp32 gradient and "
            "AdamW state sizes; activations_etc_mb: the rest (saved activations, temporaries, allocator slack)",
            "live_peak_mb: "
            + (
                "the same as peak_memory_mb (the CUDA allocator counts live tensors)"
                if args.device.startswith("cuda")
                else "peak of the bytes held by live tensors (profiler allocation events) over two more steps of the "
                "memory run from the same start (no gradients, no AdamW state): the CPU counterpart of the CUDA "
                "allocator peak, without the freed memory glibc keeps mapped"
            ),
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}",
        ]
        if args.override:
            notes.append("extra overrides: " + " ".join(args.override))
        if os.environ.get("MALLOC_MMAP_THRESHOLD_"):
            notes.append(
                f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}: glibc serves every allocation of at least "
                "that size with mmap and returns it on free, so the RSS peak tracks live tensors (no heap retention)"
            )
        _common.write_results(
            f"strategies_{size}{args.suffix}",
            rows,
            COLUMNS,
            title=f"Strategies, {size} size ({args.device}{', bf16' if args.bf16 else ''}"
            f"{', gradient checkpointing' if args.grad_checkpointing else ''})",
            notes=notes,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
