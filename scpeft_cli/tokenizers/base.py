"""What every tokenizer hands to the rest of the tool: backbone-neutral tokenised cells and one contract.

A tokenizer turns a cells x genes matrix into ragged token ids (and, for backbones that embed
expression values, one value per token), says which input it needs (raw counts or log-normalised
values), which vocabulary it maps genes to, and which of its settings change its output (the cache key).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import scipy.sparse as sp
import torch

from scpeft_cli.errors import UserError

INPUT_KINDS = ("counts", "log_normalized")


@dataclass(frozen=True)
class TokenizedCells:
    """Ragged tokens: cell i owns `gene_ids[indptr[i]:indptr[i+1]]` (and the matching `values`, if any)."""

    indptr: np.ndarray
    gene_ids: np.ndarray
    values: np.ndarray | None = None
    genes_matched: int = 0  # data genes found in the vocabulary
    genes_total: int = 0

    def __len__(self) -> int:
        return len(self.indptr) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        start, stop = self.indptr[i], self.indptr[i + 1]
        return self.gene_ids[start:stop], None if self.values is None else self.values[start:stop]

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything needed to rebuild these tokens (`from_arrays`), e.g. for the on-disk cache."""
        arrays = {"indptr": self.indptr, "gene_ids": self.gene_ids,
                  "genes_matched": np.asarray(self.genes_matched), "genes_total": np.asarray(self.genes_total)}
        if self.values is not None:
            arrays["values"] = self.values
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray]) -> TokenizedCells:
        return cls(
            indptr=arrays["indptr"], gene_ids=arrays["gene_ids"], values=arrays["values"] if "values" in arrays else None,
            genes_matched=int(arrays["genes_matched"]), genes_total=int(arrays["genes_total"]),
        )


class Vocabulary(Protocol):
    """The gene -> token id map a tokenizer uses; `genes` excludes special tokens (for overlap reports)."""

    token_to_id: Mapping[str, int]

    @property
    def genes(self) -> list[str]: ...


class Tokenizer(Protocol):
    """AnnData expression -> model inputs. `input_kind`: which matrix `tokenize` expects (INPUT_KINDS)."""

    input_kind: str

    @property
    def vocab(self) -> Vocabulary: ...

    def cache_settings(self) -> tuple[Any, ...]:
        """Every setting that changes `tokenize`'s output, for the content-keyed cache."""

    def tokenize(self, X: sp.spmatrix, genes: Sequence[str], *, seed: int, totals: np.ndarray | None = None) -> TokenizedCells:
        """`totals`: each cell's total counts over all its genes (counts tokenizers), when known."""

    def collate(self, cells: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> dict[str, torch.Tensor]:
        """A padded batch with at least `gene_ids` and `padding_mask` (True at padding)."""

    def save(self, directory: Path) -> None:
        """Write the gene tables a random backbone built from data, for its builder's `saved=`."""


def pad_ids(cells: Sequence[tuple[np.ndarray, Any]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad the cells' token ids to the longest; (ids, mask True at padding)."""
    width = max(len(ids) for ids, _ in cells)
    gene_ids = torch.full((len(cells), width), pad_id, dtype=torch.long)
    for row, (ids, _) in enumerate(cells):
        gene_ids[row, : len(ids)] = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    return gene_ids, gene_ids == pad_id


COUNTS_LAYER = "counts"  # prepared data keep raw counts here when they are known (scpeft_cli.data.loading)
TOTALS_COLUMN = "scpeft_total_counts"  # each cell's total counts over all of the file's genes


def tokenizer_input(adata, tokenizer: Tokenizer) -> tuple[sp.csr_matrix, np.ndarray | None]:
    """The matrix a tokenizer reads from prepared data (raw counts or log-normalised X), with the cells'
    total counts for counts tokenizers."""
    if tokenizer.input_kind == "log_normalized":
        return adata.X, None
    if COUNTS_LAYER not in adata.layers:
        raise UserError(
            "this backbone tokenises raw counts, but the data holds log-normalised values and no per-cell totals "
            "to recover them; point data.layer at raw counts, or add the cells' total counts as obs['n_counts']"
        )
    return adata.layers[COUNTS_LAYER], adata.obs[TOTALS_COLUMN].to_numpy(dtype=np.float64)
