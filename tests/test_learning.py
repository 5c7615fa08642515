"""The default demo learns: full fine-tuning of scgpt_small on pbmc68k_reduced against PCA + logistic regression."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression

from scpeft_cli.data.loading import load_pbmc68k_reduced
from tests.conftest import run_cli


@pytest.mark.slow
def test_full_finetuning_is_within_ten_points_of_a_pca_baseline(tmp_path):
    run_cli("train", "backbone=scgpt_small", "peft=full", f"hydra.run.dir={tmp_path}")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    split = pd.read_csv(tmp_path / "predictions.csv").set_index("cell_id")["split"]
    adata = load_pbmc68k_reduced()
    X, y = adata.X.toarray(), adata.obs["label"].to_numpy()
    role = split.reindex(adata.obs_names).to_numpy()
    pca = PCA(50, random_state=0).fit(X[role == "train"])
    baseline = LogisticRegression(max_iter=2000).fit(pca.transform(X[role == "train"]), y[role == "train"])
    baseline_accuracy = float(np.mean(baseline.predict(pca.transform(X[role == "test"])) == y[role == "test"]))
    print(f"scgpt_small full: {metrics['accuracy']:.3f}, PCA(50)+LR: {baseline_accuracy:.3f}")
    assert metrics["accuracy"] >= baseline_accuracy - 0.10
