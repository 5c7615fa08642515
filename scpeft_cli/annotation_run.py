"""One annotation run: data -> split -> tokens -> model -> training -> test metrics -> run-dir files."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from scpeft_cli import artifacts
from scpeft_cli.assembly import Assembly, attach, build_backbone, parameter_counts, seed_everything
from scpeft_cli.console import console, info, warn
from scpeft_cli.data.splits import summarize_split
from scpeft_cli.errors import UserError
from scpeft_cli.instantiate import instantiate
from scpeft_cli.peft.persistence import TRAINING_GENES_FILE, save_adapter
from scpeft_cli.tasks.baselines import knn_reference_mapping, pca_logreg
from scpeft_cli.tasks.embedding_quality import label_silhouette, plot_umap
from scpeft_cli.tokenizers.cache import tokenize_cells
from scpeft_cli.training.checkpoint import CHECKPOINT_FILE
from scpeft_cli.training.distributed import leave
from scpeft_cli.training.loaders import CellTokens, make_loader
from scpeft_cli.training.resources import PeakMemory
from scpeft_cli.training.trainer import Evaluation, Trainer

SPLITS = ("train", "val", "test")


@dataclass
class LabelledCells:
    adata: Any
    classes: list[str]
    labels: np.ndarray
    index: dict[str, np.ndarray]
    split_table: pd.DataFrame


def load_labelled_cells(cfg: DictConfig) -> LabelledCells:
    adata = instantiate(cfg.data)
    classes = list(adata.obs["label"].cat.categories)
    labels = adata.obs["label"].cat.codes.to_numpy().astype(np.int64)
    split = instantiate(cfg.split, _partial_=True)(obs=adata.obs, labels=labels, seed=cfg.seed)
    index = {s: np.flatnonzero(split == s) for s in SPLITS}
    console.print(f"split: {', '.join(f'{s} {len(index[s])}' for s in SPLITS)} cells")
    return LabelledCells(adata, classes, labels, index, summarize_split(split, labels, classes))


@dataclass
class RunOptions:
    seed: int
    overwrite: bool
    cache_dir: str | None


@dataclass
class EvaluationOptions:
    baselines: bool
    knn_k: int
    silhouette: bool
    umap: bool


OPTIONS = {"": RunOptions, "evaluation": EvaluationOptions}


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


def run_annotation(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train and evaluate one configuration; `metrics.json` is written last, so it marks a finished run."""
    seed_everything(cfg.seed)
    finished = prepare_run_dir(cfg, run_dir)
    if finished is not None:
        return finished
    trainer: Trainer = instantiate(cfg.trainer)  # settings are checked before any data is read
    strategy = instantiate(cfg.peft)
    cells = load_labelled_cells(cfg)
    backbone = build_backbone(cfg, cells=cells.adata[cells.index["train"]])
    tokens = tokenize_cells(backbone.tokenizer, cells.adata, seed=cfg.seed, cache_dir=cfg.cache_dir)
    info(f"tokenised {len(tokens)} cells: median {int(np.median(tokens.lengths))} tokens, max {tokens.lengths.max()}")

    def loader(split: str | np.ndarray, *, train: bool = False):
        indices = cells.index[split] if isinstance(split, str) else split
        return make_loader(
            CellTokens(tokens, cells.labels, indices), backbone.tokenizer.collate,
            batch_size=trainer.batch_size if train else trainer.eval_batch_size, shuffle=train, seed=cfg.seed,
            balanced=train and trainer.balanced_sampler, group_by_length=trainer.group_by_length,
            num_workers=trainer.num_workers,
        )

    frozen = None
    main_process = trainer.group.is_main
    if main_process and (cfg.evaluation.baselines or cfg.evaluation.silhouette):
        info("embedding train and test cells with the frozen backbone (zero-shot reference)")
        frozen = {s: trainer.embed(backbone.model, loader(s)) for s in ("train", "test")}

    parts = attach(cfg, backbone, n_classes=len(cells.classes), strategy=strategy)
    weight = parts.task.class_weights(cells.labels[cells.index["train"]], len(cells.classes)) if trainer.class_weighted_loss else None
    weight = None if weight is None else weight.to(trainer.device)

    def loss_fn(logits, targets):
        return parts.task.loss(logits, targets, weight)

    def metrics_fn(y_true, y_pred):
        return parts.task.metrics(y_true, y_pred, len(cells.classes))

    counts = parameter_counts(parts.model)
    info(f"strategy {strategy_option(cfg)}: {counts['trainable_params']:,} of {counts['total_params']:,} parameters train ({100 * counts['trainable_fraction']:.2f}%)")
    with PeakMemory(trainer.device) as memory:
        fit = trainer.fit(
            parts.model, train_loader=loader("train", train=True), val_loader=loader("val"), loss_fn=loss_fn,
            metrics_fn=metrics_fn, checkpoint=run_dir / CHECKPOINT_FILE,
        )
    leave(trainer.group)
    if not main_process:  # under torchrun, the first process evaluates once on the full test set and writes
        return None
    evaluations = {s: trainer.evaluate(parts.model, loader(s), loss_fn) for s in SPLITS}
    test = evaluations["test"]

    adapter_bytes = _save_adapter(cfg, parts, cells.classes, list(cells.adata.var_names), run_dir)
    _write_tables(run_dir, cells, evaluations, parts, fit.history, title=f"{cfg.backbone.name} / {strategy_option(cfg)}")
    quality = _embedding_quality(cfg, cells, frozen, test, run_dir, title=f"{cfg.backbone.name} / {strategy_option(cfg)}")
    metrics = {
        **parts.task.metrics(test.labels, test.predictions, len(cells.classes)),
        "test_loss": test.loss,
        "n_train": len(cells.index["train"]),
        "n_val": len(cells.index["val"]),
        "n_test": len(cells.index["test"]),
        "n_classes": len(cells.classes),
        **counts,
        "adapter_bytes": adapter_bytes,
        "best_epoch": fit.best_epoch,
        "best_val_macro_f1": fit.history[fit.best_epoch - 1]["val_macro_f1"],
        "epochs_run": len(fit.history),
        "steps": fit.steps,
        "train_seconds": fit.train_seconds,
        "cells_per_second": fit.cells_per_second,
        "peak_memory_mb": memory.megabytes,
        "peak_memory_kind": memory.kind,
        **quality,
        "pretrained": parts.backbone.pretrained,
        "backbone": cfg.backbone.name,
        "checkpoint": parts.backbone.checkpoint,
        "peft": strategy_option(cfg),
        "monitor": trainer.monitor,
        "seed": cfg.seed,
        "device": str(trainer.device),
    }
    if cfg.evaluation.baselines:
        metrics["baselines"] = _baselines(cfg, cells, frozen, metrics_fn)
    artifacts.write_csv(run_dir / "metrics.csv", pd.DataFrame([_flatten(metrics)]))
    artifacts.write_json(run_dir / "metrics.json", metrics)
    shutil.rmtree((run_dir / CHECKPOINT_FILE).parent)  # the run is complete: adapter/ holds the best model
    _print_summary(metrics, run_dir)
    return metrics


