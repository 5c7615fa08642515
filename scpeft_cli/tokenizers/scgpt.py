"""scGPT tokenisation: per-cell quantile binning of non-zero genes, `<cls>` first, seeded subsampling.

Computed once per run over the whole sparse matrix by compiled per-cell loops (`kernels`, no Python
loop) and stored ragged, so batches are padded only to their own longest cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from scpeft_cli.tokenizers import kernels
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


def _sort_keys(data: np.ndarray) -> np.ndarray:
    """The values' bits as signed integers where all are non-negative (same order, faster sort), else the values."""
    if data.size and data.min() < 0:
        return data
    return data.view(np.int32 if data.dtype == np.float32 else np.int64)


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
        X = sp.csr_matrix(X)  # a CSR matrix is used as it is, not copied
        if not X.has_sorted_indices:
            X = X.sorted_indices()
        data = X.data  # the data's own float type, as upstream bins it
        if data.dtype not in (np.float32, np.float64):
            data = data.astype(np.float64)
        column_token = np.full(X.shape[1], -1, dtype=np.int64)
        column_token[columns] = token_ids
        lengths = kernels.kept_per_cell(X.indptr, X.indices, data, column_token)
        kept_indptr = np.concatenate([[0], np.cumsum(lengths)])
        keep_per_cell = self.max_seq_len - 1
        out_indptr = np.concatenate([[0], np.cumsum(1 + np.minimum(lengths, keep_per_cell))])

        rng = np.random.default_rng(seed)
        bin_uniforms = rng.random(kept_indptr[-1])
        subsampled = lengths.max(initial=0) > keep_per_cell
        keep_uniforms = rng.random(kept_indptr[-1]) if subsampled else np.empty(0)
        gene_ids, values = kernels.tokenize_cells(
            X.indptr, X.indices, data, _sort_keys(data), column_token, kept_indptr, out_indptr,
            np.linspace(0, 1, self.n_bins - 1), bin_uniforms, keep_uniforms, keep_per_cell, self.vocab.cls_id, self.cls_value,
        )  # fmt: skip
        return TokenizedCells(
            indptr=out_indptr, gene_ids=gene_ids, values=values, genes_matched=len(columns), genes_total=len(genes)
        )

    def collate(self, cells: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
        """Right-pad a batch to its longest cell with `<pad>` / pad_value; mask is True at padding."""
        width = max(len(ids) for ids, _ in cells)
        gene_ids = torch.full((len(cells), width), self.vocab.pad_id, dtype=torch.long)
        values = torch.full((len(cells), width), self.pad_value, dtype=torch.float32)
        for row, (ids, vals) in enumerate(cells):
            gene_ids[row, : len(ids)] = torch.from_numpy(ids)
            values[row, : len(vals)] = torch.from_numpy(vals)
        return {"gene_ids": gene_ids, "values": values, "padding_mask": gene_ids == self.vocab.pad_id}
