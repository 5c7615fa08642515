"""Reference embeddings for batch integration: plain PCA (the unintegrated baseline) and Harmony on that PCA.

Both follow the usual scanpy / scib pipeline: PCA of the log-normalised expression (``sc.pp.pca``, ARPACK), then
``harmonypy.run_harmony`` on the PCs with the batch as its only covariate and harmonypy's defaults. Harmony is
optional (the ``integration`` extra): ``missing_harmony()`` returns the install hint when harmonypy cannot be
imported, and ``harmony_embedding`` raises ``ImportError`` with that hint, so a caller can skip the baseline and
say why.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import pandas as pd
import scanpy as sc

__all__ = ["HARMONY_INSTALL_HINT", "harmony_embedding", "missing_harmony", "pca_embedding"]

HARMONY_INSTALL_HINT = "Harmony baseline skipped: pip install 'scpeft-cli[integration]'"


def pca_embedding(X, n_comps: int = 50, seed: int = 0) -> np.ndarray:
    """The first ``n_comps`` principal components of ``X`` (cells x genes, log-normalised; dense or sparse), as
    scanpy computes them (``sc.pp.pca``: centred, ARPACK, ``random_state=seed``). ``n_comps`` is clipped to
    ``min(n_cells, n_genes) - 1``, the most ARPACK can give."""
    n_obs, n_vars = X.shape
    n_comps = min(int(n_comps), min(n_obs, n_vars) - 1)
    if n_comps < 1:
        raise ValueError(f"PCA needs at least 2 cells and 2 genes, got {n_obs} x {n_vars}")
    return np.asarray(sc.pp.pca(X, n_comps=n_comps, svd_solver="arpack", random_state=seed))


def missing_harmony() -> str | None:
    """None when harmonypy can be imported, else the hint that says how to install it."""
    try:
        import harmonypy  # noqa: F401
    except ImportError:
        return HARMONY_INSTALL_HINT
    return None


@contextlib.contextmanager
def _quiet(name: str, level: int = logging.WARNING):
    """Raise a logger's level for the duration of a block (harmonypy logs progress at INFO on its own handler)."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)


def _cells_first(z, pca: np.ndarray, z_orig=None) -> np.ndarray:
    """harmonypy's ``Z_corr`` as (cells, dims): harmonypy 2.x returns it so, 0.0.x as (dims, cells).

    Decided by shape; when the matrix is square (as many dims as cells) by which orientation of ``Z_orig``, the
    input as harmonypy holds it, equals ``pca``; failing that, the 2.x orientation."""
    z = np.asarray(z)
    n_cells, n_dims = pca.shape
    if z.shape not in ((n_cells, n_dims), (n_dims, n_cells)):
        raise ValueError(f"harmonypy returned Z_corr of shape {z.shape} for a PCA of shape {pca.shape}")
    if n_cells != n_dims:
        return z if z.shape == (n_cells, n_dims) else z.T
    if z_orig is not None:
        z_orig = np.asarray(z_orig)
        if not np.allclose(z_orig, pca) and np.allclose(z_orig.T, pca):
            return z.T
    return z


def harmony_embedding(pca, batches, seed: int = 0) -> np.ndarray:
    """Harmony-corrected PCs: ``harmonypy.run_harmony(pca, DataFrame({"batch": batches}), ["batch"],
    random_state=seed, verbose=False)`` with harmonypy's other defaults, its logging silenced.

    ``pca`` is (cells, dims), ``batches`` one value per cell; the result has ``pca``'s shape (and floating dtype).
    Raises ``ImportError`` with ``HARMONY_INSTALL_HINT`` when harmonypy is not installed."""
    try:
        import harmonypy
    except ImportError as exc:
        raise ImportError(HARMONY_INSTALL_HINT) from exc
    pca = np.asarray(pca)
    if pca.ndim != 2:
        raise ValueError(f"pca must be a (cells, dims) matrix, got shape {pca.shape}")
    batches = np.asarray(pd.Series(np.asarray(batches)).astype(str))
    if len(batches) != pca.shape[0]:
        raise ValueError(f"{len(batches)} batch values for {pca.shape[0]} cells")
    with _quiet("harmonypy"):
        result = harmonypy.run_harmony(
            pca, pd.DataFrame({"batch": batches}), ["batch"], random_state=seed, verbose=False
        )
    corrected = _cells_first(result.Z_corr, pca, getattr(result, "Z_orig", None))
    dtype = pca.dtype if np.issubdtype(pca.dtype, np.floating) else np.float64
    return np.ascontiguousarray(corrected, dtype=dtype)
