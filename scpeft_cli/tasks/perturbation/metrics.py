"""Perturbation-prediction metrics as scGPT and GEARS report them, so numbers compare with published ones.

Every metric compares mean expression profiles (log-normalised, over genes) of one held-out condition:

* ``pearson`` / ``pearson_de``: Pearson correlation of predicted and true means over all genes / the top-20 DE
  genes (scGPT ``compute_perturbation_metrics``; GEARS ``compute_metrics``);
* ``pearson_delta`` / ``pearson_de_delta``: the same on the change from the control mean (scGPT), the metric GEARS'
  paper reports. The all-genes ``pearson`` is high for any prediction close to control, since the spread of gene
  means dwarfs most perturbation effects; the deltas are what separate a model from the trivial baselines;
* ``mse`` / ``mse_de``: mean squared error of the means, all genes / DE genes (GEARS ``compute_metrics``).

DE genes are GEARS' (``data_utils.get_DE_genes``): scanpy's ``rank_genes_groups`` of each condition against the
control cells (its default t-test, ranked by absolute score), the first 20.

A Pearson correlation with a constant vector is undefined; here it is 0.0 (no linear association), as GEARS turns
its NaN into 0. That case is not rare: the control-mean baseline predicts a delta of exactly zero.
"""

from __future__ import annotations

import warnings

import anndata
import numpy as np
import pandas as pd
import scanpy as sc

from scpeft_cli.data.conditions import CONTROL
from scpeft_cli.errors import UserError

__all__ = ["METRICS", "condition_metrics", "per_condition_table", "summarise", "top_de_genes"]

METRICS = ("pearson", "pearson_de", "pearson_delta", "pearson_de_delta", "mse", "mse_de")
N_DE_GENES = 20  # GEARS' and scGPT's top-20 DE genes
_GROUP = "condition"


def top_de_genes(
    adata: anndata.AnnData, *, condition_column: str = "scpeft_condition", control: str = CONTROL,
    n_genes: int = N_DE_GENES,
) -> dict[str, np.ndarray]:
    """Each non-control condition's top ``n_genes`` DE genes against control, as column indices into ``adata.var``.

    GEARS' definition on ``adata.X`` (which should be log-normalised): ``sc.tl.rank_genes_groups`` with the control
    as reference, ``rankby_abs=True``, the default method (t-test), all genes ranked, the first ``n_genes`` kept.
    It runs on a bare copy (X shared, nothing written back), so ``adata`` is not modified.
    """
    if condition_column not in adata.obs.columns:
        raise UserError(f"condition column '{condition_column}' not in obs; prepare the data with a condition column")
    if not 1 <= n_genes <= adata.n_vars:
        raise UserError(f"the number of DE genes must be in [1, {adata.n_vars}], got {n_genes}")
    conditions = adata.obs[condition_column].astype(str).to_numpy()
    sizes = pd.Series(conditions).value_counts()
    if control not in sizes.index:
        raise UserError(f"no '{control}' cells in obs['{condition_column}']; DE genes are computed against control")
    too_small = sorted(sizes.index[sizes < 2])
    if too_small:
        raise UserError(f"conditions with a single cell cannot be tested for DE: {', '.join(too_small[:5])}; drop them")
    bare = anndata.AnnData(
        X=adata.X,
        obs=pd.DataFrame({_GROUP: pd.Categorical(conditions)}, index=np.arange(adata.n_obs).astype(str)),
        var=pd.DataFrame(index=np.arange(adata.n_vars).astype(str)),
    )
    with warnings.catch_warnings():  # scanpy builds its result one column per condition; pandas complains
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
        sc.tl.rank_genes_groups(
            bare, groupby=_GROUP, reference=control, rankby_abs=True, n_genes=bare.n_vars, use_raw=False
        )
    ranked = bare.uns["rank_genes_groups"]["names"]
    return {group: ranked[group][:n_genes].astype(np.int64) for group in ranked.dtype.names}


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation, 0.0 when either vector is constant (undefined there; see the module docstring)."""
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0
    x = x - x.mean()
    y = y - y.mean()
    return float(np.clip(np.dot(x, y) / np.sqrt(np.dot(x, x) * np.dot(y, y)), -1.0, 1.0))


def condition_metrics(pred: np.ndarray, truth: np.ndarray, control: np.ndarray, de_idx: np.ndarray) -> dict[str, float]:
    """The six metrics (``METRICS``) of one condition from its predicted and true mean profiles (n_genes,), the
    control mean profile and the condition's DE gene indices."""
    pred, truth, control = (np.asarray(v, dtype=np.float64).ravel() for v in (pred, truth, control))
    if not pred.shape == truth.shape == control.shape:
        raise ValueError(f"pred, truth, control need one value per gene: {pred.shape}, {truth.shape}, {control.shape}")
    if not (np.isfinite(pred).all() and np.isfinite(truth).all() and np.isfinite(control).all()):
        raise ValueError("pred, truth and control must be finite")
    de_idx = np.asarray(de_idx, dtype=np.int64)
    if de_idx.size == 0:
        raise ValueError("de_idx is empty: every condition needs its DE genes")
    delta_pred, delta_truth = pred - control, truth - control
    return {
        "pearson": _pearson(pred, truth),
        "pearson_de": _pearson(pred[de_idx], truth[de_idx]),
        "pearson_delta": _pearson(delta_pred, delta_truth),
        "pearson_de_delta": _pearson(delta_pred[de_idx], delta_truth[de_idx]),
        "mse": float(np.mean((pred - truth) ** 2)),
        "mse_de": float(np.mean((pred[de_idx] - truth[de_idx]) ** 2)),
    }


def per_condition_table(
    pred_means: dict[str, np.ndarray], truth_means: dict[str, np.ndarray], control: np.ndarray,
    de: dict[str, np.ndarray], subgroups: dict[str, str],
) -> pd.DataFrame:
    """One row per condition of ``truth_means`` (in its order): condition, subgroup (None when ``subgroups`` has
    none for it) and the six metrics."""
    missing = [c for c in truth_means if c not in pred_means or c not in de]
    if missing:
        raise ValueError(f"no prediction or no DE genes for {len(missing)} conditions: {', '.join(missing[:5])}")
    rows = [
        {"condition": c, "subgroup": subgroups.get(c), **condition_metrics(pred_means[c], truth, control, de[c])}
        for c, truth in truth_means.items()
    ]
    return pd.DataFrame(rows, columns=["condition", "subgroup", *METRICS])


def summarise(table: pd.DataFrame) -> dict[str, float]:
    """Each metric averaged over conditions (``"pearson"``, ...), then per subgroup (``"combo_seen0_pearson"``, ...)
    for each subgroup present; conditions without a subgroup count in the overall means only."""
    if table.empty:
        raise ValueError("no conditions to summarise")
    summary = {metric: float(table[metric].mean()) for metric in METRICS}
    for subgroup, rows in table.dropna(subset=["subgroup"]).groupby("subgroup", sort=True):
        summary.update({f"{subgroup}_{metric}": float(rows[metric].mean()) for metric in METRICS})
    return summary
