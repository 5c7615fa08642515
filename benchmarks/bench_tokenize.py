"""Our vectorised scGPT tokenisation vs a per-cell reference written as upstream scGPT does it.

    python benchmarks/bench_tokenize.py
    python benchmarks/bench_tokenize.py --cells 5000 --max-lens 3001

Input: synthetic counts, `--cells` x `--genes` at `--density` non-zero (seeded), log1p, CSR float64.

- ours: `ScGPTTokenizer.tokenize(X, genes, seed=...)` (one compiled pass per cell, cells in parallel: `<cls>`
  first, seeded subsampling above max_seq_len, ragged output); also timed with `collate` over all
  cells in batches of `--batch` (padding to each batch's longest cell), which a training run adds;
- reference: upstream scGPT's `Preprocessor` binning (dense matrix; per cell `np.quantile` edges of the
  non-zero values at linspace(0, 1, n_bins - 1), two-sided `np.digitize` with random ties) followed by
  `tokenize_and_pad_batch` (per cell: non-zero genes, `<cls>` inserted first, `np.random.choice`
  subsampling above max_len, padding every cell to max_len, stacking).

Sanity checks: (1) on the benchmark input, every cell gets the same genes in the same order from
both, and the share of identical bins is reported (the rest are ties, which both place at random);
(2) on a tie-free input (continuous distinct values) the (gene, bin) sequences are identical;
(3) with subsampling, each cell keeps min(n + 1, max_len) tokens whose (gene, bin) pairs are a
subset of the cell's unsubsampled ones, for both implementations.
Writes benchmarks/results/tokenize.csv / .md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_strategies.py

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from scpeft_cli.tokenizers.scgpt import ScGPTTokenizer  # noqa: E402
from scpeft_cli.tokenizers.vocab import GeneVocab  # noqa: E402

COLUMNS = [
    "setting",
    "ours_s",
    "ours_cells_per_s",
    "ours_with_collate_s",
    "reference_s",
    "reference_binning_s",
    "reference_cells_per_s",
    "speedup",
    "speedup_with_collate",
    "same_genes",
    "bins_equal_pct",
]


# ---------------------------------------------------------------------------------- the per-cell reference
def _digitize(x: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """upstream scGPT `_digitize(x, bins, side="both")`: random placement between left and right digitisation."""
    left_digits = np.digitize(x, bins)
    right_digits = np.digitize(x, bins, right=True)
    rands = np.random.rand(len(x))
    return np.ceil(rands * (right_digits - left_digits) + left_digits).astype(np.int64)


def reference_binning(X: sp.spmatrix, n_bins: int) -> np.ndarray:
    """upstream `Preprocessor` binning step: densify, then per cell quantile-bin the non-zero values."""
    layer_data = X.toarray()
    binned_rows = []
    for row in layer_data:
        if row.max() == 0:
            binned_rows.append(np.zeros_like(row, dtype=np.int64))
            continue
        non_zero_ids = row.nonzero()
        non_zero_row = row[non_zero_ids]
        bins = np.quantile(non_zero_row, np.linspace(0, 1, n_bins - 1))
        binned_row = np.zeros_like(row, dtype=np.int64)
        binned_row[non_zero_ids] = _digitize(non_zero_row, bins)
        binned_rows.append(binned_row)
    return np.stack(binned_rows)


def reference_tokenize_and_pad(
    binned: np.ndarray, gene_ids: np.ndarray, *, max_len: int, cls_id: int, pad_id: int, pad_value: float
) -> dict[str, torch.Tensor]:
    """upstream `tokenize_and_pad_batch(..., append_cls=True, include_zero_gene=False)`."""
    tokenized = []
    for row in binned:
        idx = np.nonzero(row)[0]
        values, genes = row[idx], gene_ids[idx]
        genes = np.insert(genes, 0, cls_id)
        values = np.insert(values, 0, 0)
        tokenized.append((torch.from_numpy(genes).long(), torch.from_numpy(values).float()))
    gene_rows, value_rows = [], []
    for genes, values in tokenized:
        if len(genes) > max_len:  # upstream pad_batch with cls_appended=True: keep <cls>, sample the rest
            idx = np.random.choice(len(genes) - 1, max_len - 1, replace=False) + 1
            idx = np.insert(idx, 0, 0)
            genes, values = genes[idx], values[idx]
        if len(genes) < max_len:
            genes = torch.cat([genes, torch.full((max_len - len(genes),), pad_id, dtype=genes.dtype)])
            values = torch.cat([values, torch.full((max_len - len(values),), pad_value, dtype=values.dtype)])
        gene_rows.append(genes)
        value_rows.append(values)
    return {"genes": torch.stack(gene_rows), "values": torch.stack(value_rows)}


def reference(
    X: sp.spmatrix, genes: list[str], tokenizer: ScGPTTokenizer, *, max_len: int, seed: int
) -> tuple[dict, float, float]:
    np.random.seed(seed)
    t0 = time.perf_counter()
    vocab = tokenizer.vocab
    gene_ids = np.array([vocab.token_to_id.get(g, -1) for g in genes], dtype=np.int64)  # upstream: vocab(genes)
    binned = reference_binning(X, tokenizer.n_bins)
    t1 = time.perf_counter()
    out = reference_tokenize_and_pad(
        binned, gene_ids, max_len=max_len, cls_id=vocab.cls_id, pad_id=vocab.pad_id, pad_value=tokenizer.pad_value
    )
    t2 = time.perf_counter()
    return out, t2 - t0, t1 - t0


# ------------------------------------------------------------------------------------------------- data
def synthetic_counts(n_cells: int, n_genes: int, density: float, seed: int) -> sp.csr_matrix:
    """Negative-binomial-like counts at the given density, log1p, CSR float64 (no cell is empty)."""
    rng = np.random.default_rng(seed)
    X = sp.random(
        n_cells,
        n_genes,
        density=density,
        format="csr",
        random_state=rng,
        data_rvs=lambda k: 1.0 + rng.negative_binomial(1, 0.3, size=k),
    )
    X.data = np.log1p(X.data)
    return X.astype(np.float64)


def tie_free(n_cells: int, n_genes: int, density: float, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    return sp.random(
        n_cells, n_genes, density=density, format="csr", random_state=rng, data_rvs=lambda k: 0.1 + rng.random(k) * 5.0
    ).astype(np.float64)


def ours_cells(tokenized) -> list[tuple[np.ndarray, np.ndarray]]:
    return [tokenized.cell(i) for i in range(len(tokenized))]


def reference_cells(out: dict, pad_id: int) -> list[tuple[np.ndarray, np.ndarray]]:
    genes, values = out["genes"].numpy(), out["values"].numpy()
    cells = []
    for g, v in zip(genes, values, strict=True):
        keep = g != pad_id
        cells.append((g[keep], v[keep]))
    return cells


def compare(ours: list, ref: list) -> tuple[bool, float, int]:
    """(same genes in the same order for every cell, % of identical bins, cells compared)."""
    same, equal, total = True, 0, 0
    for (g1, v1), (g2, v2) in zip(ours, ref, strict=True):
        if len(g1) != len(g2) or not np.array_equal(g1, g2):
            same = False
            continue
        equal += int((v1 == v2).sum())
        total += len(v1)
    return same, 100.0 * equal / max(total, 1), len(ours)


def subsample_ok(sub: list, full: list, max_len: int) -> bool:
    for (gs, vs), (gf, vf) in zip(sub, full, strict=True):
        if len(gs) != min(len(gf), max_len) or gs[0] != gf[0]:
            return False
        pairs = set(zip(gf.tolist(), vf.tolist(), strict=True))
        if not set(zip(gs.tolist(), vs.tolist(), strict=True)) <= pairs:
            return False
    return True


def collate_all(tokenizer: ScGPTTokenizer, tokenized, batch: int) -> None:
    for start in range(0, len(tokenized), batch):
        tokenizer.collate([tokenized.cell(i) for i in range(start, min(start + batch, len(tokenized)))])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--n-bins", type=int, default=51)
    parser.add_argument(
        "--max-lens",
        type=int,
        nargs="+",
        default=[3001, 257],
        help="max_seq_len settings; 3001 (scGPT's) subsamples nothing here, 257 subsamples every cell",
    )
    parser.add_argument("--batch", type=int, default=64, help="batch size of the collate pass")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed repeats of ours (median); the reference runs once"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--suffix", default="", help="appended to the result file names")
    args = parser.parse_args(argv)

    genes = [f"G{i:05d}" for i in range(args.genes)]
    vocab = GeneVocab.from_genes(genes)
    t0 = time.perf_counter()
    X = synthetic_counts(args.cells, args.genes, args.density, args.seed)
    print(
        f"input: {X.shape[0]:,} cells x {X.shape[1]:,} genes, {X.nnz / np.prod(X.shape):.1%} non-zero, "
        f"{np.diff(X.indptr).min()}-{np.diff(X.indptr).max()} genes per cell ({time.perf_counter() - t0:.1f} s to make)",
        flush=True,
    )

    rows, full_tokens = [], {}
    for max_len in args.max_lens:
        tokenizer = ScGPTTokenizer(vocab=vocab, n_bins=args.n_bins, max_seq_len=max_len)
        times, times_collate = [], []
        for _ in range(args.repeats):
            with contextlib.redirect_stdout(io.StringIO()):
                t0 = time.perf_counter()
                tokenized = tokenizer.tokenize(X, genes, seed=args.seed)
                t1 = time.perf_counter()
                collate_all(tokenizer, tokenized, args.batch)
                t2 = time.perf_counter()
            times.append(t1 - t0)
            times_collate.append(t2 - t0)
        ours_s, ours_collate_s = statistics.median(times), statistics.median(times_collate)
        ref_out, ref_s, ref_bin_s = reference(X, genes, tokenizer, max_len=max_len, seed=args.seed)
        ours_list, ref_list = ours_cells(tokenized), reference_cells(ref_out, vocab.pad_id)
        n_sub = int((np.diff(X.indptr) + 1 > max_len).sum())
        row = {
            "setting": f"max_len {max_len} ({n_sub:,} cells subsampled)",
            "cells": args.cells,
            "genes": args.genes,
            "density": args.density,
            "max_len": max_len,
            "ours_s": ours_s,
            "ours_cells_per_s": args.cells / ours_s,
            "ours_with_collate_s": ours_collate_s,
            "ours_times_s": " ".join(f"{t:.3f}" for t in times),
            "reference_s": ref_s,
            "reference_binning_s": ref_bin_s,
            "reference_cells_per_s": args.cells / ref_s,
            "speedup": ref_s / ours_s,
            "speedup_with_collate": ref_s / ours_collate_s,
        }
        if n_sub == 0:
            same, pct, _ = compare(ours_list, ref_list)
            row["same_genes"], row["bins_equal_pct"] = same, pct
            full_tokens[max_len] = (ours_list, ref_list)
        else:
            base = next(iter(full_tokens.values()), None)
            if base is not None:
                row["same_genes"] = subsample_ok(ours_list, base[0], max_len) and subsample_ok(
                    ref_list, base[1], max_len
                )
                row["subsample_check"] = (
                    "kept (gene, bin) pairs are a subset of the unsubsampled cell, lengths min(n+1, max_len)"
                )
        rows.append(row)
        print(
            f"  max_len {max_len}: ours {ours_s:.2f} s ({row['ours_cells_per_s']:,.0f} cells/s), "
            f"reference {ref_s:.2f} s ({row['reference_cells_per_s']:,.0f} cells/s): {row['speedup']:.1f}x",
            flush=True,
        )
        del ref_out, ref_list

    # Tie-free input: the two must agree exactly.
    n_tf = min(args.cells, 2_000)
    X_tf = tie_free(n_tf, args.genes, args.density, args.seed + 1)
    tokenizer = ScGPTTokenizer(vocab=vocab, n_bins=args.n_bins, max_seq_len=max(args.max_lens))
    with contextlib.redirect_stdout(io.StringIO()):
        t0 = time.perf_counter()
        tok_tf = tokenizer.tokenize(X_tf, genes, seed=args.seed)
        tf_ours_s = time.perf_counter() - t0
    ref_tf, tf_ref_s, tf_ref_bin_s = reference(X_tf, genes, tokenizer, max_len=max(args.max_lens), seed=args.seed)
    same, pct, _ = compare(ours_cells(tok_tf), reference_cells(ref_tf, vocab.pad_id))
    rows.append(
        {
            "setting": f"tie-free check ({n_tf:,} cells, max_len {max(args.max_lens)})",
            "cells": n_tf,
            "genes": args.genes,
            "density": args.density,
            "max_len": max(args.max_lens),
            "ours_s": tf_ours_s,
            "ours_cells_per_s": n_tf / tf_ours_s,
            "reference_s": tf_ref_s,
            "reference_binning_s": tf_ref_bin_s,
            "reference_cells_per_s": n_tf / tf_ref_s,
            "speedup": tf_ref_s / tf_ours_s,
            "same_genes": same,
            "bins_equal_pct": pct,
        }
    )
    print(f"  tie-free check: same genes {same}, {pct:.2f}% identical bins", flush=True)

    notes = [
        f"input: {args.cells:,} cells x {args.genes:,} genes, {args.density:.0%} non-zero, counts 1 + NB(1, 0.3), log1p, "
        f"seed {args.seed}; n_bins {args.n_bins}",
        "ours_s: `ScGPTTokenizer.tokenize` (median of "
        f"{args.repeats}); ours_with_collate_s adds `collate` of every cell in batches of {args.batch}; "
        "reference_s: upstream-style per-cell binning + tokenize_and_pad_batch (pads every cell to max_len), once; "
        "reference_binning_s is its binning part",
        "speedup = reference_s / ours_s; same_genes: identical gene sequences per cell (subsampled rows: subset check); "
        "bins_equal_pct: identical bins where genes match (differences are ties, placed at random by both)",
    ]
    _common.write_results(
        "tokenize" + args.suffix, rows, COLUMNS, title="Tokenisation: ours vs per-cell reference", notes=notes
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
