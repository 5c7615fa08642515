"""Compiled per-cell loops of the tokeniser: one pass over each cell's stored entries, cells in parallel.

numba (a scanpy dependency) compiles these once per data type and caches the machine code on disk,
so a run pays the compilation only the first time. Random numbers come from the caller, drawn with
numpy's generator, so the results do not depend on the number of threads.

`sort_keys` arguments are the values themselves or, for non-negative data, their bits read as signed
integers, which sort in the same order and faster.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(cache=True)
def _cell_codes(values, ordered, quantiles, uniforms, codes, at):
    """One cell's bin codes (into `codes[at]`): upstream scGPT's `np.quantile` edges of the cell's values
    at `quantiles` and two-sided `np.digitize`, a value between its left and right digitisation placed by
    `uniforms`. `ordered` holds the same values sorted; `at` places each code among the cell's tokens.

    Edges follow numpy's linear-interpolation formula (differences in the data's type, interpolation in
    float64) and stay float64, so they are the very floats `np.quantile` returns.
    """
    n_edges = len(quantiles)
    padded = 1
    while padded <= n_edges:
        padded <<= 1
    edges = np.full(padded, np.inf)
    last = len(ordered) - 1
    for k in range(n_edges):
        virtual = last * quantiles[k]
        lower = np.int64(np.floor(virtual))
        upper = min(lower + 1, last)
        gamma = virtual - lower
        low, high = ordered[lower], ordered[upper]
        diff = high - low
        if gamma >= 0.5:
            edges[k] = high - diff * (1.0 - gamma)
        else:
            edges[k] = low + diff * gamma
    for j in range(len(values)):
        x = values[j]
        # np.digitize(x, edges) = #edges <= x and np.digitize(x, edges, right=True) = #edges < x, by a
        # branch-free binary search over the edges padded with +inf to a power of two.
        left = right = 0
        step = padded >> 1
        while step > 0:
            left += step * (edges[left + step - 1] <= x)
            right += step * (edges[right + step - 1] < x)
            step >>= 1
        codes[at[j]] = np.ceil(uniforms[j] * (right - left) + left)


@njit(cache=True)
def _random_subset(n, keep, uniforms):
    """Which of n entries to keep: `keep` of them uniformly without replacement (partial Fisher-Yates,
    reading `uniforms[:keep]` only)."""
    order = np.arange(n)
    for i in range(keep):
        pick = i + min(np.int64(uniforms[i] * (n - i)), n - i - 1)
        order[i], order[pick] = order[pick], order[i]
    kept = np.zeros(n, dtype=np.bool_)
    kept[order[:keep]] = True
    return kept


@njit(parallel=True, cache=True)
def kept_per_cell(indptr, indices, data, column_token):
    """Per cell, its stored entries that are non-zero and in a vocabulary column (`column_token` >= 0)."""
    counts = np.zeros(len(indptr) - 1, dtype=np.int64)
    for cell in prange(len(indptr) - 1):
        for j in range(indptr[cell], indptr[cell + 1]):
            if data[j] != 0 and column_token[indices[j]] >= 0:
                counts[cell] += 1
    return counts


@njit(parallel=True, cache=True)
def tokenize_cells(
    indptr, indices, data, sort_keys, column_token, keep_zeros, nonzero_indptr, keep_indptr, out_indptr,
    quantiles, bin_uniforms, keep_uniforms, keep_per_cell, cls_id, cls_value, binned,
):  # fmt: skip
    """Ragged tokens (gene ids, values) in one pass over the matrix: per cell `<cls>`, then its entries in
    column order with their bin codes, `keep_per_cell` of them at random where it has more.

    A cell's entries are its non-zero values in vocabulary columns (`nonzero_indptr` counts them) or, with
    `keep_zeros`, every vocabulary column, absent and zero values taking code 0 (upstream's
    `include_zero_gene`); either way only the non-zero values are binned, each with its own
    `bin_uniforms[nonzero_indptr[i]:nonzero_indptr[i+1]]`, so their codes do not depend on `keep_zeros`;
    `binned=False` keeps the values themselves instead of bin codes.
    Cell i's subsampling reads `keep_uniforms[keep_indptr[i]:keep_indptr[i+1]]` (drawn only when some
    cell is subsampled); its tokens go to `out_indptr[i]:out_indptr[i+1]`.
    """
    matched = np.flatnonzero(column_token >= 0)
    column_rank = np.full(len(column_token), -1, dtype=np.int64)  # a column's place among `matched`
    column_rank[matched] = np.arange(len(matched))
    gene_ids = np.empty(out_indptr[-1], dtype=np.int64)
    values = np.empty(out_indptr[-1], dtype=np.float32)
    for cell in prange(len(indptr) - 1):
        first, m = nonzero_indptr[cell], nonzero_indptr[cell + 1] - nonzero_indptr[cell]
        n = len(matched) if keep_zeros else m
        slot = out_indptr[cell]
        gene_ids[slot] = cls_id
        values[slot] = cls_value
        if n == 0:
            continue
        cell_values = np.empty(m, dtype=data.dtype)
        cell_keys = np.empty(m, dtype=sort_keys.dtype)
        at = np.empty(m, dtype=np.int64)
        cell_tokens = column_token[matched] if keep_zeros else np.empty(n, dtype=np.int64)
        k = 0
        for j in range(indptr[cell], indptr[cell + 1]):
            token = column_token[indices[j]]
            if data[j] != 0 and token >= 0:
                cell_values[k], cell_keys[k] = data[j], sort_keys[j]
                at[k] = column_rank[indices[j]] if keep_zeros else k
                cell_tokens[at[k]] = token
                k += 1
        codes = np.zeros(n, dtype=np.float32)
        if m > 0 and not binned:
            for i in range(m):
                codes[at[i]] = cell_values[i]
        elif m > 0:
            ordered = np.sort(cell_keys).view(data.dtype)
            _cell_codes(cell_values, ordered, quantiles, bin_uniforms[first : first + m], codes, at)
        if n <= keep_per_cell:
            gene_ids[slot + 1 : slot + 1 + n] = cell_tokens
            values[slot + 1 : slot + 1 + n] = codes
            continue
        kept = _random_subset(n, keep_per_cell, keep_uniforms[keep_indptr[cell] : keep_indptr[cell + 1]])
        for i in range(n):
            if kept[i]:
                slot += 1
                gene_ids[slot] = cell_tokens[i]
                values[slot] = codes[i]
    return gene_ids, values
