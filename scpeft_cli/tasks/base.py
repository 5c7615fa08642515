"""The task contract: what a task tells the one generic runner (`tasks/runner.py`).

A task is one folder under `tasks/` and one YAML under `conf/task/` (package `_global_`: its `task:`
node names a `Task` subclass, its `evaluation:` node holds the settings of `Task.Evaluation`). It declares
its validation scores and what it needs of a backbone, loads its cells (the obs columns it needs, the
split, the per-cell targets batches carry), builds its head, computes the training objective of a batch
(possibly several weighted objectives, each logged), scores the model on validation cells, and at the end
evaluates and writes its own outputs. Everything else (run-dir guard, seeding, tokenising, assembling,
fitting with best-validation selection, resuming, the adapter, `metrics.json` last) the runner does.

The head runs the backbone (`TaskHead.forward(backbone, batch)`), so a task may read token states, not
only the cell embedding; `CellHead` is the common case of a head on the cell embedding.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
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


class TaskHead(nn.Module, ABC):
    """A task's trainable modules on a backbone: `forward(backbone, batch)` gives what the task's objective
    and evaluation read; `embed(backbone, batch)` the cell embeddings the task reports."""

    @abstractmethod
    def forward(self, backbone, batch: dict[str, torch.Tensor]) -> Any: ...

    def embed(self, backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return backbone.cell_embedding(backbone(batch), batch)


class CellHead(TaskHead):
    """A head on the cell embedding: `forward` returns (`predict(embedding)`, embedding)."""

    def forward(self, backbone, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed(backbone, batch)
        return self.predict(embedding), embedding

    @abstractmethod
    def predict(self, embedding: torch.Tensor) -> torch.Tensor: ...


@dataclass
class NoEvaluationSettings:
    """A task without `evaluation:` settings."""


class Task(ABC):
    """Base of every task.

    `monitors`: validation scores that may pick the best epoch (+1 higher is better, -1 lower);
    `sweep_metric`: the metrics.json entry `scpeft train` returns to sweepers; `head`: the head a strategy
    gets unless it names its own (linear_probe: "linear"); `backbone_features`: what the backbone must
    offer (`backbones.base.FEATURES`), checked before training; `uses_split`: whether `load` splits
    with the `split` config group; `tokenizer_options`: settings of the
    backbone's tokenizer this task needs (e.g. keeping zero-expressed genes); `Evaluation`: the dataclass
    of the task's `evaluation:` settings.
    """

    monitors: dict[str, int] = {"val_loss": -1}
    sweep_metric = "best_val_loss"
    head = "default"
    uses_split = False  # whether `load` splits the cells with the `split` group (`inspect` then checks that split)
    backbone_features: tuple[str, ...] = ()
    Evaluation: type = NoEvaluationSettings

    @property
    def name(self) -> str:
        """The task's option name (conf/task/NAME.yaml), e.g. "integration" for IntegrationTask."""
        return type(self).__name__.removesuffix("Task").lower()

    @property
    def tokenizer_options(self) -> dict[str, Any]:
        return {}

    @abstractmethod
    def load(self, cfg: DictConfig) -> TaskData:
        """The prepared cells with the obs columns this task needs, its split and per-cell targets."""

    @abstractmethod
    def build_head(self, kind: str, backbone, settings: dict[str, Any]) -> TaskHead:
        """The task's head for a `LoadedBackbone` (its `d_model`, any pretrained heads it carries); `kind`: the
        strategy's head or the task's own `head`; `settings`: `TaskData.head_settings` (saved with the adapter)."""

    def head_settings_from_config(self) -> dict[str, Any] | None:
        """The head settings the task's own config gives (`scpeft describe` without data, e.g. annotation's
        `task.n_classes`); None when only the data can tell (`load(cfg).head_settings`)."""
        return None

    def describe_head(self, settings: dict[str, Any]) -> str:
        """The head's size in words for `describe`, e.g. "18 classes"."""
        return f"task {self.name}"

    def initialise_head(self, head: TaskHead, backbone) -> None:
        """Before training (not when a trained run is reloaded): start the head from what the backbone
        carries, e.g. a checkpoint's pretrained decoders (`LoadedBackbone.heads`). Default: as built."""
        return None

    def inputs(self, adata, settings: dict[str, Any]) -> dict[str, np.ndarray]:
        """Per-cell arrays a trained head reads on new cells (`scpeft embed`/`predict`), e.g. batch ids."""
        return {}

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
