"""Geneformer's rank-value encoding: per cell, its genes ranked by count / total * 10,000 / gene median.

What upstream `geneformer/tokenizer.py` does, and we do alike: data genes are matched by Ensembl id
through the ensembl mapping dictionary (identifiers upper-cased), columns that map to the same id
have their counts summed, each count is normalised as `count / n_counts * 10_000 / median` (float64,
in that order: the very floats upstream's loom path compares), the non-zero genes are ordered by
`argsort(-value)` and cut to `model_input_size`; V2 dictionaries (with `<cls>` and `<eos>`) give
`<cls>` + the first model_input_size - 2 genes + `<eos>`, V1 no special tokens.

Where we deliberately differ:
- ties keep data column order (a stable sort; summed duplicates sit at their first column), where
  upstream's quicksort leaves them in arbitrary order;
- values are the formula's (upstream's loom path); its AnnData path divides a scipy sparse matrix, which
  multiplies by reciprocals, so its values can differ in the last bit and near-ties order differently;
- identifiers are also looked up as given, then through the symbol -> id dictionary, then as direct
  token-dictionary keys (upstream: only the upper-cased identifier through the ensembl mapping);
- a gene in the token dictionary without a median is dropped (upstream fails on the missing key);
- without `totals` a cell's total is its sum over all the matrix's columns (upstream requires
  obs["n_counts"]; the data layer passes it when the file has it);
- cells left with no gene are kept: V2 `<cls><eos>`, V1 an empty cell that `collate` pads to one
  `<pad>` (upstream drops them; the data layer already drops all-zero cells).

Genes never expressed in the cells a random model's medians come from get median 1.0 (no scaling).
Computed once per run over the whole sparse matrix by compiled per-cell loops (cells in parallel, no
Python loop, no dense copy) and stored ragged, so batches are padded only to their own longest cell.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from numba import njit, prange

from scpeft_cli.artifacts import write_text
from scpeft_cli.errors import UserError
from scpeft_cli.tokenizers import kernels
from scpeft_cli.tokenizers.base import TokenizedCells, pad_ids
from scpeft_cli.tokenizers.vocab import is_special_token, map_genes

PAD_TOKEN, MASK_TOKEN, CLS_TOKEN, EOS_TOKEN = "<pad>", "<mask>", "<cls>", "<eos>"
TOKEN_DICTIONARY_FILE = "token_dictionary.json"
GENE_MEDIAN_FILE = "gene_median_dictionary.json"
TARGET_SUM = 10_000.0
UNSEEN_MEDIAN = 1.0  # median of a gene never expressed in the cells the medians come from
FORMAT_VERSION = "1"


@dataclass(frozen=True)
class GeneformerVocab:
    """Geneformer's token dictionary {`<pad>`, `<mask>`, [`<cls>`, `<eos>`], ENSG...: id} and the two
    dictionaries that lead data identifiers to its Ensembl ids ({ENSG or symbol: ENSG}, {symbol: ENSG})."""

    token_to_id: dict[str, int]
    ensembl_mapping: dict[str, str] = field(default_factory=dict)
    gene_name_id: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_genes(cls, genes: Iterable[str], *, v2: bool) -> GeneformerVocab:
        """A random model's dictionary: `<pad>` 0, `<mask>` 1, (V2: `<cls>` 2, `<eos>` 3), the genes sorted."""
        specials = [PAD_TOKEN, MASK_TOKEN, *([CLS_TOKEN, EOS_TOKEN] if v2 else [])]
        names = sorted({str(g) for g in genes if not is_special_token(str(g))})
        return cls({token: index for index, token in enumerate([*specials, *names])}, {g: g for g in names})

    @cached_property
    def _gene_ids(self) -> dict[str, int]:
        return {t: i for t, i in self.token_to_id.items() if not is_special_token(t)}

    @property
    def genes(self) -> list[str]:
        return list(self._gene_ids)

    @property
    def pad_id(self) -> int:
        return self.token_to_id[PAD_TOKEN]

    @property
    def cls_id(self) -> int | None:
        return self.token_to_id.get(CLS_TOKEN)

    @property
    def eos_id(self) -> int | None:
        return self.token_to_id.get(EOS_TOKEN)

    @property
    def is_v2(self) -> bool:
        return self.cls_id is not None and self.eos_id is not None

    @property
    def size(self) -> int:
        return max(self.token_to_id.values()) + 1

    @cached_property
    def _routes(self) -> dict[str, tuple[int, str]]:
        """Per identifier, the first table that leads it to a gene: (0 ensembl mapping, 1 symbol -> id,
        2 the gene itself; that gene)."""
        known = self._gene_ids
        routes: dict[str, tuple[int, str]] = {}
        for rank, table in enumerate((self.ensembl_mapping, self.gene_name_id, {g: g for g in known})):
            for key, target in table.items():
                if target in known and str(key) not in routes:
                    routes[str(key)] = (rank, target)
        return routes

    def resolve(self, gene: str) -> str | None:
        """The token-dictionary gene an identifier stands for: through the ensembl mapping (as given, then
        upper-cased), else the symbol -> id dictionary (alike), else the identifier itself (alike); None if
        none leads to a gene."""
        routes = self._routes
        found = routes.get(gene)
        upper = routes.get(gene.upper())
        if upper is not None and (found is None or upper[0] < found[0]):
            found = upper
        return None if found is None else found[1]

    def lookup(self, genes: Sequence[str]) -> np.ndarray:
        """Token id per data gene identifier, -1 where unmatched (special tokens never match)."""
        ids = self._gene_ids
        return np.array([-1 if is_special_token(g) else ids.get(self.resolve(g), -1) for g in map(str, genes)], dtype=np.int64)

    def map_genes(self, genes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return map_genes(self, genes)


@dataclass(frozen=True)
class _WithMedians:
    """The vocabulary as the tokenizer sees it: genes without a median are unmatched."""

    vocab: GeneformerVocab
    median_by_token: np.ndarray

    @property
    def genes(self) -> list[str]:
        return self.vocab.genes

    def lookup(self, genes: Sequence[str]) -> np.ndarray:
        ids = self.vocab.lookup(genes)
        known = np.zeros(len(ids), dtype=bool)
        known[ids >= 0] = ~np.isnan(self.median_by_token[ids[ids >= 0]])
        return np.where(known, ids, -1)


def _cell_totals(X: sp.csr_matrix, totals: np.ndarray | None) -> np.ndarray:
    if totals is None:
        return np.asarray(X.sum(axis=1, dtype=np.float64)).ravel()
    totals = np.asarray(totals, dtype=np.float64).ravel()
    if totals.shape != (X.shape[0],):
        raise UserError(f"got {totals.size} cell totals for {X.shape[0]} cells")
    return totals


def _summed_by_token(X: sp.csr_matrix, column_token: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """X with the columns of one token summed into one (at the first such column's place) and the
    unmatched columns dropped; the new columns' tokens."""
    matched = np.flatnonzero(column_token >= 0)
    tokens, first, inverse = np.unique(column_token[matched], return_index=True, return_inverse=True)
    order = np.argsort(first)  # new column k holds tokens[order[k]]
    place = np.empty_like(order)
    place[order] = np.arange(len(order))
    P = sp.csr_matrix((np.ones(len(matched)), (matched, place[inverse])), shape=(X.shape[1], len(tokens)))
    summed = sp.csr_matrix(X @ P)
    summed.sort_indices()
    return summed, tokens[order]


@njit(parallel=True, cache=True)
def _segment_medians(indptr, data, empty):
    """Median of each segment `data[indptr[k]:indptr[k+1]]` as np.median gives it; `empty` where none."""
    out = np.empty(len(indptr) - 1, dtype=np.float64)
    for k in prange(len(indptr) - 1):
        n = indptr[k + 1] - indptr[k]
        if n == 0:
            out[k] = empty
            continue
        ordered = np.sort(data[indptr[k] : indptr[k + 1]])
        half = n // 2
        out[k] = ordered[half] if n % 2 else (ordered[half - 1] + ordered[half]) / 2.0
    return out


def gene_medians(X: sp.spmatrix, totals: np.ndarray | None = None, columns: np.ndarray | None = None) -> np.ndarray:
    """Per column (of `columns`, default all): the median of its non-zero `count / total * 10,000` over the
    cells, the normalisation factor Geneformer divides by; 1.0 for a column never expressed.
    `totals`: the cells' total counts, by default their sums over all of X's columns."""
    X = sp.csr_matrix(X)
    totals = _cell_totals(X, totals)
    if columns is not None:
        X = X[:, np.asarray(columns)]
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    normalised = sp.csr_matrix((X.data.astype(np.float64) / totals[rows] * TARGET_SUM, X.indices, X.indptr), X.shape)
    normalised.eliminate_zeros()
    by_gene = normalised.tocsc()
    return _segment_medians(by_gene.indptr, by_gene.data, UNSEEN_MEDIAN)


_SIGN = np.uint64(1) << np.uint64(63)
_COARSE_BITS = 16  # two 8-bit radix passes, then exact order by an insertion sort


@njit(cache=True, inline="always")
def _descending_key(value):
    """An unsigned integer that orders as -value does (the float's bits, negatives flipped)."""
    bits = np.float64(value).view(np.uint64)
    return bits if bits & _SIGN else ~(bits | _SIGN)


@njit(cache=True)
def _ranked_by_keys(keys, low, high, tokens):
    """`tokens` in ascending `keys` order, equal keys in their order (`low`, `high`: the keys' extremes).
    ~5x faster than numba's stable argsort: an LSD radix sort (two 8-bit passes) of a 16-bit coarse key
    (the keys scaled to their spread, packed with the entry's index), then an insertion sort by all 64
    bits, which moves entries only within runs of equal coarse keys (exact ties, or values within 2**-16
    of the spread); a merge sort where those runs are long, or for 65,536 entries or more."""
    n = len(keys)
    if n >= 1 << 16:
        return tokens[np.argsort(keys, kind="mergesort")]
    shift = np.uint64(0)
    while n > 1 and ((high - low) >> shift) >> np.uint64(_COARSE_BITS):
        shift += np.uint64(1)
    packed = np.empty(n, dtype=np.uint32)  # coarse key << 16 | index
    low_counts, high_counts = np.zeros(256, dtype=np.int32), np.zeros(256, dtype=np.int32)
    for i in range(n):
        coarse = np.uint32((keys[i] - low) >> shift)
        packed[i] = (coarse << np.uint32(16)) | np.uint32(i)
        low_counts[coarse & np.uint32(255)] += 1
        high_counts[coarse >> np.uint32(8)] += 1
    low_total = high_total = 0
    for b in range(256):
        low_counts[b], low_total = low_total, low_total + low_counts[b]
        high_counts[b], high_total = high_total, high_total + high_counts[b]
    by_low = np.empty(n, dtype=np.uint32)
    for i in range(n):
        digit = (packed[i] >> np.uint32(16)) & np.uint32(255)
        by_low[low_counts[digit]] = packed[i]
        low_counts[digit] += 1
    sorted_keys, sorted_tokens = np.empty(n, dtype=np.uint64), np.empty(n, dtype=tokens.dtype)
    for i in range(n):
        digit, j = by_low[i] >> np.uint32(24), by_low[i] & np.uint32(0xFFFF)
        slot = high_counts[digit]
        sorted_keys[slot], sorted_tokens[slot] = keys[j], tokens[j]
        high_counts[digit] += 1
    moves = 0
    for i in range(1, n):
        key, token = sorted_keys[i], sorted_tokens[i]
        k = i
        while k > 0 and sorted_keys[k - 1] > key:  # strict: equal keys keep their (column) order
            sorted_keys[k], sorted_tokens[k] = sorted_keys[k - 1], sorted_tokens[k - 1]
            k -= 1
        sorted_keys[k], sorted_tokens[k] = key, token
        moves += i - k
        if moves > 8 * n + 256:
            return tokens[np.argsort(keys, kind="mergesort")]
    return sorted_tokens


@njit(cache=True)
def _ranked(values, tokens):
    """`tokens[np.argsort(-values, kind="stable")]`."""
    keys = np.empty(len(values), dtype=np.uint64)
    low, high = np.uint64(0xFFFFFFFFFFFFFFFF), np.uint64(0)
    for i in range(len(values)):
        keys[i] = _descending_key(values[i])
        low, high = min(low, keys[i]), max(high, keys[i])
    return _ranked_by_keys(keys, low, high, tokens)


@njit(parallel=True, cache=True)
def _rank_cells(
    gene_ids, indptr, indices, data, column_token, column_median, totals, lengths, out_indptr, keep, cls_id, eos_id
):  # fmt: skip
    """Into `gene_ids`, per cell: its kept genes by descending count / total * 10,000 / median (ties in column
    order), the first `keep`, between `cls_id` and `eos_id` where these are >= 0."""
    for cell in prange(len(indptr) - 1):
        n, slot = lengths[cell], out_indptr[cell]
        if cls_id >= 0:
            gene_ids[slot] = cls_id
            slot += 1
        keys, tokens = np.empty(n, dtype=np.uint64), np.empty(n, dtype=np.int32)
        low, high = np.uint64(0xFFFFFFFFFFFFFFFF), np.uint64(0)
        k = 0
        for j in range(indptr[cell], indptr[cell + 1]):
            column = indices[j]
            if data[j] != 0 and column_token[column] >= 0:
                key = _descending_key(np.float64(data[j]) / totals[cell] * 10_000.0 / column_median[column])
                keys[k], tokens[k] = key, column_token[column]
                low, high = min(low, key), max(high, key)
                k += 1
        kept = min(n, keep)
        gene_ids[slot : slot + kept] = _ranked_by_keys(keys, low, high, tokens)[:kept]
        if eos_id >= 0:
            gene_ids[slot + kept] = eos_id


@dataclass(frozen=True)
class RankValueTokenizer:
    """Raw counts -> Geneformer's rank-value encoding (token ids only), and batch padding.

    `medians` {token-dictionary gene: non-zero median of its normalised expression}; token-dictionary
    genes missing from it are treated as unmatched (dropped). Token ids come as int32 (half the memory).
    """

    vocab: GeneformerVocab
    medians: dict[str, float]
    model_input_size: int
    input_kind = "counts"

    def __post_init__(self):
        if self.model_input_size < (3 if self.vocab.is_v2 else 1):
            raise UserError(f"model_input_size {self.model_input_size} leaves no room for a gene")

    @classmethod
    def from_data(
        cls, X: sp.spmatrix, genes: Sequence[str], *, v2: bool, model_input_size: int, totals: np.ndarray | None = None
    ) -> RankValueTokenizer:
        """A random model's tokenizer: a dictionary of the data genes and their medians over these cells."""
        X = sp.csr_matrix(X)
        vocab = GeneformerVocab.from_genes(genes, v2=v2)
        summed, tokens = _summed_by_token(X, vocab.lookup([str(g) for g in genes]))
        names = {i: t for t, i in vocab.token_to_id.items()}
        medians = gene_medians(summed, _cell_totals(X, totals))
        medians = {names[t]: float(m) for t, m in zip(tokens.tolist(), medians.tolist(), strict=True)}
        return cls(vocab, {g: medians.get(g, UNSEEN_MEDIAN) for g in vocab.genes}, model_input_size)

    @classmethod
    def load_saved(cls, directory: str | Path, *, model_input_size: int) -> RankValueTokenizer:
        """The tokenizer `save` wrote (token dictionary and medians; identity mappings)."""
        tables = []
        for name, kind in ((TOKEN_DICTIONARY_FILE, int), (GENE_MEDIAN_FILE, float)):
            path = Path(directory) / name
            try:
                table = json.loads(path.read_text())
            except (OSError, ValueError) as err:
                raise UserError(f"cannot read {path}: {err}") from err
            if not isinstance(table, dict) or not all(isinstance(v, (int, float)) for v in table.values()):
                raise UserError(f"{path} is not a JSON object of numbers by gene")
            tables.append({str(k): kind(v) for k, v in table.items()})
        token_to_id, medians = tables
        mapping = {t: t for t in token_to_id if not is_special_token(t)}
        return cls(GeneformerVocab(token_to_id, mapping), medians, model_input_size)

    def save(self, directory: Path) -> None:
        tables = (
            {str(t): int(i) for t, i in self.vocab.token_to_id.items()},
            {str(g): float(m) for g, m in self.medians.items()},
        )
        for name, table in zip((TOKEN_DICTIONARY_FILE, GENE_MEDIAN_FILE), tables, strict=True):
            write_text(Path(directory) / name, json.dumps(table))

    @cached_property
    def _digest(self) -> str:
        vocab = self.vocab  # upstream's tables hold numpy scalars: as plain numbers
        parts = [sorted((str(t), int(i)) for t, i in vocab.token_to_id.items())]
        parts += [
            sorted((str(k), str(v)) for k, v in table.items()) for table in (vocab.ensembl_mapping, vocab.gene_name_id)
        ]
        parts.append(sorted((str(g), float(m).hex()) for g, m in self.medians.items()))
        return hashlib.blake2b(json.dumps(parts).encode(), digest_size=20).hexdigest()

    def cache_settings(self) -> tuple:
        return (FORMAT_VERSION, type(self).__name__, self.model_input_size, self._digest)

    @cached_property
    def _median_by_token(self) -> np.ndarray:
        """Median per token id, NaN for tokens without one."""
        table = np.full(self.vocab.size, np.nan)
        for gene, token in self.vocab.token_to_id.items():
            if not is_special_token(gene) and gene in self.medians:
                table[token] = self.medians[gene]
        used = table[~np.isnan(table)]
        if not np.all(np.isfinite(used) & (used > 0)):
            raise UserError("the gene medians must be positive numbers")
        return table

    def tokenize(
        self, X: sp.spmatrix, genes: Sequence[str], *, seed: int, totals: np.ndarray | None = None
    ) -> TokenizedCells:
        """`totals`: each cell's total counts (obs["n_counts"]), by default its sum over all of X's columns.
        `seed` is unused: the encoding is deterministic."""
        genes = [str(g) for g in genes]
        columns, token_ids = map_genes(_WithMedians(self.vocab, self._median_by_token), genes)
        X = sp.csr_matrix(X)
        if not X.has_sorted_indices:
            X = X.sorted_indices()
        totals = _cell_totals(X, totals)
        column_token = np.full(X.shape[1], -1, dtype=np.int64)
        column_token[columns] = token_ids
        if len(np.unique(token_ids)) < len(token_ids):  # several columns name one gene: sum them
            X, column_token = _summed_by_token(X, column_token)
        data = X.data if X.data.dtype in (np.float32, np.float64) else X.data.astype(np.float64)
        lengths = kernels.kept_per_cell(X.indptr, X.indices, data, column_token)
        if np.any((lengths > 0) & ~(totals > 0)):
            raise UserError("some cells have counts but a total count (obs['n_counts']) that is not positive")
        v2 = self.vocab.is_v2
        keep = self.model_input_size - 2 if v2 else self.model_input_size
        out_indptr = np.concatenate([[0], np.cumsum(np.minimum(lengths, keep) + (2 if v2 else 0))])
        column_median = self._median_by_token[np.maximum(column_token, 0)]
        # allocated by numpy, which asks for huge pages (numba's allocations fault in 4 KiB pages: 15% slower);
        # int32 ids: half the memory of int64
        gene_ids = np.empty(out_indptr[-1], dtype=np.int32)
        _rank_cells(
            gene_ids, X.indptr, X.indices, data, column_token, column_median, totals, lengths, out_indptr, keep,
            self.vocab.cls_id if v2 else -1, self.vocab.eos_id if v2 else -1,
        )  # fmt: skip
        return TokenizedCells(indptr=out_indptr, gene_ids=gene_ids, genes_matched=len(columns), genes_total=len(genes))

    def collate(self, cells: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest cell with `<pad>`; an empty (V1) cell becomes one `<pad>`. Mask: True at padding."""
        pad = np.array([self.vocab.pad_id], dtype=np.int64)
        gene_ids, padding_mask = pad_ids([(ids if len(ids) else pad, None) for ids, _ in cells], self.vocab.pad_id)
        return {"gene_ids": gene_ids, "padding_mask": padding_mask}
