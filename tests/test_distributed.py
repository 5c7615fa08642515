"""torchrun with 2 CPU processes (gloo) trains the same model as one process on the same global batch."""

import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.conftest import run_cli

# dropout 0: each process draws its own dropout masks, so only a dropout-free model can match exactly.
RUN = ["backbone=scgpt_small", "backbone.d_model=32", "backbone.n_layers=1", "backbone.dropout=0", "trainer.max_epochs=2",
       "trainer.max_steps=12", "trainer.patience=null", "trainer.batch_size=15", "evaluation.umap=false",
       "evaluation.baselines=false", "evaluation.silhouette=false", "peft=lora"]


def test_two_gloo_processes_match_a_single_process(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    run_cli("train", *RUN, f"hydra.run.dir={single}")
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "scpeft_cli",
         "train", *RUN, f"hydra.run.dir={ddp}"],
        env={**os.environ, "PYTHONWARNINGS": "ignore"}, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    one, two = (json.loads((d / "metrics.json").read_text()) for d in (single, ddp))
    assert two["steps"] == one["steps"] == 12 and two["n_test"] == one["n_test"]  # full test set, evaluated once
    assert two["test_loss"] == pytest.approx(one["test_loss"], rel=1e-4)
    assert two["accuracy"] == pytest.approx(one["accuracy"])
    trained_one, trained_two = (load_file(d / "adapter" / "adapter_model.safetensors") for d in (single, ddp))
    assert trained_one.keys() == trained_two.keys()
    for name in trained_one:  # Adam turns float-rounding differences of tiny gradients into ~lr-sized steps
        assert (trained_one[name] - trained_two[name]).abs().max() < 5e-3, name
