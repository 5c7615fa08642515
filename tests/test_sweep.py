"""A `-m` sweep over every strategy through the CLI, and a trained run reloaded in a fresh process."""

import json

import numpy as np
import pandas as pd
import pytest

from scpeft_cli.assembly import load_trained
from scpeft_cli.data.loading import load_pbmc68k_reduced
from scpeft_cli.tasks.annotation import AnnotationTask
from scpeft_cli.training.loaders import CellTokens, make_loader
from scpeft_cli.training.runtime import Runtime
from tests.conftest import TINY, run_cli

SWEPT = ["head_only", "linear_probe", "token_prompt", "encoder_prompt", "prefix", "lora", "hf", "combo"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    run_cli(
        "train", "-m", f"peft={','.join(SWEPT)}", *TINY, "backbone.n_layers=2", "evaluation.umap=false",
        "evaluation.baselines=false", "evaluation.silhouette=false", f"hydra.sweep.dir={out}",
    )
    return out


def job_metrics(sweep_dir):
    return {json.loads((d / "metrics.json").read_text())["peft"]: d for d in sorted(sweep_dir.iterdir()) if (d / "metrics.json").is_file()}


def test_every_strategy_trains_and_writes_a_small_adapter(sweep_dir):
    jobs = job_metrics(sweep_dir)
    assert len(jobs) == len(SWEPT), sorted(jobs)
    for name, job in jobs.items():
        metrics = json.loads((job / "metrics.json").read_text())
        backbone_bytes = 4 * (metrics["total_params"] - metrics["trainable_params"])
        assert metrics["adapter_bytes"] < 0.25 * backbone_bytes, name
        assert metrics["trainable_fraction"] < 0.2, name


def test_reloaded_adapter_reproduces_the_test_predictions(sweep_dir):
    job = next(d for name, d in job_metrics(sweep_dir).items() if name == "lora")
    parts, saved = load_trained(job / "adapter")
    adata = load_pbmc68k_reduced()
    predictions = pd.read_csv(job / "predictions.csv")
    test = predictions[predictions["split"] == "test"]
    index = adata.obs_names.get_indexer(test["cell_id"])
    tokens = parts.backbone.tokenizer.tokenize(adata.X, adata.var_names, seed=saved["seed"])
    labels = np.asarray(adata.obs["label"].cat.codes)
    loader = make_loader(CellTokens(tokens, {"labels": labels}, index), parts.backbone.tokenizer.collate, batch_size=64, shuffle=False, seed=0)
    evaluation = AnnotationTask().evaluate(parts.model, loader, Runtime.create(device="cpu", precision="fp32"))
    predicted = np.asarray(saved["classes"])[evaluation.predictions]
    assert (predicted == test["prediction"].to_numpy()).all()


def test_a_failing_job_is_recorded_the_sweep_goes_on_and_the_gate_fails(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli(
        "train", "-m", "peft=head_only", "trainer.lr=0.001,-1", *TINY, "evaluation.umap=false", f"hydra.sweep.dir={sweep}",
    )
    failed = json.loads((sweep / "1" / "failed.json").read_text())
    assert failed["type"] == "UserError" and "trainer.lr" in failed["error"]
    assert (sweep / "0" / "metrics.json").is_file() and not (sweep / "1" / "metrics.json").exists()

    report = run_cli("report", str(sweep), "--out", str(tmp_path / "report"), "--require", "accuracy>=0", check=False)
    assert report.returncode == 1 and "trainer.lr" in report.stdout
    summary = pd.read_csv(tmp_path / "report" / "summary.csv")
    assert {"baseline: pca_logreg", "baseline: zero_shot_knn (scgpt_small)"} <= set(summary["configuration"])
    failed_row = summary[summary["configuration"] == "trainer.lr=-1"].iloc[0]
    assert failed_row["n_failed"] == 1 and failed_row["n_runs"] == 0
    assert run_cli("report", str(sweep / "0"), "--out", str(tmp_path / "r0"), "--require", "accuracy>=0").returncode == 0
