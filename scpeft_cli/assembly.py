"""Config -> objects: the one place where Hydra `_target_`s become a backbone, strategy, task and model."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from scpeft_cli.backbones.base import LoadedBackbone
from scpeft_cli.console import info
from scpeft_cli.peft.base import Strategy
from scpeft_cli.peft.model import PeftModel
from scpeft_cli.tasks.annotation import AnnotationTask


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Assembly:
    backbone: LoadedBackbone
    strategy: Strategy
    task: AnnotationTask
    model: PeftModel


def assemble(cfg: DictConfig, *, n_classes: int, genes: Sequence[str] | None) -> Assembly:
    """Build backbone (weights loaded or seeded random), strategy, task head, and the combined model."""
    info(f"building backbone '{cfg.backbone.name}'")
    backbone: LoadedBackbone = instantiate(cfg.backbone, seed=cfg.seed, genes=list(genes) if genes is not None else None)
    strategy: Strategy = instantiate(cfg.peft)
    task: AnnotationTask = instantiate(cfg.task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = task.build_head(strategy.head, backbone.model.d_model, n_classes)
        model = PeftModel(backbone.model, head, strategy)
    return Assembly(backbone=backbone, strategy=strategy, task=task, model=model)


def parameter_counts(model: PeftModel) -> dict[str, float]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total_params": total, "trainable_params": trainable, "trainable_fraction": trainable / total}
