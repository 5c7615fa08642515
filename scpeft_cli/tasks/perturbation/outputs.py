"""What a perturbation run leaves besides metrics: one row per test condition with its predicted, true and
control mean expression (`predictions.h5ad`), and predicted vs true change on each condition's top DE genes."""

from __future__ import annotations

import json
from pathlib import Path

import anndata
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from scpeft_cli import artifacts


def write_predictions(
    path: Path, *, conditions: list[str], predicted: np.ndarray, truth: np.ndarray, control: np.ndarray,
    genes: pd.Index, table: pd.DataFrame, de: dict[str, np.ndarray], title: str,
) -> None:  # fmt: skip
    """X: predicted mean per test condition; layers truth and control_mean; obs: condition, subgroup, its
    metrics; uns["scpeft"]["top_de_genes"]: each condition's DE genes (names, best first) as JSON."""
    obs = table.set_index("condition").loc[conditions].reset_index()
    obs.index = pd.Index(conditions, name="condition_id")
    for column in ("condition", "subgroup"):  # categorical, as h5ad stores strings
        obs[column] = pd.Categorical(obs[column].astype(str))
    predictions = anndata.AnnData(
        X=predicted.astype(np.float32), obs=obs, var=pd.DataFrame(index=genes.astype(str)),
        layers={"truth": truth.astype(np.float32), "control_mean": np.tile(control, (len(conditions), 1)).astype(np.float32)},
    )  # fmt: skip
    top = {condition: [str(genes[i]) for i in de[condition]] for condition in conditions}
    predictions.uns["scpeft"] = {"task": "perturbation", "run": title, "top_de_genes": json.dumps(top)}
    artifacts.write_h5ad(path, predictions)


def plot_de_deltas(
    path: Path, *, conditions: list[str], predicted: np.ndarray, truth: np.ndarray, control: np.ndarray,
    genes: pd.Index, de: dict[str, np.ndarray], title: str,
) -> None:  # fmt: skip
    """One panel per condition: true and predicted change from the control mean on its top DE genes."""
    figure, axes = plt.subplots(len(conditions), 1, figsize=(9, 2.6 * len(conditions)), squeeze=False)
    for ax, row, condition in zip(axes[:, 0], range(len(conditions)), conditions, strict=True):
        idx = de[condition]
        x = np.arange(len(idx))
        ax.axhline(0, color="grey", lw=0.6)
        ax.bar(x - 0.2, truth[row, idx] - control[idx], width=0.4, label="true", color="tab:grey")
        ax.bar(x + 0.2, predicted[row, idx] - control[idx], width=0.4, label="predicted", color="tab:blue")
        ax.set_xticks(x, [str(genes[i]) for i in idx], rotation=70, fontsize=7)
        ax.set_ylabel("change vs control")
        ax.set_title(condition, fontsize=9)
    axes[0, 0].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    artifacts.save_figure(path, figure)
