"""scGPT tokenisation: per-cell quantile binning of non-zero genes, `<cls>` first, seeded subsampling.

Computed once per run over the whole sparse matrix (no per-cell Python loop) and stored ragged,
so batches are padded only to their own longest cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from scpeft_cli.tokenizers.vocab import GeneVocab


@dataclass(frozen=True)
class TokenizedCells:
    """Ragged tokens: cell i owns `gene_ids[indptr[i]:indptr[i+1]]` and the matching `values`."""

    indptr: np.ndarray
    gene_ids: np.ndarray
    values: np.ndarray
    genes_matched: int = 0  # data genes found in the vocabulary
    genes_total: int = 0

    def __len__(self) -> int:
        return len(self.indptr) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        start, stop = self.indptr[i], self.indptr[i + 1]
        return self.gene_ids[start:stop], self.values[start:stop]


def _ragged_to_dense(X: sp.csr_matrix, data: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Per-cell rows of `data` (aligned with X's stored entries), padded with +inf; and the entries' slots."""
    counts = np.diff(X.indptr)
    rows = np.repeat(np.arange(X.shape[0]), counts)
    position = np.arange(X.nnz) - X.indptr[rows]
    dense = np.full((X.shape[0], max(int(counts.max(initial=0)), 1)), np.inf, dtype=data.dtype)
    dense[rows, position] = data
    return dense, (rows, position)


def quantile_bins(X: sp.csr_matrix, n_bins: int, rng: np.random.Generator) -> np.ndarray:
    """Bin codes 1..n_bins-1 for every stored value of X, aligned with `X.data`.

    Per cell: edges are the quantiles of its non-zero values at linspace(0, 1, n_bins - 1) (numpy's
    linear method); a value between the left and right digitisation of equal edges is placed at random,
    as upstream scGPT does, with the given generator so the result is reproducible.
    """
    dense, slots = _ragged_to_dense(X, X.data)
    order = np.argsort(dense, axis=1)
    ordered = np.take_along_axis(dense, order, axis=1)

    # Quantile edges, computed exactly as numpy.quantile does so that ties give identical floats.
    last = np.maximum(np.diff(X.indptr) - 1, 0)[:, None]
    virtual = last * np.linspace(0, 1, n_bins - 1)[None, :]
    lower = np.floor(virtual).astype(np.int64)
    upper = np.minimum(lower + 1, last)
    gamma = virtual - lower
    low_vals = np.take_along_axis(ordered, lower, axis=1)
    high_vals = np.take_along_axis(ordered, upper, axis=1)
    diff = high_vals - low_vals
    edges = np.where(gamma >= 0.5, high_vals - diff * (1 - gamma), low_vals + diff * gamma)
    # Searching in the data's own precision: an edge is at least 1/49 of a gap away from both
    # neighbouring values (or on one), so rounding it cannot reorder them.
    edges = torch.from_numpy(edges.astype(dense.dtype))

    # np.digitize(x, edges) counts the edges <= x (right=True: < x). With the values sorted, the
    # value at position j has edge k <= it iff j >= #values < edge k: search the few edges among the
    # many values, histogram those positions and take running sums.
    sorted_values = torch.from_numpy(ordered)
    width = dense.shape[1]

    def edges_below(positions: torch.Tensor) -> np.ndarray:
        counts = torch.zeros(len(dense), width + 1, dtype=torch.int32).scatter_add_(1, positions, torch.ones_like(positions, dtype=torch.int32))
        in_sorted_order = torch.cumsum(counts, dim=1, dtype=torch.int32)[:, :width].numpy()
        in_cell_order = np.empty_like(in_sorted_order)
        np.put_along_axis(in_cell_order, order, in_sorted_order, axis=1)
        return in_cell_order[slots]

    left = edges_below(torch.searchsorted(sorted_values, edges, right=False))
    right = edges_below(torch.searchsorted(sorted_values, edges, right=True))
    return np.ceil(rng.random(X.nnz) * (right - left) + left).astype(np.int64)


def _subsample_mask(X: sp.csr_matrix, keep_per_cell: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask over X's stored entries keeping at most `keep_per_cell` random entries of each cell."""
    if np.diff(X.indptr).max(initial=0) <= keep_per_cell:
        return np.ones(X.nnz, dtype=bool)
    keys, slots = _ragged_to_dense(X, rng.random(X.nnz))
    if keys.shape[1] <= keep_per_cell:
        return np.ones(X.nnz, dtype=bool)
    threshold = np.partition(keys, keep_per_cell - 1, axis=1)[:, keep_per_cell - 1]
    return keys[slots] <= threshold[slots[0]]


@dataclass(frozen=True)
class ScGPTTokenizer:
    """AnnData expression -> scGPT inputs (`<cls>` + binned non-zero genes), and batch padding."""

    vocab: GeneVocab
    n_bins: int = 51
    max_seq_len: int = 3001
    pad_value: float = -2.0
    cls_value: float = 0.0

    def tokenize(self, X: sp.spmatrix, genes: Sequence[str], *, seed: int) -> TokenizedCells:
        columns, token_ids = self.vocab.map_genes(list(genes))
        X = sp.csr_matrix(X[:, columns])  # the data's own float type, as upstream bins it
        X.eliminate_zeros()
        X.sort_indices()
        rng = np.random.default_rng(seed)
        codes = quantile_bins(X, self.n_bins, rng)
        keep = _subsample_mask(X, self.max_seq_len - 1, rng)

        n_cells = X.shape[0]
        rows = np.repeat(np.arange(n_cells), np.diff(X.indptr))[keep]
        kept_counts = np.bincount(rows, minlength=n_cells)
        indptr = np.concatenate([[0], np.cumsum(kept_counts + 1)])
        gene_ids = np.empty(indptr[-1], dtype=np.int64)
        values = np.empty(indptr[-1], dtype=np.float32)
        gene_ids[indptr[:-1]] = self.vocab.cls_id
        values[indptr[:-1]] = self.cls_value
        within = np.arange(len(rows)) - np.concatenate([[0], np.cumsum(kept_counts)])[rows]
        slots = indptr[rows] + 1 + within
        gene_ids[slots] = token_ids[X.indices[keep]]
        values[slots] = codes[keep]
        return TokenizedCells(indptr=indptr, gene_ids=gene_ids, values=values, genes_matched=len(columns), genes_total=len(genes))

    def collate(self, cells: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
        """Right-pad a batch to its longest cell with `<pad>` / pad_value; mask is True at padding."""
        width = max(len(ids) for ids, _ in cells)
        gene_ids = torch.full((len(cells), width), self.vocab.pad_id, dtype=torch.long)
        values = torch.full((len(cells), width), self.pad_value, dtype=torch.float32)
        for row, (ids, vals) in enumerate(cells):
            gene_ids[row, : len(ids)] = torch.from_numpy(ids)
            values[row, : len(vals)] = torch.from_numpy(vals)
        return {"gene_ids": gene_ids, "values": values, "padding_mask": gene_ids == self.vocab.pad_id}
