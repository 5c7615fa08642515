"""The task contract: a task written only against `tasks/base.py` runs through the generic runner, and
resume, sweeps and `report` work for it with no task-specific code anywhere else.

`CellSizeTask` (test-only) predicts each cell's log total counts from its embedding.
"""

from __future__ import annotations

import json
import signal
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest
import torch.nn.functional as F

from scpeft_cli import artifacts
from scpeft_cli.instantiate import instantiate
from scpeft_cli.tasks.annotation import AnnotationTask
from scpeft_cli.tasks.annotation.heads import LinearHead
from scpeft_cli.tasks.base import SPLITS, RunContext, Task, TaskData
from tests.conftest import run_cli
from tests.test_resume import comparable, start_and_interrupt


@dataclass
class CellSizeTask(Task):
    """Selected with `task._target_=...` on top of conf/task/annotation.yaml, whose keys it takes unused."""

    n_classes: int | None = None
    n_cls_layers: int = 3
    head: str = "linear"

    Evaluation = AnnotationTask.Evaluation  # conf/task/annotation.yaml's evaluation settings, unused

    monitors = {"val_loss": -1}
    sweep_metric = "best_val_loss"

    def load(self, cfg):
        adata = instantiate(cfg.data)
        order = np.random.default_rng(cfg.seed).permutation(adata.n_obs)
        cut = [int(0.7 * adata.n_obs), int(0.85 * adata.n_obs)]
        index = dict(zip(SPLITS, np.split(order, cut), strict=True))
        size = np.log(adata.obs["scpeft_total_counts"].to_numpy(dtype=np.float32))
        return TaskData(adata=adata, index=index, targets={"size": (size - size.mean()) / size.std()},
                        head_settings={"outputs": 1})  # fmt: skip

    def build_head(self, kind, backbone, settings):
        return LinearHead(backbone.model.cell_embedding_dim, settings["outputs"])

    def objective(self, data, trainer):
        def mse(model, batch):
            predicted, _ = model(batch)
            loss = F.mse_loss(predicted.squeeze(-1).float(), batch["size"].float())
            return loss, {"mse": loss.detach()}

        return mse

    def validate(self, data, trainer, loader):
        return lambda model: {"val_loss": self._mse(model, loader, trainer)[0]}

    def _mse(self, model, loader, trainer):
        model.eval()
        out = trainer.runtime.collect(lambda batch: {"p": model(batch)[0].squeeze(-1), "y": batch["size"]}, loader)
        return float(np.mean((out["p"] - out["y"]) ** 2)), out

    def finish(self, run: RunContext):
        mse, out = self._mse(run.parts.model, run.loader("test"), run.trainer)
        cells = np.asarray(run.data.adata.obs_names)[run.data.index["test"]]
        artifacts.write_csv(run.run_dir / "size_predictions.csv", pd.DataFrame({"cell_id": cells, "predicted": out["p"]}))
        best = run.fit.history[run.fit.best_epoch - 1]["val_loss"]
        return {"results": {"test_mse": mse, "n_test": len(cells)}, "best": {"best_val_loss": best}}

    def summary(self, metrics):
        return f"test mse {metrics['test_mse']:.3f}"


TASK = [
    "task._target_=tests.test_task_contract.CellSizeTask",
    "backbone=scgpt_small", "backbone.d_model=32", "backbone.n_layers=1", "trainer.max_epochs=3",
    "trainer.patience=null", "trainer.batch_size=16", "evaluation.umap=false", "evaluation.baselines=false",
    "evaluation.silhouette=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("task") / "run"
    run_cli("train", *TASK, f"hydra.run.dir={run_dir}")
    return run_dir


def test_a_new_task_runs_through_the_generic_runner(finished):
    metrics = json.loads((finished / "metrics.json").read_text())
    assert np.isfinite(metrics["test_mse"]) and metrics["n_test"] == 105 and metrics["best_val_loss"] > 0
    history = pd.read_csv(finished / "history.csv")
    assert {"train_loss", "train_mse", "val_loss"} <= set(history.columns)  # each objective is logged
    assert (finished / "size_predictions.csv").is_file() and (finished / "adapter" / "adapter_config.json").is_file()
    assert json.loads((finished / "adapter" / "adapter_config.json").read_text())["outputs"] == 1


def test_a_new_task_resumes_after_sigterm_to_the_uninterrupted_result(finished, tmp_path):
    resumed = tmp_path / "resumed"
    process = start_and_interrupt(resumed, signal.SIGTERM, overrides=TASK)
    assert process.returncode != 0 and not (resumed / "metrics.json").exists()
    run_cli("train", *TASK, f"hydra.run.dir={resumed}")
    assert comparable(resumed) == comparable(finished)


def test_a_sweep_of_a_new_task_and_its_report(tmp_path):
    sweep = tmp_path / "sweep"
    run_cli("train", "-m", *TASK, "peft=head_only,lora", "trainer.max_steps=10", f"hydra.sweep.dir={sweep}")
    assert len(list(sweep.glob("*/metrics.json"))) == 2
    result = run_cli("report", str(sweep), "--out", str(tmp_path / "report"), "--require", "test_mse<=100")
    summary = pd.read_csv(tmp_path / "report" / "summary.csv")
    assert "test_mse" in " ".join(summary.columns) and len(summary) == 2, result.stdout
    assert set(summary["peft"]) == {"head_only", "lora"}
