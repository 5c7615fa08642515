"""Shared fixtures: Hydra config composition and running the CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from scpeft_cli.paths import config_dir

# A backbone small enough that a CLI run takes seconds on 2 CPU cores.
TINY = [
    "backbone=scgpt_small",
    "backbone.d_model=32",
    "backbone.n_heads=2",
    "backbone.d_hid=32",
    "backbone.n_layers=1",
    "trainer.max_epochs=2",
    "trainer.max_steps=3",
    "trainer.batch_size=16",
]


@pytest.fixture
def compose_config():
    """compose(overrides) -> the config `scpeft train` would run, without starting a run."""

    def _compose(overrides=(), config_name="train"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=False)

    yield _compose
    GlobalHydra.instance().clear()


def run_cli(*args: str, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """`scpeft ARGS` in a subprocess, as a user runs it."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
    result = subprocess.run(
        [sys.executable, "-m", "scpeft_cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and result.returncode != 0:
        raise AssertionError(f"scpeft {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result
