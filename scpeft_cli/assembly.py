"""Config -> objects: the one place where Hydra `_target_`s become a backbone, strategy, task and model."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from scpeft_cli.backbones.base import LoadedBackbone
from scpeft_cli.console import info
from scpeft_cli.errors import UserError
from scpeft_cli.instantiate import instantiate
from scpeft_cli.peft.base import Strategy
from scpeft_cli.peft.model import PeftModel
from scpeft_cli.peft.persistence import load_adapter, read_adapter_config
from scpeft_cli.tasks.base import Task


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Assembly:
    backbone: LoadedBackbone
    strategy: Strategy
    task: Task
    model: PeftModel


def build_backbone(cfg: DictConfig, *, cells=None, saved: Path | None = None) -> LoadedBackbone:
    """The backbone alone (weights loaded, or seeded random), before any strategy touches it.

    `cells`: the training cells a random backbone builds its gene tables from; `saved`: a trained run's
    adapter folder holding those tables (see `backbones/base.py`).
    """
    info(f"building backbone '{cfg.backbone.name}'")
    loaded = instantiate(cfg.backbone, seed=cfg.seed, cells=cells, saved=saved)
    if cfg.get("task") is not None:
        fit_to_task(loaded, instantiate(cfg.task))
    return loaded


def fit_to_task(loaded: LoadedBackbone, task: Task) -> None:
    """Check what the task needs of the backbone (`Task.backbone_features`) and set the tokenizer options
    the backbone declares for those features, then the task's own."""
    name = task.name
    options: dict = {}
    for feature in task.backbone_features:
        loaded.model.require(feature, by=f"task={name}")
        options |= loaded.model.feature_tokenizer_options.get(feature, {})
    options |= task.tokenizer_options
    if not options:
        return
    known = {f.name for f in dataclasses.fields(loaded.tokenizer)} if dataclasses.is_dataclass(loaded.tokenizer) else set()
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"task={name} sets tokenizer option(s) {', '.join(unknown)}, which {type(loaded.tokenizer).__name__} does not have")
    loaded.tokenizer = dataclasses.replace(loaded.tokenizer, **options)


def read_vocabulary(cfg: DictConfig):
    """The checkpoint's gene vocabulary without reading weights; None for a random backbone."""
    return instantiate(cfg.backbone, seed=cfg.seed, vocab_only=True)


def attach(cfg: DictConfig, backbone: LoadedBackbone, *, head_settings: dict, strategy: Strategy | None = None) -> Assembly:
    """Strategy (built from cfg.peft unless given) + task head around a built backbone, seeded.

    `head_settings`: what the task's head needs (`TaskData.head_settings`, saved with the adapter).
    """
    strategy = strategy or instantiate(cfg.peft)
    task: Task = instantiate(cfg.task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = task.build_head(strategy.head or task.head, backbone, head_settings)
        model = PeftModel(backbone.model, head, strategy)
    return Assembly(backbone=backbone, strategy=strategy, task=task, model=model)


def assemble(cfg: DictConfig | dict, *, head_settings: dict, cells=None, saved: Path | None = None) -> Assembly:
    """Backbone, strategy, task head and the combined model from `backbone`, `peft`, `task`, `seed`
    (a run's config or a saved adapter's)."""
    cfg = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    return attach(cfg, build_backbone(cfg, cells=cells, saved=saved), head_settings=head_settings)


def load_trained(adapter_dir: str | Path) -> tuple[Assembly, dict]:
    """Rebuild a run's model around its saved adapter: same backbone (checkpoint, or the same seeded
    random weights and vocabulary), same strategy and head, trained tensors loaded exactly."""
    adapter_dir = Path(adapter_dir)
    saved = read_adapter_config(adapter_dir)
    parts = assemble(saved, head_settings=saved, saved=adapter_dir)
    load_adapter(parts.model, adapter_dir)
    return parts, saved


def parameter_counts(model: PeftModel) -> dict[str, float]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total_params": total, "trainable_params": trainable, "trainable_fraction": trainable / total}
