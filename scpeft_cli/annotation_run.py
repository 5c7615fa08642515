"""One annotation run: data -> split -> tokens -> model -> training -> test metrics -> run-dir files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from scpeft_cli import artifacts
from scpeft_cli.assembly import assemble, parameter_counts, seed_everything
from scpeft_cli.console import console, info, warn
from scpeft_cli.data.splits import summarize_split
from scpeft_cli.instantiate import instantiate
from scpeft_cli.peft.persistence import save_adapter
from scpeft_cli.training.loaders import CellTokens, make_loader
from scpeft_cli.training.trainer import Trainer

SPLITS = ("train", "val", "test")


def run_annotation(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train and evaluate one configuration; `metrics.json` is written last, so it marks a finished run."""
    seed_everything(cfg.seed)
    artifacts.write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    adata = instantiate(cfg.data)
    classes = list(adata.obs["label"].cat.categories)
    labels = adata.obs["label"].cat.codes.to_numpy().astype(np.int64)
    split = instantiate(cfg.split, _partial_=True)(obs=adata.obs, labels=labels, seed=cfg.seed)
    split_table = summarize_split(split, labels, classes)
    console.print(f"split: {', '.join(f'{s} {int((split == s).sum())}' for s in SPLITS)} cells")

    parts = assemble(cfg, n_classes=len(classes), genes=adata.var_names)
    tokens = parts.backbone.tokenizer.tokenize(adata.X, adata.var_names, seed=cfg.seed)
    info(f"tokenised {len(tokens)} cells: median {int(np.median(tokens.lengths))} tokens, max {tokens.lengths.max()}")

    trainer: Trainer = instantiate(cfg.trainer)
    index = {s: np.flatnonzero(split == s) for s in SPLITS}
    datasets = {s: CellTokens(tokens, labels, index[s]) for s in SPLITS}
    collate = parts.backbone.tokenizer.collate
    train_loader = make_loader(
        datasets["train"], collate, batch_size=trainer.batch_size, shuffle=True, seed=cfg.seed,
        balanced=trainer.balanced_sampler, num_workers=trainer.num_workers,
    )

    def eval_loader(dataset):
        return make_loader(dataset, collate, batch_size=trainer.eval_batch_size, shuffle=False, seed=cfg.seed, num_workers=trainer.num_workers)

    weight = None
    if trainer.class_weighted_loss:
        weight = parts.task.class_weights(labels[index["train"]], len(classes)).to(trainer.device)

    def loss_fn(logits, targets):
        return parts.task.loss(logits, targets, weight)

    def metrics_fn(y_true, y_pred):
        return parts.task.metrics(y_true, y_pred, len(classes))

    counts = parameter_counts(parts.model)
    info(f"strategy {parts.strategy.name}: {counts['trainable_params']:,} of {counts['total_params']:,} parameters train ({100 * counts['trainable_fraction']:.2f}%)")
    fit = trainer.fit(parts.model, train_loader=train_loader, val_loader=eval_loader(datasets["val"]), loss_fn=loss_fn, metrics_fn=metrics_fn)

    evaluations = {s: trainer.evaluate(parts.model, eval_loader(datasets[s]), loss_fn) for s in SPLITS}
    test = evaluations["test"]
    adapter_bytes = save_adapter(
        parts.model,
        run_dir / "adapter",
        config={
            "backbone": {**OmegaConf.to_container(cfg.backbone, resolve=True), "checkpoint": parts.backbone.checkpoint},
            "peft": OmegaConf.to_container(cfg.peft, resolve=True),
            "task": OmegaConf.to_container(cfg.task, resolve=True),
            "seed": cfg.seed,
            "classes": classes,
            "pretrained": parts.backbone.pretrained,
        },
    )
    if not parts.backbone.pretrained:
        parts.backbone.tokenizer.vocab.to_json(run_dir / "adapter" / "vocab.json")

    _write_tables(run_dir, adata.obs_names, index, evaluations, classes, parts.task, fit.history, split_table, title=f"{cfg.backbone.name} / {parts.strategy.name}")
    metrics = {
        **parts.task.metrics(test.labels, test.predictions, len(classes)),
        "test_loss": test.loss,
        "n_train": len(index["train"]),
        "n_val": len(index["val"]),
        "n_test": len(index["test"]),
        "n_classes": len(classes),
        **counts,
        "adapter_bytes": adapter_bytes,
        "best_epoch": fit.best_epoch,
        "epochs_run": len(fit.history),
        "steps": fit.steps,
        "train_seconds": fit.train_seconds,
        "pretrained": parts.backbone.pretrained,
        "backbone": cfg.backbone.name,
        "checkpoint": parts.backbone.checkpoint,
        "peft": parts.strategy.name,
        "monitor": trainer.monitor,
        "seed": cfg.seed,
        "device": str(trainer.device),
    }
    artifacts.write_csv(run_dir / "metrics.csv", pd.DataFrame([metrics]))
    artifacts.write_json(run_dir / "metrics.json", metrics)
    _print_summary(metrics, run_dir)
    return metrics


def _write_tables(run_dir, cell_ids, index, evaluations, classes, task, history, split_table, *, title) -> None:
    test = evaluations["test"]
    artifacts.write_csv(run_dir / "per_class.csv", task.per_class(test.labels, test.predictions, classes))
    confusion = task.confusion(test.labels, test.predictions, classes)
    artifacts.write_csv(run_dir / "confusion_matrix.csv", confusion, index=True)
    artifacts.plot_confusion(run_dir / "confusion_matrix.png", confusion, title=f"test confusion: {title}")
    artifacts.write_csv(run_dir / "history.csv", pd.DataFrame(history))
    artifacts.write_csv(run_dir / "split_summary.csv", split_table, index=True)
    rows = []
    for split, evaluation in evaluations.items():
        probabilities = _softmax(evaluation.logits)
        rows.append(
            pd.DataFrame(
                {
                    "cell_id": np.asarray(cell_ids)[index[split]],
                    "split": split,
                    "label": np.asarray(classes)[evaluation.labels],
                    "prediction": np.asarray(classes)[evaluation.predictions],
                    "confidence": probabilities.max(axis=1),
                }
            )
        )
    artifacts.write_csv(run_dir / "predictions.csv", pd.concat(rows, ignore_index=True))


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _print_summary(metrics: dict[str, Any], run_dir: Path) -> None:
    if not metrics["pretrained"]:
        warn("these figures come from a RANDOMLY INITIALISED backbone, not a pretrained one (\"pretrained\": false)")
    console.print(
        f"[bold]test[/] accuracy {metrics['accuracy']:.3f}  balanced_accuracy {metrics['balanced_accuracy']:.3f}  "
        f"macro_f1 {metrics['macro_f1']:.3f}  (best epoch {metrics['best_epoch']}, {metrics['train_seconds']:.1f}s)"
    )
    console.print(f"run dir: [bold]{run_dir}[/]  (metrics.json, per_class.csv, predictions.csv, adapter/)")
