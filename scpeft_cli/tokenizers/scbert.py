"""scBERT tokenisation: every cell as its binned expression over a fixed gene panel, plus one token 0.

What upstream (`preprocess.py`, `predict.py`) does, and we do alike:
- the panel is the var_names of the release's `panglao_10000.h5ad`, in that order; each panel position
  takes the FIRST data column of that name (`obj.index(ref[i])`; later duplicates are ignored), panel
  genes absent from the data are zeros and data genes outside the panel are dropped (a gene named twice
  in the panel fills both positions, and counts twice in the total, as the reordered matrix does);
- each cell is normalised to 10,000 over the panel genes (`normalize_total` on the reordered matrix),
  then log2(1 + x), and the token is min(floor(value), n_bins) (`full_seq[full_seq > 5] = 5; .long()`);
- one token 0 is appended, so every cell is exactly len(panel) + 1 tokens long; nothing is padded.

Representation in `TokenizedCells`: `gene_ids` holds the expression TOKENS (0..n_bins, int8), cell i
owning the len(panel) + 1 consecutive entries `indptr[i]:indptr[i+1]`; entry p of a cell is panel
position p (the positions are implicit, the model adds its gene2vec row p), the last is the appended 0.
`values` is None. `collate` stacks a batch into `tokens` (and `gene_ids`, the same tensor, which the
trainer counts cells by) of shape (batch, len(panel) + 1) and an all-False `padding_mask`.

Where we differ: the arithmetic is float64, count / (total / 1e4) then log2(1 + x), which is exact at
the bin edges (a normalised count of exactly 1, 3, 7, 15, 31 gives log2 = 1..5); upstream computes in
the data's float32 as log1p(x) / log(2), so a value within float32 rounding of an edge may fall in the
neighbouring bin there;
upstream's `filter_cells(min_genes=200)` is left to the data layer (a cell with panel total 0 is kept,
all tokens 0); `totals` and `seed` are unused (the normalisation is over the panel genes, and the
encoding is deterministic).

Also here, shared with scFoundation: the panel vocabulary and the panel reorder.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from scpeft_cli.artifacts import write_text
from scpeft_cli.errors import UserError
from scpeft_cli.tokenizers.base import TokenizedCells
from scpeft_cli.tokenizers.vocab import map_genes

PANEL_FILE = "scbert_panel.txt"
TARGET_SUM = 1e4
FORMAT_VERSION = "1"


@dataclass(frozen=True)
class PanelVocab:
    """A fixed gene panel as a vocabulary: gene -> its (first) panel position."""

    panel: tuple[str, ...]

    @cached_property
    def token_to_id(self) -> dict[str, int]:
        ids: dict[str, int] = {}
        for position, gene in enumerate(self.panel):
            ids.setdefault(gene, position)
        return ids

    @property
    def genes(self) -> list[str]:
        return list(self.token_to_id)

    @property
    def size(self) -> int:
        return len(self.panel)

    def lookup(self, genes: Sequence[str]) -> np.ndarray:
        """Panel position of each gene (its first, if the panel names it twice), -1 where it is not in the panel."""
        ids = self.token_to_id
        return np.array([ids.get(str(g), -1) for g in genes], dtype=np.int64)

    @cached_property
    def digest(self) -> str:
        return hashlib.blake2b("\0".join(self.panel).encode(), digest_size=20).hexdigest()


@dataclass(frozen=True)
class _FirstColumns:
    """The panel vocabulary as the tokenizer matches data genes: a data gene named again is unmatched
    (upstream takes the first column of a name)."""

    vocab: PanelVocab

    @property
    def genes(self) -> list[str]:
        return self.vocab.genes

    def lookup(self, genes: Sequence[str]) -> np.ndarray:
        ids = self.vocab.lookup(genes)
        seen: set[str] = set()
        for column, gene in enumerate(map(str, genes)):
            if gene in seen:
                ids[column] = -1
            seen.add(gene)
        return ids


def check_panel(panel: Sequence[str], what: str) -> tuple[str, ...]:
    panel = tuple(str(g) for g in panel)
    if not panel:
        raise UserError(f"the {what} gene panel is empty")
    if any(not g for g in panel):
        raise UserError(f"the {what} gene panel holds an empty gene name")
    return panel


@dataclass(frozen=True)
class PanelCounts:
    """The data's counts reordered to a panel: the non-zero entries (cell, panel position, count), cells in
    order and positions ascending within a cell, each cell's total over the panel positions, and the panel
    positions the data has a gene for (`filled`, ascending)."""

    rows: np.ndarray
    positions: np.ndarray
    counts: np.ndarray
    totals: np.ndarray
    genes_matched: int
    filled: np.ndarray


def panel_counts(vocab: PanelVocab, X: sp.spmatrix, genes: Sequence[str]) -> PanelCounts:
    """Reorder / zero-fill raw counts to the panel (logging the gene overlap; too small an overlap is a
    UserError). Counts must be finite and non-negative."""
    genes = [str(g) for g in genes]
    X = sp.csr_matrix(X)
    if X.shape[1] != len(genes):
        raise UserError(f"the matrix has {X.shape[1]} gene columns but {len(genes)} gene names were given")
    columns, _ = map_genes(_FirstColumns(vocab), genes)
    column_of = {genes[c]: int(c) for c in columns}
    source = np.array([column_of.get(g, -1) for g in vocab.panel], dtype=np.int64)
    filled = np.flatnonzero(source >= 0)  # panel positions the data fills, ascending
    sub = sp.csr_matrix(X[:, source[filled]])
    sub.sum_duplicates()  # also sorts each cell's entries, i.e. by panel position
    counts = np.asarray(sub.data, dtype=np.float64)
    if not np.all(np.isfinite(counts)) or (counts.size and counts.min() < 0):
        raise UserError("the raw counts hold negative or non-finite values; point data.layer at raw counts")
    rows = np.repeat(np.arange(sub.shape[0]), np.diff(sub.indptr))
    totals = np.bincount(rows, weights=counts, minlength=sub.shape[0])
    nonzero = counts > 0
    return PanelCounts(rows[nonzero], filled[sub.indices[nonzero]], counts[nonzero], totals, len(columns), filled)


def read_panel_h5ad(path: str | Path) -> tuple[str, ...]:
    """The var_names of an .h5ad file (scBERT's `panglao_10000.h5ad`), in order; its matrix is not read."""
    import anndata

    path = Path(path)
    try:
        adata = anndata.read_h5ad(path, backed="r")
    except Exception as err:  # any failure to open it means it is not a readable .h5ad file
        raise UserError(f"cannot read the gene panel from {path}: {type(err).__name__}: {err}".splitlines()[0]) from err
    try:
        panel = tuple(str(g) for g in adata.var_names)
    finally:
        adata.file.close()
    return check_panel(panel, str(path))


def read_panel_text(path: str | Path) -> tuple[str, ...]:
    """A panel written by `ScBERTTokenizer.save`: one gene per line, in panel order."""
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read the gene panel {path}: {err}") from err
    return check_panel(text.splitlines(), str(path))


@dataclass(frozen=True)
class ScBERTTokenizer:
    """Raw counts -> scBERT's fixed-length expression tokens over the panel (see the module notes)."""

    panel: tuple[str, ...]
    n_bins: int = 5
    input_kind = "counts"

    def __post_init__(self):
        object.__setattr__(self, "panel", check_panel(self.panel, "scBERT"))
        if not 1 <= self.n_bins <= 125:
            raise UserError(f"scBERT n_bins must be between 1 and 125, got {self.n_bins}")

    @classmethod
    def load_saved(cls, directory: str | Path, *, n_bins: int = 5) -> ScBERTTokenizer:
        """The tokenizer whose panel `save` wrote."""
        return cls(read_panel_text(Path(directory) / PANEL_FILE), n_bins)

    @property
    def num_tokens(self) -> int:
        """Rows of the token embedding: 0..n_bins, plus the mask token n_bins + 1."""
        return self.n_bins + 2

    @property
    def seq_len(self) -> int:
        return len(self.panel) + 1

    @cached_property
    def vocab(self) -> PanelVocab:
        return PanelVocab(self.panel)

    def cache_settings(self) -> tuple:
        return (FORMAT_VERSION, type(self).__name__, self.n_bins, len(self.panel), self.vocab.digest)

    def save(self, directory: Path) -> None:
        write_text(Path(directory) / PANEL_FILE, "".join(f"{g}\n" for g in self.panel))

    def tokenize(self, X: sp.spmatrix, genes: Sequence[str], *, seed: int, totals: np.ndarray | None = None) -> TokenizedCells:
        """`seed` and `totals` are unused: the encoding is deterministic and normalised over the panel genes."""
        found = panel_counts(self.vocab, X, genes)
        n_cells, width = len(found.totals), self.seq_len
        normalised = found.counts / (found.totals[found.rows] / TARGET_SUM)  # as normalize_total divides
        binned = np.floor(np.log2(1.0 + normalised))  # exact at the bin edges 2**k
        tokens = np.zeros((n_cells, width), dtype=np.int8)  # the appended token 0 included
        tokens[found.rows, found.positions] = np.minimum(binned, self.n_bins).astype(np.int8)
        return TokenizedCells(
            indptr=np.arange(n_cells + 1, dtype=np.int64) * width, gene_ids=tokens.reshape(-1),
            genes_matched=found.genes_matched, genes_total=len(genes),
        )  # fmt: skip

    def collate(self, cells: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> dict[str, torch.Tensor]:
        """Stack a batch (every cell has len(panel) + 1 tokens): `tokens` (also as `gene_ids`) and an
        all-False `padding_mask`."""
        lengths = {len(ids) for ids, _ in cells}
        if lengths != {self.seq_len}:
            raise ValueError(f"scBERT cells must have {self.seq_len} tokens, got lengths {sorted(lengths)}")
        tokens = torch.from_numpy(np.stack([np.asarray(ids) for ids, _ in cells]).astype(np.int64))
        return {"tokens": tokens, "gene_ids": tokens, "padding_mask": torch.zeros(tokens.shape, dtype=torch.bool)}
