"""Batch effects simulated on real cells: an oracle for batch-integration methods and metrics (`data=pbmc68k_batches`).

Real data never says how much of the variation between batches is technical. Here it is known by construction:
the cells of scanpy's ``pbmc68k_reduced`` (700 PBMCs, 765 genes, cell types in ``bulk_labels``) come from one
experiment, so they have no batch structure of their own; they are dealt to batches at random (balanced, seeded),
and each batch then gets a technical effect that is only technical: every gene's mean is multiplied by a
per-batch log-normal factor, every cell's depth by a per-batch factor, and the counts are redrawn (Poisson)
from the scaled means. So

* the batch of each cell is known exactly, and is independent of its cell type (random, balanced assignment);
* the cell types are the original labels, which the effect does not touch (it is the same for every cell type);
* ``strength=0, depth_strength=0`` gives the null: the same redraw, with random batches and no effect at all.

A method that removes batch effects should mix the batches of the simulated data (``asw_batch``, graph
connectivity, kNN batch mixing) while keeping the cell types apart (NMI/ARI/label ASW); on the null data there is
nothing to remove. With the defaults (``strength=0.8``, ``depth_strength=0.3``, 3 batches) plain PCA of the
log-normalised data separates the batches clearly (about 93% of each cell's 15 nearest neighbours are of its own
batch, against 33% by chance; scib batch ASW about 0.87 against 0.96 on the null) and Harmony mixes them again
(about 32%), recovering the cell-type structure of the null data. Much stronger effects (``strength`` >= 1)
separate the batches more than the cell types, and Harmony then corrects little: the defaults sit below that.

``scpeft train task=integration data=pbmc68k_batches`` trains on it; ``write_simulated_h5ad`` writes it as a file.
"""

from __future__ import annotations

import functools

import anndata
import numpy as np
import pandas as pd
import scanpy as sc
from scipy import sparse

from scpeft_cli.data.loading import prepare

__all__ = ["base_counts", "load_pbmc68k_batches", "simulate_batches", "write_simulated_h5ad"]

TARGET_SUM = 1e4  # pbmc68k_reduced's raw values are log1p(counts / n_counts * 1e4)


@functools.lru_cache(maxsize=1)
def _base() -> tuple[np.ndarray, pd.Index, pd.Index, np.ndarray]:
    full = sc.datasets.pbmc68k_reduced()
    logged = full.raw.X.toarray() if sparse.issparse(full.raw.X) else np.asarray(full.raw.X)
    totals = full.obs["n_counts"].to_numpy(dtype=np.float64)[:, None]
    exact = np.expm1(logged.astype(np.float64)) * totals / TARGET_SUM
    counts = np.round(exact)
    if np.abs(exact - counts).max() > 0.25:  # the totals do not belong to these values
        raise RuntimeError("cannot recover integer counts from pbmc68k_reduced.raw")
    counts.setflags(write=False)
    labels = full.obs["bulk_labels"].astype(str).to_numpy()
    return counts, pd.Index(full.raw.var_names.astype(str)), pd.Index(full.obs_names.astype(str)), labels


def base_counts() -> anndata.AnnData:
    """pbmc68k_reduced as integer counts (700 cells x 765 genes, dense float64 in X) with ``obs["bulk_labels"]``:
    the cells every simulation starts from."""
    counts, genes, cells, labels = _base()
    obs = pd.DataFrame({"bulk_labels": pd.Categorical(labels)}, index=cells)
    return anndata.AnnData(X=counts.copy(), obs=obs, var=pd.DataFrame(index=genes))


def simulate_batches(
    n_batches: int = 3, *, seed: int = 0, strength: float = 0.8, depth_strength: float = 0.3
) -> anndata.AnnData:
    """pbmc68k_reduced's cells dealt at random to ``n_batches`` batches, each with its own technical effect.

    Cells are assigned to batches balanced (sizes differ by at most one) in a seeded random order. Batch ``b``
    draws one factor per gene, ``exp(N(0, strength))``, and one depth factor, ``exp(N(0, depth_strength))``; a
    cell's new counts are Poisson with mean ``counts * gene_factor[b] * depth_factor[b]``. The same ``seed``
    gives the same data.

    Returns integer counts in X (CSR float32, cells x genes), var_names the genes, and obs: ``batch``
    (categorical "batch0", "batch1", ...), ``bulk_labels`` (the cell type, untouched) and ``n_counts`` (the new
    totals over these genes). ``uns["simulated_batches"]`` records the parameters.
    """
    if n_batches < 1:
        raise ValueError(f"n_batches must be >= 1, got {n_batches}")
    if strength < 0 or depth_strength < 0:
        raise ValueError(f"strength and depth_strength must be >= 0, got {strength} and {depth_strength}")
    counts, genes, cells, labels = _base()
    n_cells, n_genes = counts.shape
    rng = np.random.default_rng(seed)
    batch = rng.permutation(np.arange(n_cells) % n_batches)
    gene_factor = np.exp(rng.normal(0.0, strength, size=(n_batches, n_genes)))
    depth_factor = np.exp(rng.normal(0.0, depth_strength, size=n_batches))
    means = counts * gene_factor[batch] * depth_factor[batch][:, None]
    new = rng.poisson(means).astype(np.float32)

    names = [f"batch{i}" for i in range(n_batches)]
    obs = pd.DataFrame(
        {
            "batch": pd.Categorical.from_codes(batch, categories=names),
            "bulk_labels": pd.Categorical(labels),
            "n_counts": new.sum(axis=1, dtype=np.float64).astype(np.float32),
        },
        index=cells,
    )
    adata = anndata.AnnData(X=sparse.csr_matrix(new), obs=obs, var=pd.DataFrame(index=genes))
    adata.uns["simulated_batches"] = {
        "source": "pbmc68k_reduced",
        "n_batches": int(n_batches),
        "seed": int(seed),
        "strength": float(strength),
        "depth_strength": float(depth_strength),
        "depth_factors": depth_factor.tolist(),
    }
    return adata


def write_simulated_h5ad(
    path, n_batches: int = 3, *, seed: int = 0, strength: float = 0.8, depth_strength: float = 0.3
):
    """Simulate (``simulate_batches``) and write the result as .h5ad; returns the AnnData."""
    adata = simulate_batches(n_batches, seed=seed, strength=strength, depth_strength=depth_strength)
    adata.write_h5ad(path)
    return adata


def load_pbmc68k_batches(
    *, n_batches: int = 3, simulation_seed: int = 0, strength: float = 0.8, depth_strength: float = 0.3,
    label_key: str | None = "bulk_labels", batch_key: str | None = "batch", min_cells_per_class: int = 0,
    n_top_genes: int | None = None, species: str | None = None, ortholog_table: str | None = None, one_to_many: str = "drop",
) -> anndata.AnnData:
    """The simulated data, prepared as any dataset (`data.loading.prepare`): the `data=pbmc68k_batches` option."""
    simulated = simulate_batches(n_batches, seed=simulation_seed, strength=strength, depth_strength=depth_strength)
    return prepare(
        simulated.X, obs=simulated.obs, genes=simulated.var_names, source="pbmc68k_batches (simulated)", path=None,
        label_key=label_key, gene_key=None, layer=None, min_cells_per_class=min_cells_per_class, drop_unlabeled=False,
        n_top_genes=n_top_genes, batch_key=batch_key, species=species, ortholog_table=ortholog_table,
        one_to_many=one_to_many,
    )
