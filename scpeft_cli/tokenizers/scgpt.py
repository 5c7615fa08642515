"""scGPT tokenisation: per-cell quantile binning of non-zero genes, `<cls>` first, seeded subsampling;
optionally every vocabulary gene a token, zeros included (upstream's `include_zero_gene`).

Computed once per run over the whole sparse matrix by compiled per-cell loops (`kernels`, no Python
loop) and stored ragged, so batches are padded only to their own longest cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from scpeft_cli.tokenizers import kernels
from scpeft_cli.tokenizers.base import TokenizedCells, pad_ids
from scpeft_cli.tokenizers.vocab import GeneVocab

VOCAB_FILE = "vocab.json"
FORMAT_VERSION = "2"  # 2: float32 data binned against float64 edges, as np.quantile gives them


def _sort_keys(data: np.ndarray) -> np.ndarray:
    """The values' bits as signed integers where all are non-negative (same order, faster sort), else the values."""
    if data.size and data.min() < 0:
        return data
    return data.view(np.int32 if data.dtype == np.float32 else np.int64)


@dataclass(frozen=True)
class ScGPTTokenizer:
    """AnnData expression -> scGPT inputs (`<cls>` + binned non-zero genes), and batch padding.

    Reads log-normalised values: binning is per cell, so normalisation matters only through the gene set.
    `include_zero_genes` makes every vocabulary gene of the data a token of every cell, zeros as value 0
    and bins still from the non-zero values, as scGPT's batch-integration tutorial tokenises.
    `value_binning=False` keeps the log-normalised values themselves (scGPT's perturbation model reads
    and predicts them); `max_seq_len=None` keeps every gene.
    """

    vocab: GeneVocab
    n_bins: int = 51
    max_seq_len: int | None = 3001
    pad_value: float = -2.0
    cls_value: float = 0.0
    include_zero_genes: bool = False
    value_binning: bool = True
    input_kind = "log_normalized"

    def cache_settings(self) -> tuple:
        vocab = "\0".join(f"{k}={v}" for k, v in sorted(self.vocab.token_to_id.items()))
        return (FORMAT_VERSION, type(self).__name__, self.n_bins, self.max_seq_len, self.pad_value, self.cls_value,
                self.include_zero_genes, self.value_binning, vocab)

    def save(self, directory: Path) -> None:
        self.vocab.to_json(Path(directory) / VOCAB_FILE)

    def tokenize(self, X: sp.spmatrix, genes: Sequence[str], *, seed: int, totals: np.ndarray | None = None) -> TokenizedCells:
        columns, token_ids = self.vocab.map_genes(list(genes))
        X = sp.csr_matrix(X)  # a CSR matrix is used as it is, not copied
        if not X.has_sorted_indices:
            X = X.sorted_indices()
        data = X.data  # the data's own float type, as upstream bins it
        if data.dtype not in (np.float32, np.float64):
            data = data.astype(np.float64)
        column_token = np.full(X.shape[1], -1, dtype=np.int64)
        column_token[columns] = token_ids
        nonzero = kernels.kept_per_cell(X.indptr, X.indices, data, column_token)
        nonzero_indptr = np.concatenate([[0], np.cumsum(nonzero)])
        lengths = np.full(X.shape[0], len(columns)) if self.include_zero_genes else nonzero
        keep_per_cell = int(lengths.max(initial=0)) if self.max_seq_len is None else self.max_seq_len - 1
        out_indptr = np.concatenate([[0], np.cumsum(1 + np.minimum(lengths, keep_per_cell))])

        rng = np.random.default_rng(seed)
        bin_uniforms = rng.random(nonzero_indptr[-1])
        # Subsampling reads `keep_per_cell` uniforms of a cell. Without zero genes the draw keeps its first
        # layout (one per entry, so tokens stay as they were); with them, only those read (memory ~ output).
        keep_indptr = nonzero_indptr
        if self.include_zero_genes:
            keep_indptr = np.concatenate([[0], np.cumsum(np.minimum(lengths, keep_per_cell))])
        subsampled = lengths.max(initial=0) > keep_per_cell
        keep_uniforms = rng.random(keep_indptr[-1]) if subsampled else np.empty(0)
        gene_ids, values = kernels.tokenize_cells(
            X.indptr, X.indices, data, _sort_keys(data), column_token, self.include_zero_genes, nonzero_indptr,
            keep_indptr, out_indptr, np.linspace(0, 1, self.n_bins - 1), bin_uniforms, keep_uniforms,
            keep_per_cell, self.vocab.cls_id, self.cls_value, self.value_binning,
        )  # fmt: skip
        return TokenizedCells(
            indptr=out_indptr, gene_ids=gene_ids, values=values, genes_matched=len(columns), genes_total=len(genes)
        )

    def collate(self, cells: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
        """Right-pad a batch to its longest cell with `<pad>` / pad_value; mask is True at padding."""
        gene_ids, padding_mask = pad_ids(cells, self.vocab.pad_id)
        values = torch.full(gene_ids.shape, self.pad_value, dtype=torch.float32)
        for row, (_, vals) in enumerate(cells):
            values[row, : len(vals)] = torch.from_numpy(vals)
        return {"gene_ids": gene_ids, "values": values, "padding_mask": padding_mask}