def _save_adapter(cfg: DictConfig, parts: Assembly, classes: list[str], genes: list[str], run_dir: Path) -> int:
    config = {
        "backbone": {**OmegaConf.to_container(cfg.backbone, resolve=True), "checkpoint": parts.backbone.checkpoint},
        "peft": OmegaConf.to_container(cfg.peft, resolve=True),
        "peft_option": strategy_option(cfg),
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "seed": cfg.seed,
        "classes": classes,
        "pretrained": parts.backbone.pretrained,
    }
    size = save_adapter(parts.model, run_dir / "adapter", config=config)
    if cfg.data.get("n_top_genes"):  # the model saw only these genes: new data must be restricted alike
        artifacts.write_text(run_dir / "adapter" / TRAINING_GENES_FILE, "\n".join(genes) + "\n")
    if not parts.backbone.pretrained:  # a random backbone's gene tables came from the data: keep them
        parts.backbone.tokenizer.save(run_dir / "adapter")
    return size


def _baselines(cfg: DictConfig, cells: LabelledCells, frozen: dict[str, np.ndarray], metrics_fn) -> dict[str, dict[str, float]]:
    train, test = cells.index["train"], cells.index["test"]
    knn = knn_reference_mapping(
        np.concatenate([frozen["train"], frozen["test"]]), cells.labels[np.concatenate([train, test])],
        train=np.arange(len(train)), test=len(train) + np.arange(len(test)), metrics=metrics_fn, k=cfg.evaluation.knn_k,
    )
    pca = pca_logreg(cells.adata.X, cells.labels, train=train, test=test, seed=cfg.seed, metrics=metrics_fn)
    console.print(f"baselines: PCA+logreg accuracy {pca['accuracy']:.3f}, zero-shot kNN accuracy {knn['accuracy']:.3f}")
    return {"pca_logreg": pca, "zero_shot_knn": knn}


