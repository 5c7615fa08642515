"""Training cost of every PEFT strategy relative to full fine-tuning: step time, cells/s, peak memory.

    python benchmarks/bench_strategies.py                       # whole-human + small, every strategy
    python benchmarks/bench_strategies.py --sizes small --steps 5
    python benchmarks/bench_strategies.py --strategies full lora --device cuda --bf16

Each (size, strategy) runs in a fresh subprocess, so its peak memory is clean: the model is assembled
from the composed config (`assemble`, random weights), an AdamW optimiser is built on the trainable
parameters, then `--warmup` + `--steps` training steps (defaults: 1 + 3 at whole-human size,
3 + 20 at small size, whose steps take ~0.2 s) run on one synthetic batch (`--batch` cells x
`--tokens` tokens, all real, `<cls>` first) in train mode with the config's dropout:
forward, cross-entropy on the head, backward, AdamW step (the trainer's order).

Reported per strategy: trainable parameters, model build time, median step time (of the `--steps`
measured steps; warm-up excluded), cells/s = batch / step time, and the peak memory of the steps:
on CPU the peak growth of the process RSS over the RSS after building model + optimiser + batch
(`PeakMemory`, sampling /proc every 10 ms; warm-up included since it allocates gradients and the
AdamW state), on CUDA the allocator peak (`torch.cuda.max_memory_allocated`) minus the memory
allocated before the steps. The trainer's `return_freed_memory` setting is applied as the trainer
applies it. Every strategy runs `--rounds` times, the order alternating between rounds so that a drift
of the machine's speed falls on all alike; `step_time_vs_full` and `memory_vs_full` are medians of the
ratios to full fine-tuning's run in the same round. Writes benchmarks/results/strategies_{size}.csv / .md.
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
    "whole": {"overrides": ["backbone=scgpt", "task.n_classes=18"], "n_genes": 2000, "warmup": 1, "steps": 3, "rounds": 3},
    # the demo backbone with pbmc68k_reduced's gene count
    "small": {"overrides": ["backbone=scgpt_small", "task.n_classes=10"], "n_genes": 765, "warmup": 3, "steps": 20, "rounds": 7},
}

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


def worker(spec: dict) -> dict:
    import contextlib
    import io

    import torch

    from scpeft_cli.assembly import assemble, parameter_counts
    from scpeft_cli.training.resources import LiveTensorMemory, PeakMemory
    from scpeft_cli.training.trainer import apply_memory_settings

    torch.manual_seed(0)
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cuda = device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    cfg = compose_config(spec["overrides"])
    genes = [f"G{i:05d}" for i in range(spec["n_genes"])]
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the "randomly initialised" warning, once per worker
        parts = assemble(cfg, n_classes=int(cfg.task.n_classes), genes=genes)
    model = parts.model.to(device)
    trainer_cfg = cfg.get("trainer", {})
    checkpointing = True if spec["grad_checkpointing"] else trainer_cfg.get("grad_checkpointing", False)
    if checkpointing and not hasattr(model.backbone, "gradient_checkpointing"):
        raise SystemExit("--grad-checkpointing: this backbone has no `gradient_checkpointing` switch")
    recompute_frozen_qkv = trainer_cfg.get("recompute_frozen_qkv", True)
    freed_memory_returned = apply_memory_settings(  # what the trainer does with its settings
        model.backbone,
        grad_checkpointing=checkpointing,
        recompute_frozen_qkv=recompute_frozen_qkv,
        return_freed_memory=bool(trainer_cfg.get("return_freed_memory", False)),
    )
    sync()
    build_s = time.perf_counter() - started
    counts = parameter_counts(model)

    batch = synthetic_batch(
        parts.backbone.tokenizer,
        genes,
        batch=spec["batch"],
        tokens=spec["tokens"],
        n_classes=int(cfg.task.n_classes),
        seed=1,
    )
    batch = {k: v.to(device) for k, v in batch.items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec["bf16"])
    model.train()

    def step(optimizer: torch.optim.Optimizer = optimizer) -> float:
        sync()
        t0 = time.perf_counter()
        with autocast:
            logits, _ = model(batch)
        loss = parts.task.loss(logits, batch["labels"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        sync()
        return time.perf_counter() - t0

    gc.collect()
    rss_before = _rss_bytes()
    allocated_before = torch.cuda.memory_allocated(device) if cuda else 0
    hwm_ok = not cuda and _reset_hwm()
    times = []
    with PeakMemory(device, interval=0.01) as peak:
        for i in range(spec["warmup"] + spec["steps"]):
            elapsed = step()
            if i >= spec["warmup"]:
                times.append(elapsed)
    peak_mb = peak.megabytes - allocated_before / 2**20 if cuda else peak.megabytes
    hwm = _hwm_bytes() if hwm_ok else None
    if cuda:
        live_peak_mb = peak_mb
    else:  # two more steps from the same start (no gradients, no AdamW state), profiled: not timed
        model.zero_grad(set_to_none=True)
        gc.collect()
        with LiveTensorMemory() as live:
            fresh = torch.optim.AdamW(trainable, lr=1e-4)
            step(fresh)
            step(fresh)
        live_peak_mb = live.peak_megabytes

    grads_mb = sum(p.numel() * p.element_size() for p in trainable) / 2**20
    state_mb = (
        sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
        / 2**20
    )
    step_s = statistics.median(times)
    return {
        "strategy": spec["strategy"],
        "size": spec["size"],
        "trainable_params": int(counts["trainable_params"]),
        "total_params": int(counts["total_params"]),
        "trainable_pct": 100 * counts["trainable_fraction"],
        "build_s": build_s,
        "step_s": step_s,
        "step_times_s": " ".join(f"{t:.3f}" for t in times),
        "cells_per_s": spec["batch"] / step_s,
        "peak_memory_mb": peak_mb,
        "memory_kind": "cuda_allocator_peak_growth" if cuda else "cpu_peak_rss_growth",
        "live_peak_mb": live_peak_mb,
        "peak_rss_hwm_growth_mb": (hwm - rss_before) / 2**20 if hwm is not None else float("nan"),
        "rss_after_build_mb": rss_before / 2**20,
        "grads_mb": grads_mb,
        "optimizer_state_mb": state_mb,
        "activations_etc_mb": peak_mb - grads_mb - state_mb,
        "batch": spec["batch"],
        "tokens": spec["tokens"],
        "warmup": spec["warmup"],
        "steps": spec["steps"],
        "dropout": float(cfg.backbone.dropout),
        "attention_dropout": float(cfg.backbone.attention_dropout),
        "device": str(device),
        "bf16": spec["bf16"],
        "grad_checkpointing": checkpointing,
        "recompute_frozen_qkv": recompute_frozen_qkv,
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_", ""),
        "return_freed_memory": freed_memory_returned,
        "threads": torch.get_num_threads(),
        "overrides": " ".join(spec["overrides"]),
    }


# ----------------------------------------------------------------------------------------------- parent
def combine_rounds(runs: list[dict], fulls: list[dict]) -> dict:
    """One table row from a strategy's runs: medians over rounds, ratios paired with full's run of the same round."""
    ok = [(run, full) for run, full in zip(runs, fulls, strict=True) if "step_s" in run and "step_s" in full]
    if not ok:
        return runs[0]
    row = dict(ok[0][0])
    row["step_s"] = statistics.median(run["step_s"] for run, _ in ok)
    row["peak_memory_mb"] = statistics.median(run["peak_memory_mb"] for run, _ in ok)
    row["cells_per_s"] = row["batch"] / row["step_s"]
    row["activations_etc_mb"] = row["peak_memory_mb"] - row["grads_mb"] - row["optimizer_state_mb"]
    row["step_time_vs_full"] = statistics.median(run["step_s"] / full["step_s"] for run, full in ok)
    row["memory_vs_full"] = statistics.median(run["peak_memory_mb"] / full["peak_memory_mb"] for run, full in ok)
    row["live_peak_mb"] = statistics.median(run["live_peak_mb"] for run, _ in ok)
    row["live_memory_vs_full"] = statistics.median(run["live_peak_mb"] / full["live_peak_mb"] for run, full in ok)
    row["rounds"] = len(ok)
    for key in ("step_s", "peak_memory_mb", "live_peak_mb", "step_times_s", "peak_rss_hwm_growth_mb"):
        row[f"{key}_by_round"] = " / ".join(str(run[key]) for run, _ in ok)
    return row


def run_one(spec: dict, timeout: float) -> dict:
    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec), "--worker-out", out.name],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            raise RuntimeError(
                f"{spec['size']}/{spec['strategy']} failed (exit {proc.returncode}): " + " | ".join(tail)
            )
        return json.loads(Path(out.name).read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", nargs="+", default=["whole", "small"], choices=list(SIZES))
    parser.add_argument("--strategies", nargs="+", default=DEFAULT_STRATEGIES, choices=list(STRATEGIES))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=701, help="tokens per cell including <cls>")
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured first steps (default: whole 1, small 3)")
    parser.add_argument(
        "--steps", type=int, default=None, help="measured steps, median reported (default: whole 3, small 20)"
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
        "--rounds",
        type=int,
        default=None,
        help="times every strategy runs, in alternating order; the ratios to full are medians of per-round "
        "ratios (default: whole 3, small 7, whose 0.15 s steps drift by up to 25%% between rounds)",
    )
    parser.add_argument("--timeout", type=float, default=600, help="seconds per strategy subprocess")
    parser.add_argument("--suffix", default="", help="appended to the result file names")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = worker(json.loads(args.worker))
        Path(args.worker_out).write_text(json.dumps(result))
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
        warmup = SIZES[size]["warmup"] if args.warmup is None else args.warmup
        steps = SIZES[size]["steps"] if args.steps is None else args.steps
        rounds = SIZES[size]["rounds"] if args.rounds is None else args.rounds
        by_round: list[dict[str, dict]] = []
        for round_index in range(rounds):
            # alternate the order so that a drift of the machine's speed falls on every strategy alike
            order = strategies if round_index % 2 == 0 else strategies[::-1]
            results = {}
            for strategy in order:
                spec = {
                    "size": size,
                    "strategy": strategy,
                    "n_genes": SIZES[size]["n_genes"],
                    "overrides": SIZES[size]["overrides"] + STRATEGIES[strategy] + args.override,
                    "batch": args.batch,
                    "tokens": args.tokens,
                    "warmup": warmup,
                    "steps": steps,
                    "device": args.device,
                    "bf16": args.bf16,
                    "threads": args.threads,
                    "grad_checkpointing": args.grad_checkpointing,
                }
                t0 = time.perf_counter()
                try:
                    results[strategy] = run_one(spec, args.timeout)
                except (RuntimeError, subprocess.TimeoutExpired) as err:
                    print(f"  {size:>5} {strategy:<24} FAILED: {err}")
                    results[strategy] = {"strategy": strategy, "size": size, "error": str(err)[:300]}
                    continue
                row = results[strategy]
                print(
                    f"  {size:>5} {strategy:<24} step {row['step_s']:.3f} s  peak {row['peak_memory_mb']:.0f} MB  "
                    f"trainable {row['trainable_params']:,}  (round {round_index + 1}/{rounds}, "
                    f"{time.perf_counter() - t0:.0f} s wall)",
                    flush=True,
                )
            by_round.append(results)
        rows = [combine_rounds([results[strategy] for results in by_round], [r["full"] for r in by_round]) for strategy in strategies]
        first = next((r for r in rows if "step_s" in r), {})
        notes = [
            f"size `{size}` ({' '.join(SIZES[size]['overrides'])}, random weights, {SIZES[size]['n_genes']} genes in the vocabulary); "
            f"batch {args.batch} cells x {args.tokens} tokens, no padding; {warmup} warm-up + {steps} measured steps "
            f"(median); AdamW on the trainable parameters; train mode, dropout {first.get('dropout')}, "
            f"attention dropout {first.get('attention_dropout')}; device {args.device}{', bf16 autocast' if args.bf16 else ''}"
            f"{', gradient checkpointing' if first.get('grad_checkpointing') else ''}",
            "peak_memory_mb: "
            + (
                "CUDA allocator peak during the steps minus the memory allocated before them"
                if args.device.startswith("cuda")
                else "peak growth of the process RSS during warm-up + steps over the RSS after building model, optimiser and batch"
            )
            + "; grads_mb / optimizer_state_mb: fp32 gradient and AdamW state sizes; activations_etc_mb: the rest "
            "(saved activations, temporaries, allocator slack)",
            "live_peak_mb: "
            + (
                "the same as peak_memory_mb (the CUDA allocator counts live tensors)"
                if args.device.startswith("cuda")
                else "peak of the bytes held by live tensors (profiler allocation events) over two more, untimed steps "
                "from the same start (no gradients, no AdamW state): the CPU counterpart of the CUDA allocator peak, "
                "without the freed memory glibc keeps mapped"
            ),
            f"every strategy ran in a fresh subprocess, {rounds} round(s) in alternating order; step_s and "
            "peak_memory_mb are medians over rounds, step_time_vs_full and memory_vs_full medians of the per-round "
            "ratios to full fine-tuning; "
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
