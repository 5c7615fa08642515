"""scFoundation tokenisation: a cell's non-zero panel genes as (panel position, log-normalised value),
then the target-depth token T and the depth token S.

What upstream `model/get_embedding.py` (single cell, `pre_normalized=F`, `tgthighres=t<T>`) does, and we
do alike:
- the cell is reordered / zero-filled to the 19,264 genes of `OS_scRNA_gene_index.19264.tsv`
  (`main_gene_selection`); a panel position takes the FIRST data column of its name (upstream's pandas
  selection breaks on duplicated data columns), data genes outside the panel are dropped;
- total = the cell's raw counts summed over the panel positions; x = log1p(count / total * 1e4);
- T (target depth) at position len(panel) and S = log10(total) at len(panel) + 1 are appended;
- the positions whose value is > 0 are kept, in position order (`gatherData`); upstream's tensor is
  float64 there (the appended S is a numpy float64) and the model casts it to float32 (`.float()`), so
  we compare in float64 and store float32, the values the value embedding receives.

S when total <= 1: upstream appends log10(total) unconditionally and then keeps only values > 0, so S
(log10(1) = 0, log10(x < 1) < 0, log10(0) = -inf) is dropped by that same filter; a cell with total 0
has NaN gene values (0 / 0), also dropped, so it is T alone. We do exactly that. (Upstream's pooling then
reads "the S token" as the last one and "T" as the second last, so for such a cell it takes T and a
gene: a model should find T and S by their position ids, as a padded batch needs anyway.)

Beyond upstream (which feeds every kept position): with `max_seq_len`, a cell with more kept positions
keeps T and S (when present) and a uniform random subset, without replacement, of max_seq_len - (1 or 2)
of its genes, still in panel order: a partial Fisher-Yates shuffle of the cell's genes (in panel order),
swap j <-> j + floor(u_j * (n - j)) for j < k, with uniforms from numpy's `default_rng(seed).random`,
k per cell over the limit, those cells in order (compiled, cells in parallel, thread-independent).

Representation in `TokenizedCells`: `gene_ids` = the kept panel positions (int32; T is len(panel), S is
len(panel) + 1), `values` = their values (float32). `collate` right-pads to the batch's longest cell
with position 0 and value `pad_value` (103, upstream's pad token) and a `padding_mask` True at padding.

Where we differ: `totals` is unused (the total is over the panel genes); only the `t<T>` resolution
mode (an absolute target depth) is offered, not `f` / `a`.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from numba import njit, prange

from scpeft_cli.artifacts import write_text
from scpeft_cli.errors import UserError
from scpeft_cli.tokenizers.base import TokenizedCells
from scpeft_cli.tokenizers.scbert import PanelVocab, check_panel, panel_counts

PANEL_FILE = "scfoundation_panel.tsv"
PANEL_HEADER = ("gene_name", "index")
TARGET_SUM = 1e4
MASK_VALUE = 102.0  # values the value embedding replaces by its mask / pad rows
FORMAT_VERSION = "1"


def read_panel_tsv(path: str | Path) -> tuple[str, ...]:
    """Gene names of a panel table such as `OS_scRNA_gene_index.19264.tsv` (tab-separated, header with
    `gene_name` and `index` columns, one row per gene, integer indices increasing down the file), in
    file order. A file that is not so is a UserError naming the file and what is wrong."""
    path = Path(path)
    try:
        with path.open(newline="") as handle:
            rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"cannot read the gene panel {path}: {err}") from err
    if not rows:
        raise UserError(f"gene panel {path} is empty; expected a header 'gene_name<TAB>index' and one row per gene")
    header = [field.strip() for field in rows[0]]
    if any(name not in header for name in PANEL_HEADER):
        raise UserError(f"gene panel {path} has the header {header!r}; expected tab-separated columns 'gene_name' and 'index'")
    name_at, index_at = header.index("gene_name"), header.index("index")
    names, indices = [], []
    for line, row in enumerate(rows[1:], start=2):
        if not row or row == [""]:
            continue
        if len(row) != len(header):
            raise UserError(f"gene panel {path} line {line} has {len(row)} tab-separated fields, the header {len(header)}")
        name, index = row[name_at].strip(), row[index_at].strip()
        if not name:
            raise UserError(f"gene panel {path} line {line} has an empty gene name")
        try:
            indices.append(int(index))
        except ValueError:
            raise UserError(f"gene panel {path} line {line} has the index {index!r}, not an integer") from None
        names.append(name)
    if not names:
        raise UserError(f"gene panel {path} has a header but no genes")
    steps = np.diff(np.asarray(indices, dtype=np.int64))
    if np.any(steps <= 0):
        line = int(np.flatnonzero(steps <= 0)[0]) + 3
        raise UserError(f"gene panel {path} is not in index order (line {line}); rows must be sorted by 'index'")
    return check_panel(names, str(path))


@njit(parallel=True, cache=True)
def _subsample(starts, counts, keeps, uniform_start, uniforms, n_entries):
    """Which entries stay: all but, in each listed cell (entries `starts[c]:starts[c] + counts[c]`), a
    uniform random `keeps[c]` of them, by a partial Fisher-Yates shuffle reading
    `uniforms[uniform_start[c]:uniform_start[c + 1]]` (so the result does not depend on the threads)."""
    kept = np.ones(n_entries, dtype=np.bool_)
    for c in prange(len(starts)):
        n, k, first = counts[c], keeps[c], starts[c]
        order = np.arange(n)
        for j in range(k):
            pick = j + min(np.int64(uniforms[uniform_start[c] + j] * (n - j)), n - j - 1)
            order[j], order[pick] = order[pick], order[j]
        kept[first : first + n] = False
        for j in range(k):
            kept[first + order[j]] = True
    return kept


def _with_zero_genes(found, values: np.ndarray, n_cells: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every cell's entries at every filled panel position, ascending, 0 where it has no count."""
    dense = np.zeros((n_cells, len(found.filled)), dtype=np.float32)
    dense[found.rows, np.searchsorted(found.filled, found.positions)] = values
    return np.repeat(np.arange(n_cells), len(found.filled)), np.tile(found.filled, n_cells), dense.ravel()


