"""A `-m` sweep over every strategy through the CLI, and a trained run reloaded in a fresh process."""

import json

import numpy as np
import pandas as pd
import pytest

from scpeft_cli.assembly import load_trained
from scpeft_cli.data.loading import load_pbmc68k_reduced
from scpeft_cli.training.loaders import CellTokens, make_loader
from scpeft_cli.training.trainer import Trainer
from tests.conftest import run_cli

SWEPT = ["head_only", "linear_probe", "token_prompt", "encoder_prompt", "prefix", "lora", "hf", "combo"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    run_cli(
        "train", "-m", f"peft={','.join(SWEPT)}", "backbone=scgpt_small", "trainer.max_epochs=1",
        "trainer.max_steps=3", f"hydra.sweep.dir={out}",
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
    job = next(d for name, d in job_metrics(sweep_dir).items() if name == "LoRA")
    parts, saved = load_trained(job / "adapter")
    adata = load_pbmc68k_reduced()
    predictions = pd.read_csv(job / "predictions.csv")
    test = predictions[predictions["split"] == "test"]
    index = adata.obs_names.get_indexer(test["cell_id"])
    tokens = parts.backbone.tokenizer.tokenize(adata.X, adata.var_names, seed=saved["seed"])
    labels = np.asarray(adata.obs["label"].cat.codes)
    loader = make_loader(CellTokens(tokens, labels, index), parts.backbone.tokenizer.collate, batch_size=64, shuffle=False, seed=0)
    trainer = Trainer(
        optimizer=None, scheduler=None, lr=1.0, max_epochs=0, max_steps=None, batch_size=1, eval_batch_size=64,
        grad_clip=None, patience=None, monitor="val_loss", precision="fp32", device="cpu",
        class_weighted_loss=False, balanced_sampler=False, num_workers=0,
    )
    evaluation = trainer.evaluate(parts.model, loader, lambda logits, y: logits.sum() * 0)
    predicted = np.asarray(saved["classes"])[evaluation.predictions]
    assert (predicted == test["prediction"].to_numpy()).all()
