"""What `scpeft markers` writes: the top-gene table, a states x genes AnnData a scanpy user can read
(`sc.get.rank_genes_groups_df(adata, group=STATE)`, `sc.pl.rank_genes_groups(adata)`), and a heatmap."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anndata
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from scpeft_cli import artifacts


def write_table(path: Path, top: pd.DataFrame, means: pd.DataFrame, background: pd.DataFrame) -> None:
    """markers.csv: state, gene, score, rank, with the two means the score is the difference of."""
    table = top.assign(
        state_mean=[means.at[s, g] for s, g in zip(top["state"], top["gene"], strict=True)],
        background_mean=[background.at[s, g] for s, g in zip(top["state"], top["gene"], strict=True)],
    )
    artifacts.write_csv(path, table)


def states_by_genes(scores: pd.DataFrame, means: pd.DataFrame, background: pd.DataFrame, n_cells: pd.Series, params: dict[str, Any]) -> anndata.AnnData:
    """X: the marker score of every gene (var) in every target state (obs); layers: the state's and the
    background's mean; uns["rank_genes_groups"]: every gene ranked per state, in scanpy's layout."""
    states = list(scores.index)
    adata = anndata.AnnData(
        X=scores.to_numpy(np.float32),
        obs=pd.DataFrame({"n_cells": n_cells.loc[states].to_numpy()}, index=pd.Index(states, name="state")),
        var=pd.DataFrame(index=pd.Index(scores.columns, name="gene")),
        layers={"state_mean": means.loc[states].to_numpy(np.float32), "background_mean": background.to_numpy(np.float32)},
    )
    values = scores.to_numpy(np.float32)
    order = np.argsort(-scores.to_numpy(), axis=1, kind="stable")  # as markers.csv ranks them
    names = np.asarray(scores.columns, dtype=str)

    def per_state(table: np.ndarray) -> np.recarray:
        return np.rec.fromarrays(list(table), names=states)

    # scanpy's readers also expect fold changes and p-values: an attention score has neither (NaN)
    missing = per_state(np.full(values.shape, np.nan, dtype=np.float32))
    adata.uns["rank_genes_groups"] = {
        "params": {"groupby": params["label_key"], "reference": params["background"], "method": "scpeft_attention", "use_raw": False},
        "names": per_state(names[order]),
        "scores": per_state(np.take_along_axis(values, order, axis=1)),
        "logfoldchanges": missing, "pvals": missing, "pvals_adj": missing,
    }  # fmt: skip
    adata.uns["scpeft"] = params
    return adata


def plot_heatmap(path: Path, scores: pd.DataFrame, top: pd.DataFrame, *, per_state: int, title: str, label: str) -> None:
    """Rows: states; columns: each state's `per_state` top genes (`top`, from `scoring.top_genes`) in turn,
    a gene shown once; colour: the marker score."""
    genes = list(dict.fromkeys(top.loc[top["rank"] <= per_state, "gene"]))
    shown = scores[genes].to_numpy()
    limit = float(np.abs(shown).max()) or 1.0
    fig, ax = plt.subplots(figsize=(max(5.0, 0.28 * len(genes) + 3.0), max(2.5, 0.35 * len(scores) + 1.5)))
    image = ax.imshow(shown, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_xticks(range(len(genes)), genes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(scores)), scores.index, fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03, label=label)
    fig.tight_layout()
    artifacts.save_figure(path, fig)
