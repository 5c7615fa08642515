"""How well cell embeddings separate the labels, before and after adaptation, and a UMAP to look at."""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import scanpy as sc
from sklearn.metrics import silhouette_score

from scpeft_cli import artifacts


def label_silhouette(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Silhouette of the embeddings grouped by label (NaN when it is undefined: one label or one cell each)."""
    n_labels = len(np.unique(labels))
    if n_labels < 2 or n_labels >= len(labels):
        return float("nan")
    return float(silhouette_score(embeddings, labels))


def plot_umap(path: str | Path, embeddings: np.ndarray, *, labels: list[str], predictions: list[str], seed: int, title: str) -> None:
    """UMAP of the cells' embeddings, coloured by true label and by prediction (scanpy's layout)."""
    obs = pd.DataFrame({"label": labels, "prediction": predictions}, index=[str(i) for i in range(len(labels))])
    cells = anndata.AnnData(obsm={"X_emb": embeddings}, obs=obs)
    categories = sorted(set(labels) | set(predictions))
    for key in ("label", "prediction"):
        cells.obs[key] = pd.Categorical(cells.obs[key], categories=categories)
    sc.pp.neighbors(cells, use_rep="X_emb", n_neighbors=min(15, cells.n_obs - 1), random_state=seed)
    sc.tl.umap(cells, random_state=seed)
    figure = sc.pl.umap(cells, color=["label", "prediction"], title=[f"{title}: label", "prediction"], wspace=0.75, show=False, return_fig=True)
    figure.set_size_inches(15, 5)
    artifacts.save_figure(path, figure)
