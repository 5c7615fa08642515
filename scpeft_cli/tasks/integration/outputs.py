"""What an integration run leaves besides metrics: the cells with every embedding (`embeddings.h5ad`, for
scanpy/scib users) and a UMAP grid: adapted vs unintegrated, coloured by batch and by label."""

from __future__ import annotations

import json
from pathlib import Path

import anndata
import matplotlib.pyplot as plt
import scanpy as sc

from scpeft_cli import artifacts
from scpeft_cli.data.loading import BATCH_COLUMN


def write_embeddings(
    path: Path, cells: anndata.AnnData, *, metrics: dict[str, dict[str, float]], title: str, task: str = "integration"
) -> None:
    """`cells` (the run's own copy of the prepared cells, with obsm["X_scpeft"] and the baselines' embeddings),
    after setting uns["scpeft"]: the run and each embedding's metrics (as JSON, which h5ad stores faithfully)."""
    cells.uns["scpeft"] = {"task": task, "run": title, "batch_column": BATCH_COLUMN, "metrics": json.dumps(metrics)}
    artifacts.write_h5ad(path, cells)


def plot_integration_umap(path: Path, cells: anndata.AnnData, *, label_key: str | None, seed: int, title: str) -> None:
    """Rows: the adapted embedding (X_scpeft) and unintegrated PCA (X_pca); columns: batch, and label if any."""
    colours = [BATCH_COLUMN] + ([label_key] if label_key else [])
    rows = [("X_scpeft", title), ("X_pca", "unintegrated PCA")]
    figure, axes = plt.subplots(len(rows), len(colours), figsize=(6.5 * len(colours), 5.5 * len(rows)), squeeze=False)
    for row, (key, name) in enumerate(rows):
        view = anndata.AnnData(obs=cells.obs[colours].copy(), obsm={key: cells.obsm[key]})
        sc.pp.neighbors(view, use_rep=key, n_neighbors=min(15, view.n_obs - 1), random_state=seed)
        sc.tl.umap(view, random_state=seed)
        for column, colour in enumerate(colours):
            sc.pl.umap(view, color=colour, ax=axes[row][column], show=False,
                       title=f"{name}: {'batch' if colour == BATCH_COLUMN else 'label'}")  # fmt: skip
    figure.tight_layout()
    artifacts.save_figure(path, figure)
