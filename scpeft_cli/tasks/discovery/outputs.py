"""What a discovery run leaves besides metrics: each cell's cluster (`clusters.csv`), marker genes per cluster
(scanpy `rank_genes_groups`, `cluster_markers.csv`) and a UMAP of the adapted embedding by cluster and label."""

from __future__ import annotations

import warnings
from pathlib import Path

import anndata
import matplotlib.pyplot as plt
import pandas as pd
import scanpy as sc

from scpeft_cli import artifacts

CLUSTER_COLUMN = "scpeft_cluster"


def cluster_markers(cells: anndata.AnnData, *, n_genes: int) -> pd.DataFrame:
    """The top `n_genes` genes of each cluster vs the rest (t-test on the log-normalised data, scanpy's default)."""
    view = anndata.AnnData(X=cells.X, obs=cells.obs[[CLUSTER_COLUMN]].copy(), var=pd.DataFrame(index=cells.var_names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)  # scanpy builds its table column by column
        sc.tl.rank_genes_groups(view, CLUSTER_COLUMN, n_genes=n_genes)
    table = sc.get.rank_genes_groups_df(view, group=None)
    table["rank"] = table.groupby("group", observed=True).cumcount() + 1
    table = table.rename(columns={"group": "cluster", "names": "gene", "logfoldchanges": "log_fold_change"})
    return table[["cluster", "rank", "gene", "scores", "log_fold_change", "pvals_adj"]]


def plot_clusters_umap(path: Path, cells: anndata.AnnData, *, label_key: str | None, seed: int, title: str) -> None:
    """The adapted embedding's UMAP coloured by its clusters and, when there are labels, by label."""
    colours = [CLUSTER_COLUMN] + ([label_key] if label_key else [])
    view = anndata.AnnData(obs=cells.obs[colours].copy(), obsm={"X_scpeft": cells.obsm["X_scpeft"]})
    sc.pp.neighbors(view, use_rep="X_scpeft", n_neighbors=min(15, view.n_obs - 1), random_state=seed)
    sc.tl.umap(view, random_state=seed)
    figure, axes = plt.subplots(1, len(colours), figsize=(6.5 * len(colours), 5.5), squeeze=False)
    for ax, colour in zip(axes[0], colours, strict=True):
        sc.pl.umap(view, color=colour, ax=ax, show=False, title=f"{title}: {'cluster' if colour == CLUSTER_COLUMN else 'label'}")
    figure.tight_layout()
    artifacts.save_figure(path, figure)
