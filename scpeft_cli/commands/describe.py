"""`scpeft describe`: the same composed config as `train`; builds the model and reports what trains."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig
from rich.table import Table

from scpeft_cli import artifacts
from scpeft_cli.assembly import Assembly, attach, build_backbone, parameter_counts
from scpeft_cli.backbones.base import DataNeeded
from scpeft_cli.commands.guard import guarded
from scpeft_cli.console import console
from scpeft_cli.instantiate import instantiate
from scpeft_cli.paths import config_dir
from scpeft_cli.tasks.base import Task
from scpeft_cli.tasks.runner import run_options, strategy_option


def _assemble(cfg: DictConfig) -> tuple[Assembly, dict]:
    """Read the data only when the model's size depends on it: the head (e.g. the class count, unless
    task.n_classes gives it), or a random backbone that builds its gene tables from the data (the builder
    says so with DataNeeded)."""
    task: Task = instantiate(cfg.task)
    settings, data = task.head_settings_from_config(), None
    if settings is None:
        data = task.load(cfg)
        settings = data.head_settings
    try:
        backbone = build_backbone(cfg, cells=None if data is None else data.adata)
    except DataNeeded:
        data = data or task.load(cfg)
        backbone = build_backbone(cfg, cells=data.adata)
    return attach(cfg, backbone, head_settings=settings), settings


def describe(cfg: DictConfig, run_dir: Path) -> dict:
    parts, settings = _assemble(cfg)
    head = parts.task.describe_head(settings)
    counts = parameter_counts(parts.model)
    groups = parts.model.parameter_groups()

    table = Table(title=f"{cfg.backbone.name} + {strategy_option(cfg)} ({head})")
    for column in ("module group", "total", "trainable", "trainable %"):
        table.add_column(column, justify="left" if column == "module group" else "right")
    for group, (total, trainable) in groups.items():
        table.add_row(group, f"{total:,}", f"{trainable:,}", f"{100 * trainable / total:.2f}")
    table.add_section()
    table.add_row(
        "[bold]all[/]", f"[bold]{counts['total_params']:,}", f"[bold]{counts['trainable_params']:,}",
        f"[bold]{100 * counts['trainable_fraction']:.2f}",
    )
    console.print(table)
    placement = parts.strategy.placement(parts.model.backbone)
    trained = sorted({_tensor_group(name) for name, p in parts.model.named_parameters() if p.requires_grad})
    console.print(f"[bold]{strategy_option(cfg)}[/] sits at: {placement}")
    console.print(f"trains: {', '.join(trained)}")
    console.print(
        f"total {counts['total_params'] / 1e6:.2f}M, trainable {counts['trainable_params'] / 1e6:.2f}M; "
        f"pretrained weights: {'yes' if parts.backbone.pretrained else 'NO (random initialisation)'}"
    )
    report = {
        **counts,
        "backbone": cfg.backbone.name,
        "peft": strategy_option(cfg),
        "task": parts.task.name,
        "head": head,
        "placement": placement,
        "trains": trained,
        "pretrained": parts.backbone.pretrained,
        "groups": {g: {"total": t, "trainable": tr} for g, (t, tr) in groups.items()},
    }
    artifacts.write_json(run_dir / "describe.json", report)
    console.print(f"wrote {run_dir / 'describe.json'}")
    return report


def _tensor_group(name: str) -> str:
    """'backbone.layers.3.scpeft_attn_adapter.down.weight' -> 'backbone.layers.*.scpeft_attn_adapter'."""
    parts = name.split(".")
    while len(parts) > 2 and (parts[-1].isdigit() or parts[-1] in {"weight", "bias", "down", "up"}):
        parts.pop()
    return ".".join("*" if part.isdigit() else part for part in parts)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> None:
    guarded(describe, options=run_options)(cfg)
