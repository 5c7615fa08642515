"""Our vectorised Geneformer rank-value tokenisation vs a per-cell reference written as upstream Geneformer does it.

    python benchmarks/bench_tokenize_geneformer.py
    python benchmarks/bench_tokenize_geneformer.py --cells 5000 --suffix _quick

Input: synthetic raw counts, `--cells` x `--genes` at `--density` non-zero (1 + NB(1, 0.3), seeded), CSR
float32 as an h5ad holds them; a token dictionary of Ensembl-like ids in an order unrelated to the
columns; the medians `gene_medians` gives over these cells (as for a random model: many genes share a
median, so cells have ties).

- ours: `RankValueTokenizer.tokenize(X, genes, seed=0)` (compiled per-cell loops over the CSR matrix, cells in
  parallel, ragged output); also timed with `collate` of every cell in batches of `--batch`;
- reference: upstream `TranscriptomeTokenizer.tokenize_loom` + `create_dataset` steps: dense chunks of 512
  cells, normalised by n_counts * 10,000 / medians, then per cell `tokenize_cell` (non-zero genes,
  `np.argsort(-v)`) and `format_cell_features` (truncate, `np.insert` of `<cls>` / `<eos>` for V2);
  also upstream's AnnData path (`tokenize_anndata`: the same on sparse chunks, per cell `rank_genes`
  on CSR rows), which is what upstream runs on an .h5ad.

Checks: every cell's tokens equal the loom-path reference's when its argsort is stable (our documented
tie rule: column order); against the AnnData path (stable argsort; its scipy sparse division rounds
differently) and upstream's default (unstable) argsort, the share of identical cells is shown.
Writes benchmarks/results/tokenize_geneformer.csv / .md.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from scpeft_cli.tokenizers.geneformer import GeneformerVocab, RankValueTokenizer, gene_medians  # noqa: E402

COLUMNS = [
    "setting",
    "ours_s",
    "ours_cells_per_s",
    "ours_with_collate_s",
    "reference_s",
    "reference_cells_per_s",
    "speedup",
    "speedup_with_collate",
    "reference_h5ad_s",
    "speedup_vs_h5ad",
    "cpu_time_ratio",
    "same_as_stable_reference",
    "cells_equal_stable_h5ad_pct",
    "cells_equal_default_argsort_pct",
]
CHUNK = 512  # upstream's scan / chunk size


def _formatted(ids, *, model_input_size, cls_id, eos_id):
    """upstream `create_dataset.format_cell_features`: truncate; V2 `<cls>` first and `<eos>` last."""
    if cls_id is None:
        return ids[:model_input_size]
    ids = ids[: model_input_size - 2]
    ids = np.insert(ids, 0, cls_id)
    return np.insert(ids, len(ids), eos_id)


def reference_loom(X: sp.csr_matrix, column_tokens, medians, totals, *, kind=None, **specials):
    """upstream `tokenize_loom`: dense chunks of counts / n_counts * 10,000 / medians, then per cell
    `tokenize_cell` (non-zero genes by np.argsort(-v); `kind` None: numpy's default, as upstream)."""
    cells = []
    for start in range(0, X.shape[0], CHUNK):
        view = X[start : start + CHUNK].toarray()
        norm = view / totals[start : start + CHUNK, None] * 10_000 / medians
        for vector in norm:
            nonzero = np.nonzero(vector)[0]
            order = np.argsort(-vector[nonzero]) if kind is None else np.argsort(-vector[nonzero], kind=kind)
            cells.append(_formatted(column_tokens[nonzero][order], **specials))
    return cells


def reference_h5ad(X: sp.csr_matrix, column_tokens, medians, totals, *, kind=None, **specials):
    """upstream `tokenize_anndata`: sparse chunks normalised alike, then per cell `rank_genes` on the
    chunk's CSR rows (`X_norm[i].data`, `X_norm[i].indices`)."""
    cells = []
    for start in range(0, X.shape[0], CHUNK):
        X_view = X[start : start + CHUNK]
        X_norm = sp.csr_matrix(X_view / totals[start : start + CHUNK, None] * 10_000 / medians)
        for i in range(X_norm.shape[0]):
            values = -X_norm[i].data
            ids = column_tokens[X_norm[i].indices][
                np.argsort(values) if kind is None else np.argsort(values, kind=kind)
            ]
            cells.append(_formatted(ids, **specials))
    return cells


def synthetic_counts(n_cells: int, n_genes: int, density: float, seed: int) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    X = sp.random(
        n_cells, n_genes, density=density, format="csr", random_state=rng,
        data_rvs=lambda k: 1.0 + rng.negative_binomial(1, 0.3, size=k),
    )  # fmt: skip
    return X.astype(np.float32)


def make_tokenizer(genes, medians, *, v2: bool, model_input_size: int, seed: int) -> RankValueTokenizer:
    specials = ["<pad>", "<mask>", *(["<cls>", "<eos>"] if v2 else [])]
    shuffled = [genes[i] for i in np.random.default_rng(seed).permutation(len(genes))]
    token_to_id = {t: i for i, t in enumerate([*specials, *shuffled])}
    return RankValueTokenizer(
        GeneformerVocab(token_to_id), dict(zip(genes, medians.tolist(), strict=True)), model_input_size
    )


def ours_cells(tokens) -> list[np.ndarray]:
    return [tokens.cell(i)[0] for i in range(len(tokens))]


def equal_pct(ours, ref) -> float:
    return 100.0 * sum(np.array_equal(a, b) for a, b in zip(ours, ref, strict=True)) / max(len(ours), 1)


def time_ours(tokenizer, X, genes, totals, *, repeats: int, batch: int):
    """(median tokenize seconds, its CPU seconds, seconds with the collate pass, the tokens) over `repeats` runs."""
    times, cpu_times, times_collate = [], [], []
    with contextlib.redirect_stdout(io.StringIO()):
        for _ in range(repeats):
            t0, cpu0 = time.perf_counter(), time.process_time()
            tokens = tokenizer.tokenize(X, genes, seed=0, totals=totals)
            t1, cpu1 = time.perf_counter(), time.process_time()
            for start in range(0, len(tokens), batch):
                tokenizer.collate([tokens.cell(i) for i in range(start, min(start + batch, len(tokens)))])
            times.append(t1 - t0)
            cpu_times.append(cpu1 - cpu0)
            times_collate.append(time.perf_counter() - t0)
    return statistics.median(times), statistics.median(cpu_times), statistics.median(times_collate), tokens


def timed(function, *args, **kwargs):
    """(wall seconds, CPU seconds of the process, the result)."""
    t0, cpu0 = time.perf_counter(), time.process_time()
    out = function(*args, **kwargs)
    return time.perf_counter() - t0, time.process_time() - cpu0, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=20_000)
    parser.add_argument("--genes", type=int, default=2_000)
    parser.add_argument("--density", type=float, default=0.3)
    parser.add_argument("--batch", type=int, default=64, help="batch size of the collate pass")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (ours, reference, h5ad reference) per setting")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of ours per round (median)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--suffix", default="", help="appended to the result file names")
    args = parser.parse_args(argv)

    genes = [f"ENSG{i:011d}" for i in range(args.genes)]
    X = synthetic_counts(args.cells, args.genes, args.density, args.seed)
    totals = np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()  # obs["n_counts"]
    medians = gene_medians(X, totals)
    print(
        f"input: {X.shape[0]:,} cells x {X.shape[1]:,} genes, {X.nnz / np.prod(X.shape):.1%} non-zero, "
        f"{np.diff(X.indptr).min()}-{np.diff(X.indptr).max()} genes per cell, "
        f"{len(np.unique(medians)):,} distinct medians",
        flush=True,
    )
    settings = [
        ("V2, model_input_size 4096", True, 4096),
        ("V2, model_input_size 256 (every cell truncated)", True, 256),
        ("V1, model_input_size 2048", False, 2048),
    ]
    rows = []
    for label, v2, size in settings:
        tokenizer = make_tokenizer(genes, medians, v2=v2, model_input_size=size, seed=args.seed)
        with contextlib.redirect_stdout(io.StringIO()):
            tokenizer.tokenize(X[:10], genes, seed=0)  # compilation (cached on disk after the first run)
        vocab = tokenizer.vocab
        column_tokens = vocab.lookup(genes)
        column_medians = np.array([tokenizer.medians[g] for g in genes])
        specials = {"cls_id": vocab.cls_id, "eos_id": vocab.eos_id, "model_input_size": size}
        rounds = []  # (ours, ours with collate, reference, h5ad reference, ours CPU, reference CPU) seconds
        tokens = ref = ref_h5ad = None
        for _ in range(args.rounds):
            tokens = ref = ref_h5ad = None  # each round starts from the same free memory
            ours_s, ours_cpu_s, ours_collate_s, tokens = time_ours(
                tokenizer, X, genes, totals, repeats=args.repeats, batch=args.batch
            )
            ref_s, ref_cpu_s, ref = timed(reference_loom, X, column_tokens, column_medians, totals, **specials)
            ref_h5ad_s, _, ref_h5ad = timed(reference_h5ad, X, column_tokens, column_medians, totals, **specials)
            rounds.append((ours_s, ours_collate_s, ref_s, ref_h5ad_s, ours_cpu_s, ref_cpu_s))
        stable = reference_loom(X, column_tokens, column_medians, totals, **specials, kind="stable")
        stable_h5ad = reference_h5ad(X, column_tokens, column_medians, totals, **specials, kind="stable")
        ours = ours_cells(tokens)
        ours_s, ours_collate_s, ref_s, ref_h5ad_s, ours_cpu_s, ref_cpu_s = (
            statistics.median(r[k] for r in rounds) for k in range(6)
        )
        row = {
            "setting": label,
            "cells": args.cells,
            "genes": args.genes,
            "density": args.density,
            "ours_s": ours_s,
            "ours_cells_per_s": args.cells / ours_s,
            "ours_with_collate_s": ours_collate_s,
            "reference_s": ref_s,
            "reference_cells_per_s": args.cells / ref_s,
            "speedup": statistics.median(r[2] / r[0] for r in rounds),
            "speedup_with_collate": statistics.median(r[2] / r[1] for r in rounds),
            "reference_h5ad_s": ref_h5ad_s,
            "speedup_vs_h5ad": statistics.median(r[3] / r[0] for r in rounds),
            "ours_cpu_s": ours_cpu_s,
            "reference_cpu_s": ref_cpu_s,
            "cpu_time_ratio": statistics.median(r[5] / r[4] for r in rounds),
            "speedups_per_round": " ".join(f"{r[2] / r[0]:.2f}" for r in rounds),
            "speedups_vs_h5ad_per_round": " ".join(f"{r[3] / r[0]:.2f}" for r in rounds),
            "same_as_stable_reference": equal_pct(ours, stable) == 100.0,
            "cells_equal_stable_h5ad_pct": equal_pct(ours, stable_h5ad),
            "cells_equal_default_argsort_pct": equal_pct(ours, ref),
            "load_average_1min": os.getloadavg()[0],
        }
        rows.append(row)
        print(
            f"  {label}: ours {ours_s:.3f} s ({row['ours_cells_per_s']:,.0f} cells/s), reference {ref_s:.2f} s "
            f"({row['reference_cells_per_s']:,.0f} cells/s): {row['speedup']:.1f}x, h5ad path {ref_h5ad_s:.2f} s: "
            f"{row['speedup_vs_h5ad']:.1f}x; same as stable reference: {row['same_as_stable_reference']}",
            flush=True,
        )

    notes = [
        f"input: {args.cells:,} cells x {args.genes:,} genes, {args.density:.0%} non-zero, counts 1 + NB(1, 0.3) "
        f"(float32 CSR), seed {args.seed}; medians from `gene_medians` over the cells "
        f"({len(np.unique(medians)):,} distinct: ties)",
        f"{args.rounds} rounds per setting, each: ours (`RankValueTokenizer.tokenize` with the cells' totals, median of "
        f"{args.repeats}; ours_with_collate_s adds `collate` of every cell in batches of {args.batch}), then "
        f"reference_s (upstream's loom path: dense chunks of {CHUNK} normalised, per cell tokenize_cell + "
        "format_cell_features), then reference_h5ad_s (upstream's AnnData path: sparse chunks normalised, per cell "
        "rank_genes on CSR rows); times are medians over the rounds",
        "speedup / speedup_vs_h5ad: median over the rounds of reference / ours within a round (the CSV has each "
        "round); cpu_time_ratio: the same for the process's CPU time against the loom-path reference (the work "
        "ratio: ours runs on every core, the reference on one); same_as_stable_reference: identical tokens in every "
        "cell against the loom-path reference with a stable "
        "argsort (our tie rule); cells_equal_default_argsort_pct: against upstream's default argsort (ties in "
        "arbitrary order); cells_equal_stable_h5ad_pct: against the AnnData path with a stable argsort, whose "
        "scipy sparse division rounds differently from `count / n_counts * 10,000 / median` (it multiplies by "
        "reciprocals), so a few near-ties order differently",
    ]
    _common.write_results(
        "tokenize_geneformer" + args.suffix,
        rows,
        COLUMNS,
        title="Geneformer tokenisation: ours vs per-cell reference",
        notes=notes,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