def _embedding_quality(cfg, cells: LabelledCells, frozen: dict | None, test: Evaluation, run_dir: Path, *, title: str) -> dict[str, float]:
    quality = {}
    if cfg.evaluation.silhouette:
        quality = {
            "silhouette_before": label_silhouette(frozen["test"], test.labels),
            "silhouette_after": label_silhouette(test.embeddings, test.labels),
        }
    if cfg.evaluation.umap:
        names = np.asarray(cells.classes)
        plot_umap(run_dir / "umap.png", test.embeddings, labels=list(names[test.labels]), predictions=list(names[test.predictions]), seed=cfg.seed, title=title)
    return quality


def _flatten(metrics: dict[str, Any]) -> dict[str, Any]:
    """Nested baseline metrics become columns like `baseline_pca_logreg_accuracy` in metrics.csv."""
    flat = {k: v for k, v in metrics.items() if k != "baselines"}
    for name, values in metrics.get("baselines", {}).items():
        flat.update({f"baseline_{name}_{k}": v for k, v in values.items()})
    return flat


def _write_tables(run_dir, cells: LabelledCells, evaluations, parts: Assembly, history, *, title) -> None:
    test, task, classes = evaluations["test"], parts.task, cells.classes
    artifacts.write_csv(run_dir / "per_class.csv", task.per_class(test.labels, test.predictions, classes))
    confusion = task.confusion(test.labels, test.predictions, classes)
    artifacts.write_csv(run_dir / "confusion_matrix.csv", confusion, index=True)
    artifacts.plot_confusion(run_dir / "confusion_matrix.png", confusion, title=f"test confusion: {title}")
    artifacts.write_csv(run_dir / "history.csv", pd.DataFrame(history))
    artifacts.write_csv(run_dir / "split_summary.csv", cells.split_table, index=True)
    names = np.asarray(classes)
    rows = [
        pd.DataFrame(
            {
                "cell_id": np.asarray(cells.adata.obs_names)[cells.index[split]],
                "split": split,
                "label": names[evaluation.labels],
                "prediction": names[evaluation.predictions],
                "confidence": evaluation.confidence,
            }
        )
        for split, evaluation in evaluations.items()
    ]
    artifacts.write_csv(run_dir / "predictions.csv", pd.concat(rows, ignore_index=True))


def _print_summary(metrics: dict[str, Any], run_dir: Path) -> None:
    if not metrics["pretrained"]:
        warn("these figures come from a RANDOMLY INITIALISED backbone, not a pretrained one (\"pretrained\": false)")
    console.print(
        f"[bold]test[/] accuracy {metrics['accuracy']:.3f}  balanced_accuracy {metrics['balanced_accuracy']:.3f}  "
        f"macro_f1 {metrics['macro_f1']:.3f}  (best epoch {metrics['best_epoch']}, {metrics['train_seconds']:.1f}s, "
        f"{metrics['cells_per_second']:.0f} cells/s, peak memory {metrics['peak_memory_mb']:.0f} MB)"
    )
    console.print(f"run dir: [bold]{run_dir}[/]  (metrics.json, per_class.csv, predictions.csv, adapter/)")
