"""scBERT and scFoundation through the command line at tiny random sizes: train on pbmc68k_reduced, then
predict and embed with the run (the contract matrix in test_strategies.py covers every strategy)."""

from __future__ import annotations

import json

import anndata
import numpy as np
import pytest
import scanpy as sc

from tests.conftest import run_cli

TINY = {
    "scbert_small": ["backbone.d_model=16", "backbone.n_layers=1", "backbone.dim_head=8", "backbone.nb_features=8"],
    "scfoundation_small": ["backbone.d_model=16", "backbone.n_layers=1", "backbone.d_ff=32", "backbone.bin_num=6"],
}


@pytest.fixture(scope="module")
def counts_file(tmp_path_factory):
    """pbmc68k_reduced's log-normalised .raw with its totals: the loader recovers the counts both need."""
    full = sc.datasets.pbmc68k_reduced()
    path = tmp_path_factory.mktemp("data") / "pbmc.h5ad"
    anndata.AnnData(X=full.raw.X, obs=full.obs[["bulk_labels", "n_counts"]], var=full.raw.var).write_h5ad(path)
    return path


@pytest.mark.parametrize("backbone", list(TINY))
def test_train_predict_and_embed(backbone, counts_file, tmp_path):
    run = tmp_path / "run"
    run_cli("train", f"backbone={backbone}", *TINY[backbone], "peft=lora", "trainer.max_epochs=1", "trainer.max_steps=4",
            "evaluation.umap=false", "evaluation.baselines=false", "evaluation.silhouette=false", f"hydra.run.dir={run}")  # fmt: skip
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["backbone"] == backbone and metrics["pretrained"] is False and 0 <= metrics["accuracy"] <= 1
    run_cli("predict", f"run={run}", f"data.path={counts_file}", f"output={tmp_path / 'pred.h5ad'}")
    assert anndata.read_h5ad(tmp_path / "pred.h5ad").obs["scpeft_label"].notna().all()
    run_cli("embed", f"run={run}", f"data.path={counts_file}", f"output={tmp_path / 'emb.h5ad'}")
    embedding = anndata.read_h5ad(tmp_path / "emb.h5ad").obsm["X_scpeft"]
    width = 4 * 16 if backbone.startswith("scfoundation") else 16  # scFoundation pools concat(S, T, max, mean)
    assert embedding.shape == (700, width) and np.isfinite(embedding).all()
