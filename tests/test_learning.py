"""The default demo learns: full fine-tuning of scgpt_small on pbmc68k_reduced against PCA + logistic regression."""

import json

import pytest

from tests.conftest import run_cli


@pytest.mark.slow
def test_full_finetuning_is_within_ten_points_of_the_pca_baseline(tmp_path):
    run_cli("train", "backbone=scgpt_small", "peft=full", f"hydra.run.dir={tmp_path}")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    baseline = metrics["baselines"]["pca_logreg"]["accuracy"]  # PCA(50) + logistic regression on the same split
    print(f"scgpt_small full: {metrics['accuracy']:.3f}, PCA(50)+LR: {baseline:.3f}")
    assert metrics["accuracy"] >= baseline - 0.10
