"""Shared fixtures: Hydra config composition and running the CLI as a user would."""

from __future__ import annotations

import contextlib
import io
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


@pytest.fixture(scope="module", autouse=True)
def token_cache(tmp_path_factory):
    """Each test module tokenises into a fresh cache of its own (`cache_dir` defaults to $SCPEFT_CACHE_DIR),
    never the repository's outputs/.cache: a cache left by older code cannot hide a tokenizer change.

    Per module, not per test: module-scoped fixtures run the CLI too (set up after this one), and tests that
    re-run into such a fixture's run dir must compose the same config (cache_dir included). In-process and
    `isolated=True` CLI runs inherit it through os.environ."""
    cache = tmp_path_factory.mktemp("token_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SCPEFT_CACHE_DIR", str(cache))
        yield cache


@pytest.fixture
def compose_config():
    """compose(overrides) -> the config `scpeft train` would run, without starting a run."""

    def _compose(overrides=(), config_name="train"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(config_name=config_name, overrides=list(overrides), return_hydra_config=False)

    yield _compose
    GlobalHydra.instance().clear()


def run_cli(*args: str, cwd: Path | None = None, check: bool = True, isolated: bool = False) -> subprocess.CompletedProcess:
    """`scpeft ARGS` as a user runs it: the real entry point (`cli.main`), exit code and output captured.

    In this process by default (saves the ~4 s of imports per call); `isolated=True` runs a subprocess.
    """
    if isolated:
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "200"}
        result = subprocess.run(
            [sys.executable, "-m", "scpeft_cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
        )
    else:
        result = _run_in_process(list(args), cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"scpeft {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def _run_in_process(args: list[str], cwd: Path | None) -> subprocess.CompletedProcess:
    from scpeft_cli import cli

    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_env, saved_cwd = sys.argv[:], dict(os.environ), os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(args)
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
                if not isinstance(exit_.code, int | None):
                    print(exit_.code, file=sys.stderr)
    finally:
        os.chdir(saved_cwd)
        sys.argv[:] = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)
        GlobalHydra.instance().clear()
    return subprocess.CompletedProcess(["scpeft", *args], code, out.getvalue(), err.getvalue())


def train_task_steps(model, objective, batch, *, steps: int = 2):
    """`steps` AdamW steps of a task's objective on one batch, as the trainer takes them. Returns the last
    loss, its terms, and the frozen tensors as they were before (to check that none moved)."""
    import torch

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss, terms = objective(model, batch)
        loss.backward()
        optimizer.step()
    return loss, terms, frozen
