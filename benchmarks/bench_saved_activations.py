"""What the backward pass keeps alive: tensors saved for backward, by module, per strategy.

    python benchmarks/bench_saved_activations.py                    # whole-human size
    python benchmarks/bench_saved_activations.py --strategies full token_prompt --size small

A diagnostic for the memory figures of bench_strategies.py: one training-mode forward pass on the same
synthetic batch (8 x 701 tokens, all real), with `torch.autograd.graph.saved_tensors_hooks` recording
every tensor autograd saves (deduplicated by storage; parameters excluded) under the innermost module
running at the time (layer indices folded: `layers.*.linear1`); where attention keeps a frozen
projection's input instead of q/k/v (`backbones/recompute.py`), what it keeps is counted. Also
records which attention kernel ran (aten op names from the profiler). No backward, no optimiser: this is the activation part of the peak,
not the gradients, AdamW state or backward temporaries. Writes benchmarks/results/saved_activations.csv / .md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
from collections import defaultdict
from pathlib import Path
from unittest import mock

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_strategies.py

import anndata
import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _common  # noqa: E402
from bench_strategies import SIZES, STRATEGIES, compose_config, synthetic_batch  # noqa: E402

from scpeft_cli.assembly import assemble  # noqa: E402
from scpeft_cli.backbones.recompute import RecomputedProjection  # noqa: E402


def saved_by_module(model, batch) -> tuple[dict[str, float], dict[str, str], float]:
    """MB of saved tensors per module path (layer indices folded), the largest shape per path, total MB."""
    stack: list[str] = ["(model)"]
    names = {module: name for name, module in model.named_modules()}
    params = {p.data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    by_module: dict[str, float] = defaultdict(float)
    biggest: dict[str, tuple[int, str]] = {}

    def pre(module, _inputs):
        stack.append(re.sub(r"\.\d+\.", ".*.", names[module]).removeprefix("backbone."))

    def post(_module, _inputs, _output):
        stack.pop()

    handles = [m.register_forward_pre_hook(pre) for m in names] + [m.register_forward_hook(post) for m in names]

    def pack(t: torch.Tensor):
        ptr, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
        if ptr in params or ptr in seen or nbytes == 0:
            return t
        seen.add(ptr)
        key = stack[-1] or "(model)"
        by_module[key] += nbytes / 2**20
        if nbytes > biggest.get(key, (0, ""))[0]:
            biggest[key] = (nbytes, f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}")
        return t

    # Attention behind a frozen projection installs its own hooks, which take precedence over these:
    # record what they keep instead (the other saved tensors, and the projection input in place of q/k/v).
    recomputed_pack = RecomputedProjection.pack

    def observed_pack(self: RecomputedProjection, tensor: torch.Tensor):
        packed = recomputed_pack(self, tensor)
        pack(packed if isinstance(packed, torch.Tensor) else self.kept_input)
        return packed

    try:
        with (
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
            mock.patch.object(RecomputedProjection, "pack", observed_pack),
        ):
            logits, _ = model(batch)
    finally:
        for handle in handles:
            handle.remove()
    del logits
    return dict(by_module), {k: v[1] for k, v in biggest.items()}, sum(by_module.values())


def attention_ops(model, batch) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        with torch.no_grad():
            model.backbone.layers[0](model.backbone.embed(batch), batch["padding_mask"])
    ops = {e.key for e in prof.key_averages() if "attention" in e.key or "softmax" in e.key}
    return ", ".join(sorted(ops))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="whole", choices=list(SIZES))
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=["full", "token_prompt", "encoder_prompt", "lora", "head_only"],
        choices=list(STRATEGIES),
    )
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=701)
    parser.add_argument("--override", action="append", default=[], help="extra Hydra override (repeatable)")
    parser.add_argument("--suffix", default="")
    args = parser.parse_args(argv)

    genes = [f"G{i:05d}" for i in range(SIZES[args.size]["n_genes"])]
    rows, kernel = [], ""
    for strategy in args.strategies:
        cfg = compose_config(SIZES[args.size]["overrides"] + STRATEGIES[strategy] + args.override)
        with contextlib.redirect_stdout(io.StringIO()):
            parts = assemble(cfg, head_settings={"n_classes": int(cfg.task.n_classes)}, cells=anndata.AnnData(var=pd.DataFrame(index=genes)))
        model = parts.model.train()
        batch = synthetic_batch(
            parts.backbone.tokenizer,
            genes,
            batch=args.batch,
            tokens=args.tokens,
            n_classes=int(cfg.task.n_classes),
            seed=1,
        )
        if not kernel:
            kernel = attention_ops(model, batch)
        by_module, biggest, total = saved_by_module(model, batch)
        print(f"  {strategy:<24} saved for backward: {total:,.0f} MB", flush=True)
        for module, mb in sorted(by_module.items(), key=lambda kv: -kv[1]):
            rows.append(
                {
                    "strategy": strategy,
                    "module": module,
                    "saved_mb": mb,
                    "share_pct": 100 * mb / total if total else 0.0,
                    "largest_tensor": biggest[module],
                }
            )
        rows.append(
            {"strategy": strategy, "module": "TOTAL", "saved_mb": total, "share_pct": 100.0, "largest_tensor": ""}
        )
        del model, parts
    shown = [r for r in rows if r["module"] == "TOTAL" or r["share_pct"] >= 2.0]
    notes = [
        f"size `{args.size}`, batch {args.batch} x {args.tokens} tokens, train mode (config dropout), one forward pass; "
        "tensors saved for backward, deduplicated by storage, parameters excluded; modules below 2% of a strategy's total are "
        "left out here (all rows in the CSV); `layers.*.X` sums the 12 layers",
        f"attention ops in a layer's forward: {kernel}",
    ]
    if args.override:
        notes.append("extra overrides: " + " ".join(args.override))
    _common.write_results(
        f"saved_activations{args.suffix}",
        shown,
        ["strategy", "module", "saved_mb", "share_pct", "largest_tensor"],
        title=f"Tensors saved for backward ({args.size} size)",
        notes=notes,
    )
    # the CSV holds every row
    import csv

    with (_common.RESULTS_DIR / f"saved_activations{args.suffix}.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
