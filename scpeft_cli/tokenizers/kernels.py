"""Compiled per-cell loops of the tokeniser: one pass over each cell's stored entries, cells in parallel.

numba (a scanpy dependency) compiles these once per data type and caches the machine code on disk,
so a run pays the compilation only the first time. Random numbers come from the caller, drawn with
numpy's generator, so the results do not depend on the number of threads.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True)
def quantile_bin_codes(indptr, data, sort_keys, quantiles, uniforms):  # pragma: no cover - compiled
    """Bin code of every stored value: upstream scGPT's per-cell `np.quantile` edges and two-sided
    `np.digitize`, a value between its left and right digitisation placed by `uniforms`.

    Edges are computed with numpy's linear-interpolation formula (differences in the data's type,
    interpolation in float64) and kept in float64, so they are the very floats `np.quantile` returns. `sort_keys` is `data` itself or, for
    non-negative data, its bits read as signed integers, which sort in the same order and faster.
    """
    codes = np.empty(len(data), dtype=np.int64)
    n_edges = len(quantiles)
    padded_edges = 1
    while padded_edges <= n_edges:
        padded_edges <<= 1
    for cell in prange(len(indptr) - 1):
        start, stop = indptr[cell], indptr[cell + 1]
        if stop == start:
            continue
        ordered = np.sort(sort_keys[start:stop]).view(data.dtype)
        last = stop - start - 1
        edges = np.full(padded_edges, np.inf, dtype=np.float64)
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
        for j in range(start, stop):
            x = data[j]
            # np.digitize(x, edges) = #edges <= x and np.digitize(x, edges, right=True) = #edges < x, by
            # branch-free binary search over the edges padded with +inf to a power of two.
            left = right = 0
            step = padded_edges >> 1
            while step > 0:
                left += step * (edges[left + step - 1] <= x)
                right += step * (edges[right + step - 1] < x)
                step >>= 1
            codes[j] = np.int64(np.ceil(uniforms[j] * (right - left) + left))
    return codes


@njit(parallel=True, cache=True)
def keep_random_subset(indptr, uniforms, keep_per_cell):  # pragma: no cover - compiled
    """Mask over stored entries keeping `keep_per_cell` entries, uniformly without replacement, of each
    cell longer than that: a partial Fisher-Yates shuffle driven by the cell's own slice of `uniforms`."""
    keep = np.ones(len(uniforms), dtype=np.bool_)
    for cell in prange(len(indptr) - 1):
        start, stop = indptr[cell], indptr[cell + 1]
        n = stop - start
        if n <= keep_per_cell:
            continue
        order = np.arange(n)
        for i in range(keep_per_cell):
            pick = i + min(np.int64(uniforms[start + i] * (n - i)), n - i - 1)
            order[i], order[pick] = order[pick], order[i]
        keep[start:stop] = False
        for i in range(keep_per_cell):
            keep[start + order[i]] = True
    return keep


@njit(parallel=True, cache=True)
def assemble_tokens(indptr, indices, codes, keep, token_ids, cls_id, cls_value):  # pragma: no cover - compiled
    """Ragged (indptr, gene ids, values): per cell `<cls>` then its kept entries in stored order."""
    n_cells = len(indptr) - 1
    out_indptr = np.zeros(n_cells + 1, dtype=np.int64)
    for cell in prange(n_cells):
        out_indptr[cell + 1] = 1 + np.sum(keep[indptr[cell] : indptr[cell + 1]])
    out_indptr = np.cumsum(out_indptr)
    gene_ids = np.empty(out_indptr[-1], dtype=np.int64)
    values = np.empty(out_indptr[-1], dtype=np.float32)
    for cell in prange(n_cells):
        slot = out_indptr[cell]
        gene_ids[slot] = cls_id
        values[slot] = cls_value
        for j in range(indptr[cell], indptr[cell + 1]):
            if keep[j]:
                slot += 1
                gene_ids[slot] = token_ids[indices[j]]
                values[slot] = codes[j]
    return out_indptr, gene_ids, values
