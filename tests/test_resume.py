"""Interrupted runs resume to the same result, same seed gives the same result, finished runs are kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import run_cli

# 3 epochs of ~90 small steps: long enough to be killed inside epoch 2.
RUN = ["backbone=scgpt_small", "backbone.d_model=32", "backbone.n_layers=1", "trainer.max_epochs=3",
       "trainer.patience=null", "trainer.batch_size=8", "evaluation.umap=false", "evaluation.silhouette=false",
       "evaluation.baselines=false"]
VARYING = {"train_seconds", "cells_per_second", "peak_memory_mb"}


def comparable(run_dir) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {k: v for k, v in metrics.items() if k not in VARYING}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    run_cli("train", *RUN, f"hydra.run.dir={run_dir}")
    return run_dir


def start_and_interrupt(run_dir, sig, overrides=RUN) -> subprocess.Popen:
    """Start a run, wait for its epoch-1 checkpoint, then signal it inside epoch 2."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(
        [sys.executable, "-m", "scpeft_cli", "train", *overrides, f"hydra.run.dir={run_dir}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    checkpoint = run_dir / "checkpoint" / "last.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert checkpoint.exists(), process.communicate()
    time.sleep(0.3)
    process.send_signal(sig)
    process.wait(timeout=120)
    return process


def test_same_seed_gives_identical_metrics_and_predictions(uninterrupted, tmp_path):
    again = tmp_path / "again"
    run_cli("train", *RUN, f"hydra.run.dir={again}")
    assert comparable(again) == comparable(uninterrupted)
    assert (again / "predictions.csv").read_bytes() == (uninterrupted / "predictions.csv").read_bytes()
    assert not (again / "checkpoint").exists(), "a finished run keeps no resumable checkpoint"


def test_kill_9_in_epoch_2_then_resume_equals_the_uninterrupted_run(uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    process = start_and_interrupt(run_dir, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists()
    result = run_cli("train", f"resume={run_dir}")
    assert "resuming from" in result.stdout and "after epoch 1" in result.stdout
    assert comparable(run_dir) == comparable(uninterrupted)
    assert (run_dir / "predictions.csv").read_bytes() == (uninterrupted / "predictions.csv").read_bytes()


def test_sigterm_stops_cleanly_and_rerunning_the_same_command_resumes(uninterrupted, tmp_path):
    run_dir = tmp_path / "terminated"
    process = start_and_interrupt(run_dir, signal.SIGTERM)
    _, stderr = process.communicate()
    assert process.returncode == 143 and "resume" in stderr and "Traceback" not in stderr
    assert (run_dir / "checkpoint" / "last.pt").exists() and not (run_dir / "metrics.json").exists()
    run_cli("train", *RUN, f"hydra.run.dir={run_dir}")
    assert comparable(run_dir) == comparable(uninterrupted)


def test_a_finished_run_is_never_overwritten_silently(uninterrupted, tmp_path):
    before = (uninterrupted / "metrics.json").read_bytes()
    same = run_cli("train", *RUN, f"hydra.run.dir={uninterrupted}")
    assert "already holds this finished run: skipped" in same.stdout  # re-running a sweep skips finished jobs
    other = run_cli("train", *RUN, "trainer.lr=0.01", f"hydra.run.dir={uninterrupted}", check=False)
    assert other.returncode == 2 and "overwrite=true" in other.stdout and "trainer.lr" in other.stdout
    assert (uninterrupted / "metrics.json").read_bytes() == before


def test_an_interrupted_run_resumes_only_with_its_own_configuration(tmp_path):
    run_dir = tmp_path / "changed"
    start_and_interrupt(run_dir, signal.SIGKILL)
    result = run_cli("train", *RUN, "trainer.lr=0.01", f"hydra.run.dir={run_dir}", check=False)
    assert result.returncode == 2 and "trainer.lr" in result.stdout and "another configuration" in result.stdout


def test_resume_of_something_that_is_not_a_run_dir_is_a_clear_error(tmp_path):
    result = run_cli("train", f"resume={tmp_path}", check=False)
    assert result.returncode == 2 and "not a run dir" in result.stderr
