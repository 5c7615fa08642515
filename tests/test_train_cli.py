"""`scpeft train` and `scpeft describe` end to end, as a user runs them."""

import json

import pandas as pd
import pytest
from safetensors.torch import load_file

from tests.conftest import TINY, run_cli

METRIC_KEYS = {
    "accuracy", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_f1",
    "n_train", "n_val", "n_test", "n_classes", "trainable_params", "total_params", "trainable_fraction",
    "best_epoch", "train_seconds", "pretrained", "backbone", "peft", "seed",
}


@pytest.fixture(scope="module")
def head_only_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    result = run_cli("train", *TINY, "peft=head_only", f"hydra.run.dir={run_dir}")
    return run_dir, result


def test_train_writes_every_output(head_only_run):
    run_dir, result = head_only_run
    for name in ("config.yaml", "metrics.json", "metrics.csv", "per_class.csv", "confusion_matrix.csv",
                 "confusion_matrix.png", "predictions.csv", "history.csv", "adapter/adapter_model.safetensors",
                 "adapter/adapter_config.json"):
        assert (run_dir / name).is_file(), name
    assert str(run_dir) in result.stdout


def test_metrics_are_complete_and_flag_the_random_backbone(head_only_run):
    run_dir, result = head_only_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert metrics["pretrained"] is False and "RANDOMLY INITIALISED" in result.stdout
    assert metrics["n_train"] + metrics["n_val"] + metrics["n_test"] == 700
    assert metrics["n_classes"] == 10 and metrics["peft"] == "head_only" and metrics["seed"] == 0
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    csv = pd.read_csv(run_dir / "metrics.csv")
    assert csv.loc[0, "macro_f1"] == pytest.approx(metrics["macro_f1"])


def test_tables_agree_with_each_other(head_only_run):
    run_dir, _ = head_only_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    predictions = pd.read_csv(run_dir / "predictions.csv")
    assert list(predictions.columns[:4]) == ["cell_id", "split", "label", "prediction"]
    assert predictions["cell_id"].is_unique and len(predictions) == 700
    test = predictions[predictions["split"] == "test"]
    assert (test["label"] == test["prediction"]).mean() == pytest.approx(metrics["accuracy"])
    per_class = pd.read_csv(run_dir / "per_class.csv")
    assert per_class["support"].sum() == metrics["n_test"]
    confusion = pd.read_csv(run_dir / "confusion_matrix.csv", index_col=0)
    assert confusion.to_numpy().sum() == metrics["n_test"]
    history = pd.read_csv(run_dir / "history.csv")
    assert {"epoch", "train_loss", "val_loss", "val_macro_f1"} <= set(history.columns)


def test_adapter_holds_only_the_trained_tensors(head_only_run):
    run_dir, _ = head_only_run
    tensors = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert tensors and all(name.startswith("head.") for name in tensors)
    assert sum(t.numel() for t in tensors.values()) == metrics["trainable_params"]
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["classes"] and config["backbone"]["name"] == "scgpt_small"


def test_describe_whole_human_full_and_head_only(tmp_path):
    full = run_cli("describe", "backbone=scgpt", "peft=full", "task.n_classes=18", f"hydra.run.dir={tmp_path / 'full'}")
    report = json.loads((tmp_path / "full" / "describe.json").read_text())
    assert report["total_params"] == pytest.approx(50.81e6, abs=0.05e6)
    assert report["trainable_fraction"] == 1.0
    assert "50,814,994" in full.stdout
    run_cli("describe", "backbone=scgpt", "peft=head_only", "task.n_classes=18", f"hydra.run.dir={tmp_path / 'head'}")
    head = json.loads((tmp_path / "head" / "describe.json").read_text())
    assert head["trainable_params"] == pytest.approx(0.54e6, abs=0.01e6)
    assert head["groups"]["backbone.layers"]["trainable"] == 0


def test_cfg_job_prints_the_composed_config(tmp_path):
    result = run_cli("train", "--cfg", "job", "peft=linear_probe", cwd=tmp_path)
    assert "_target_: scpeft_cli.peft.finetune.LinearProbe" in result.stdout
    assert not (tmp_path / "outputs").exists()


def test_unknown_command_is_a_usage_error():
    result = run_cli("frobnicate", check=False)
    assert result.returncode == 2 and "unknown command" in result.stderr


@pytest.mark.parametrize(
    "strategy,paper_millions",
    [("token_prompt", 0.66), ("encoder_prompt", 2.11), ("prefix", 0.92)],
)
def test_describe_matches_the_paper_parameter_counts(tmp_path, strategy, paper_millions):
    result = run_cli("describe", "backbone=scgpt", f"peft={strategy}", "task.n_classes=18", f"hydra.run.dir={tmp_path}")
    report = json.loads((tmp_path / "describe.json").read_text())
    assert report["trainable_params"] == pytest.approx(paper_millions * 1e6, rel=0.05)
    assert report["placement"] and "sits at" in result.stdout
    assert all(name.startswith("head") or "scpeft_" in name for name in report["trains"])