@dataclass(frozen=True)
class ScFoundationTokenizer:
    """Raw counts -> scFoundation's (position, value) tokens: non-zero panel genes, T, S (see the module notes)."""

    panel: tuple[str, ...]
    target_depth: float = 4.0
    max_seq_len: int | None = None
    pad_value: float = 103.0
    # every panel gene the data has, zeros as value 0 (a task predicting every gene's expression); upstream
    # keeps only the values > 0
    include_zero_genes: bool = False
    input_kind = "counts"

    def __post_init__(self):
        object.__setattr__(self, "panel", check_panel(self.panel, "scFoundation"))
        depth = float(self.target_depth)
        if not (np.isfinite(depth) and np.float32(depth) > 0):
            raise UserError(f"scFoundation target_depth must be a positive number, got {self.target_depth}")
        if np.float32(depth) in (np.float32(self.pad_value), np.float32(MASK_VALUE)):
            raise UserError(f"scFoundation target_depth {depth} is the pad or mask value; choose another")
        if self.max_seq_len is not None and self.max_seq_len < 3:
            raise UserError(f"scFoundation max_seq_len must be at least 3 (T, S and a gene), got {self.max_seq_len}")

    @classmethod
    def load_saved(cls, directory: str | Path, **settings) -> ScFoundationTokenizer:
        """The tokenizer whose panel `save` wrote; `settings`: target_depth, max_seq_len, pad_value."""
        return cls(read_panel_tsv(Path(directory) / PANEL_FILE), **settings)

    @property
    def t_position(self) -> int:
        return len(self.panel)

    @property
    def s_position(self) -> int:
        return len(self.panel) + 1

    @cached_property
    def vocab(self) -> PanelVocab:
        return PanelVocab(self.panel)

    def cache_settings(self) -> tuple:
        return (
            FORMAT_VERSION, type(self).__name__, float(self.target_depth).hex(), self.max_seq_len,
            float(self.pad_value).hex(), len(self.panel), self.vocab.digest, self.include_zero_genes,
        )  # fmt: skip

    def save(self, directory: Path) -> None:
        lines = ["\t".join(PANEL_HEADER), *(f"{g}\t{i}" for i, g in enumerate(self.panel))]
        write_text(Path(directory) / PANEL_FILE, "\n".join(lines) + "\n")

    def tokenize(self, X: sp.spmatrix, genes: Sequence[str], *, seed: int, totals: np.ndarray | None = None) -> TokenizedCells:
        """`totals` is unused (the total is over the panel genes); `seed` drives the subsampling only."""
        found = panel_counts(self.vocab, X, genes)
        n_cells = len(found.totals)
        with np.errstate(divide="ignore"):  # total 0: S = -inf, dropped below
            depth = np.log10(found.totals)
        values = np.log1p(found.counts / found.totals[found.rows] * TARGET_SUM)
        if self.include_zero_genes:
            rows, positions, values = _with_zero_genes(found, values, n_cells)
        else:
            kept = values > 0  # float64, as upstream compares
            rows, positions, values = found.rows[kept], found.positions[kept], values[kept].astype(np.float32)
        has_s = depth > 0
        depth = depth.astype(np.float32)
        n_special = 1 + has_s.astype(np.int64)  # T is always there (target_depth > 0)
        n_genes = np.bincount(rows, minlength=n_cells)
        gene_start = np.concatenate([[0], np.cumsum(n_genes)])  # each cell's entries among `rows`

        if self.max_seq_len is not None and np.any(n_genes + n_special > self.max_seq_len):
            room = self.max_seq_len - n_special
            over = np.flatnonzero(n_genes > room)
            keep = room[over]
            uniform_start = np.concatenate([[0], np.cumsum(keep)])
            uniforms = np.random.default_rng(seed).random(uniform_start[-1])
            kept = _subsample(gene_start[over], n_genes[over], keep, uniform_start, uniforms, len(rows))
            rows, positions, values = rows[kept], positions[kept], values[kept]
            n_genes = n_genes.copy()
            n_genes[over] = keep
            gene_start = np.concatenate([[0], np.cumsum(n_genes)])

        lengths = n_genes + n_special
        indptr = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        out_ids = np.empty(indptr[-1], dtype=np.int32)
        out_values = np.empty(indptr[-1], dtype=np.float32)
        slots = indptr[rows] + np.arange(len(rows)) - gene_start[rows]
        out_ids[slots], out_values[slots] = positions, values
        t_slots = indptr[:-1] + n_genes
        out_ids[t_slots], out_values[t_slots] = self.t_position, np.float32(self.target_depth)
        s_cells = np.flatnonzero(has_s)
        out_ids[t_slots[s_cells] + 1], out_values[t_slots[s_cells] + 1] = self.s_position, depth[s_cells]
        return TokenizedCells(
            indptr=indptr, gene_ids=out_ids, values=out_values, genes_matched=found.genes_matched, genes_total=len(genes)
        )

    def collate(self, cells: Sequence[tuple[np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest cell: position 0, value `pad_value`, `padding_mask` True at padding."""
        width = max(len(ids) for ids, _ in cells)
        gene_ids = torch.zeros((len(cells), width), dtype=torch.long)
        values = torch.full((len(cells), width), float(self.pad_value), dtype=torch.float32)
        padding_mask = torch.ones((len(cells), width), dtype=torch.bool)
        for row, (ids, vals) in enumerate(cells):
            n = len(ids)
            gene_ids[row, :n] = torch.from_numpy(np.asarray(ids, dtype=np.int64))
            values[row, :n] = torch.from_numpy(np.asarray(vals, dtype=np.float32))
            padding_mask[row, :n] = False
        return {"gene_ids": gene_ids, "values": values, "padding_mask": padding_mask}
