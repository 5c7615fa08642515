"""The one run pipeline every task shares: run-dir guard, seeding, data, tokens, model, training with
best-validation selection and resume, adapter, the task's evaluation and outputs, `metrics.json` last.

What differs between tasks comes from the task (`tasks/base.py`); nothing here knows one task from another.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from scpeft_cli import artifacts
from scpeft_cli.assembly import Assembly, attach, build_backbone, parameter_counts, seed_everything
from scpeft_cli.console import console, info, warn
from scpeft_cli.errors import UserError
from scpeft_cli.instantiate import instantiate
from scpeft_cli.peft.persistence import TRAINING_GENES_FILE, save_adapter
from scpeft_cli.tasks.base import RunContext, Task, TaskData
from scpeft_cli.tokenizers.cache import tokenize_cells
from scpeft_cli.training.checkpoint import CHECKPOINT_FILE
from scpeft_cli.training.distributed import leave
from scpeft_cli.training.loaders import CellTokens, make_loader
from scpeft_cli.training.resources import PeakMemory
from scpeft_cli.training.trainer import Trainer, check_monitor


@dataclass
class RunOptions:
    seed: int
    overwrite: bool
    cache_dir: str | None


def run_options(cfg: DictConfig) -> dict[str, type]:
    """The plain (non-`_target_`) settings of a run and their types: top-level keys, and the chosen task's
    `evaluation:` settings (`Task.Evaluation`)."""
    return {"": RunOptions, "evaluation": get_class(cfg.task._target_).Evaluation}


def prepare_run_dir(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """Never overwrite a finished run silently; resume an interrupted one only under the same config.

    Returns the saved metrics when `run_dir` already holds this very run, finished: re-running a sweep
    into its own dir then skips the jobs that are done and resumes the one that was interrupted.
    """
    config_text = OmegaConf.to_yaml(cfg, resolve=True)
    changed = None
    if (run_dir / "config.yaml").is_file():
        changed = _changed_keys(OmegaConf.create((run_dir / "config.yaml").read_text()), OmegaConf.create(config_text))
    if (run_dir / "metrics.json").is_file() and not cfg.overwrite:
        if not changed:
            console.print(f"{run_dir} already holds this finished run: skipped (overwrite=true runs it again)")
            return json.loads((run_dir / "metrics.json").read_text())
        raise UserError(
            f"{run_dir} holds a finished run with another configuration ({', '.join(changed[:5])} differ); "
            "choose another hydra.run.dir or set overwrite=true"
        )
    if cfg.overwrite:
        (run_dir / "metrics.json").unlink(missing_ok=True)
        (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
    elif (run_dir / CHECKPOINT_FILE).is_file() and changed:
        raise UserError(
            f"{run_dir} holds an interrupted run with another configuration ({', '.join(changed[:5])} differ); "
            "resume it with the same settings, or use another hydra.run.dir"
        )
    (run_dir / "failed.json").unlink(missing_ok=True)  # a sweep job that failed before and runs again
    artifacts.write_text(run_dir / "config.yaml", config_text)
    return None


def _changed_keys(before: DictConfig, after: DictConfig, prefix: str = "") -> list[str]:
    keys = sorted(set(before) | set(after))
    changed = []
    for key in keys:
        a, b = before.get(key), after.get(key)
        path = f"{prefix}{key}"
        if path == "overwrite":
            continue
        if isinstance(a, DictConfig) and isinstance(b, DictConfig):
            changed += _changed_keys(a, b, f"{path}.")
        elif a != b:
            changed.append(path)
    return changed


def strategy_option(cfg: DictConfig) -> str:
    """The `peft=` option the user chose (e.g. head_only; combo:token_prompt+encoder_prompt), as typed."""
    try:
        choice = HydraConfig.get().runtime.choices.get("peft")
    except ValueError:  # not inside a Hydra app (tests composing configs)
        choice = None
    choice = choice or str(cfg.peft._target_).rsplit(".", 1)[-1]
    if cfg.peft.get("parts"):
        choice = f"{choice}:{'+'.join(cfg.peft.parts)}"
    return choice


def run_task(cfg: DictConfig, run_dir: Path) -> dict[str, Any] | None:
    """Train and evaluate one configuration of any task; `metrics.json` is written last, so it marks a finished run."""
    seed_everything(cfg.seed)
    finished = prepare_run_dir(cfg, run_dir)
    if finished is not None:
        return finished
    trainer: Trainer = instantiate(cfg.trainer)  # settings are checked before any data is read
    strategy = instantiate(cfg.peft)
    task: Task = instantiate(cfg.task)
    check_monitor(trainer.monitor, task.monitors)
    data = task.load(cfg)
    backbone = build_backbone(cfg, cells=data.adata[data.index["train"]])
    tokens = tokenize_cells(backbone.tokenizer, data.adata, seed=cfg.seed, cache_dir=cfg.cache_dir)
    info(f"tokenised {len(tokens)} cells: median {int(np.median(tokens.lengths))} tokens, max {tokens.lengths.max()}")

    def loader(split: str | np.ndarray, *, train: bool = False):
        indices = data.index[split] if isinstance(split, str) else split
        return make_loader(
            CellTokens(tokens, data.targets, indices), backbone.tokenizer.collate,
            batch_size=trainer.batch_size if train else trainer.eval_batch_size, shuffle=train, seed=cfg.seed,
            balanced=train and trainer.balanced_sampler, group_by_length=trainer.group_by_length,
            num_workers=trainer.num_workers,
        )

    main_process = trainer.group.is_main
    before = task.before_training(cfg, data, backbone, trainer, loader) if main_process else {}
    parts = attach(cfg, backbone, head_settings=data.head_settings, strategy=strategy)
    task.initialise_head(parts.model.head, backbone)
    counts = parameter_counts(parts.model)
    info(f"strategy {strategy_option(cfg)}: {counts['trainable_params']:,} of {counts['total_params']:,} parameters train ({100 * counts['trainable_fraction']:.2f}%)")
    with PeakMemory(trainer.device) as memory:
        fit = trainer.fit(
            parts.model, train_loader=loader("train", train=True), objective=task.objective(data, trainer),
            validate=task.validate(data, trainer, loader("val")), monitors=task.monitors,
            checkpoint=run_dir / CHECKPOINT_FILE,
        )
    leave(trainer.group)
    if not main_process:  # under torchrun, the first process evaluates once on the full test set and writes
        return None

    adapter_bytes = _save_adapter(cfg, parts, data, run_dir)
    artifacts.write_csv(run_dir / "history.csv", pd.DataFrame(fit.history))
    title = f"{cfg.backbone.name} / {strategy_option(cfg)}"
    outcome = task.finish(RunContext(cfg, run_dir, data, backbone, parts, trainer, fit, loader, title, before))
    metrics = {
        **outcome["results"],
        **counts,
        "adapter_bytes": adapter_bytes,
        "best_epoch": fit.best_epoch,
        **outcome.get("best", {}),
        "epochs_run": len(fit.history),
        "steps": fit.steps,
        "train_seconds": fit.train_seconds,
        "cells_per_second": fit.cells_per_second,
        "peak_memory_mb": memory.megabytes,
        "peak_memory_kind": memory.kind,
        **outcome.get("quality", {}),
        "pretrained": backbone.pretrained,
        "backbone": cfg.backbone.name,
        "checkpoint": backbone.checkpoint,
        "peft": strategy_option(cfg),
        "monitor": trainer.monitor,
        "seed": cfg.seed,
        "device": str(trainer.device),
    }
    if outcome.get("baselines") is not None:
        metrics["baselines"] = outcome["baselines"]
    artifacts.write_csv(run_dir / "metrics.csv", pd.DataFrame([_flatten(metrics)]))
    if (gene_mapping := data.adata.uns.get("scpeft_input", {}).get("gene_mapping")) is not None:
        metrics["gene_mapping"] = gene_mapping  # a nested record: metrics.json only, not a metrics.csv column
    artifacts.write_json(run_dir / "metrics.json", metrics)
    shutil.rmtree((run_dir / CHECKPOINT_FILE).parent)  # the run is complete: adapter/ holds the best model
    _print_summary(task, metrics, run_dir)
    return metrics


def _save_adapter(cfg: DictConfig, parts: Assembly, data: TaskData, run_dir: Path) -> int:
    config = {
        "backbone": {**OmegaConf.to_container(cfg.backbone, resolve=True), "checkpoint": parts.backbone.checkpoint},
        "peft": OmegaConf.to_container(cfg.peft, resolve=True),
        "peft_option": strategy_option(cfg),
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "seed": cfg.seed,
        **data.head_settings,
        "pretrained": parts.backbone.pretrained,
    }
    size = save_adapter(parts.model, run_dir / "adapter", config=config)
    if cfg.data.get("n_top_genes"):  # the model saw only these genes: new data must be restricted alike
        artifacts.write_text(run_dir / "adapter" / TRAINING_GENES_FILE, "\n".join(data.adata.var_names) + "\n")
    if not parts.backbone.pretrained:  # a random backbone's gene tables came from the data: keep them
        parts.backbone.tokenizer.save(run_dir / "adapter")
    return size


def _flatten(metrics: dict[str, Any]) -> dict[str, Any]:
    """Nested baseline metrics become columns like `baseline_pca_logreg_accuracy` in metrics.csv."""
    flat = {k: v for k, v in metrics.items() if k != "baselines"}
    for name, values in metrics.get("baselines", {}).items():
        flat.update({f"baseline_{name}_{k}": v for k, v in values.items()})
    return flat


def _print_summary(task: Task, metrics: dict[str, Any], run_dir: Path) -> None:
    if not metrics["pretrained"]:
        warn("these figures come from a RANDOMLY INITIALISED backbone, not a pretrained one (\"pretrained\": false)")
    console.print(
        f"{task.summary(metrics)}  (best epoch {metrics['best_epoch']}, {metrics['train_seconds']:.1f}s, "
        f"{metrics['cells_per_second']:.0f} cells/s, peak memory {metrics['peak_memory_mb']:.0f} MB)"
    )
    console.print(f"run dir: [bold]{run_dir}[/]  (metrics.json, adapter/, ...)")
