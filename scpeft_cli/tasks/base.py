"""The task contract: what a task tells the one generic runner (`tasks/runner.py`).

A task is one folder under `tasks/` and one YAML under `conf/task/` whose `_target_` names a `Task`
subclass. It declares its validation scores, loads its cells (the obs columns it needs, the split, the
per-cell targets batches carry), builds its head, computes the training objective of a batch (possibly
several weighted objectives, each logged), scores the model on validation cells, and at the end
evaluates and writes its own outputs. Everything else (run-dir guard, seeding, tokenising, assembling,
fitting with best-validation selection, resuming, the adapter, `metrics.json` last) the runner does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader

SPLITS = ("train", "val", "test")


@dataclass
class TaskData:
    """Prepared cells, the split (cell indices per split) and the per-cell arrays batches carry (`targets`)."""

    adata: Any
    index: dict[str, np.ndarray]
    targets: dict[str, np.ndarray] = field(default_factory=dict)
    split_table: pd.DataFrame | None = None
    head_settings: dict[str, Any] = field(default_factory=dict)  # what the head needs, saved with the adapter


@dataclass
class RunContext:
    """What a run has built by the time the task is asked to evaluate and write its outputs."""

    cfg: DictConfig
    run_dir: Path
    data: TaskData
    backbone: Any  # LoadedBackbone
    parts: Any  # Assembly
    trainer: Any  # Trainer
    fit: Any  # TrainingState
    loader: Callable[..., DataLoader]  # loader(split or indices, train=False)
    title: str
    before: dict[str, Any] = field(default_factory=dict)  # what `before_training` returned


class Task(ABC):
    """Base of every task. `monitors`: validation scores that may pick the best epoch (+1 higher is
    better, -1 lower); `sweep_metric`: the metrics.json entry `scpeft train` returns to sweepers."""

    monitors: dict[str, int] = {"val_loss": -1}
    sweep_metric = "best_val_loss"

    @abstractmethod
    def load(self, cfg: DictConfig) -> TaskData:
        """The prepared cells with the obs columns this task needs, its split and per-cell targets."""

    @abstractmethod
    def build_head(self, kind: str, d_model: int, settings: dict[str, Any]) -> nn.Module:
        """The head on the cell embedding (`kind`: what the strategy asks for; `settings`: `TaskData.head_settings`)."""

    @abstractmethod
    def objective(self, data: TaskData, trainer) -> Callable:
        """(model, batch) -> (loss, {objective: value}) for the trainer (`training.trainer.Objective`)."""

    @abstractmethod
    def validate(self, data: TaskData, trainer, loader: DataLoader) -> Callable[[nn.Module], dict[str, float]]:
        """model -> this epoch's validation scores (keys include every entry of `monitors`)."""

    def before_training(self, cfg: DictConfig, data: TaskData, backbone, trainer, loader) -> dict[str, Any]:
        """Anything computed on the frozen backbone before a strategy touches it (e.g. zero-shot baselines)."""
        return {}

    @abstractmethod
    def finish(self, run: RunContext) -> dict[str, Any]:
        """Evaluate the best model and write the task's files into the run dir. Returns the metrics in the
        order metrics.json shows them: {"results": test metrics (first), "best": best-epoch validation
        figures (after best_epoch), "quality": embedding figures (after the efficiency columns),
        "baselines": {name: metrics} or None}; all but "results" may be left out."""

    def summary(self, metrics: dict[str, Any]) -> str:
        """One console line of the run's main figures."""
        return ""
