"""Cell-type annotation: a classifier on the cell embedding, (optionally class-weighted) cross-entropy,
classification metrics, and its outputs (per-class and confusion tables, predictions, baselines, UMAP)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from sklearn import metrics as skm
from torch import nn

from scpeft_cli import artifacts
from scpeft_cli.console import console, info
from scpeft_cli.data.splits import summarize_split
from scpeft_cli.instantiate import instantiate
from scpeft_cli.tasks.annotation.baselines import knn_reference_mapping, pca_logreg
from scpeft_cli.tasks.annotation.heads import build_head
from scpeft_cli.tasks.base import SPLITS, RunContext, Task, TaskData
from scpeft_cli.tasks.embedding_quality import label_silhouette, plot_umap


@dataclass
class Evaluation:
    """Model outputs over one loader, in loader order."""

    loss: float
    logits: np.ndarray
    embeddings: np.ndarray
    labels: np.ndarray

    @property
    def predictions(self) -> np.ndarray:
        return self.logits.argmax(axis=1)

    @property
    def confidence(self) -> np.ndarray:
        """Softmax probability of the predicted class."""
        shifted = np.exp(self.logits - self.logits.max(axis=1, keepdims=True))
        return (shifted / shifted.sum(axis=1, keepdims=True)).max(axis=1)


@dataclass
class AnnotationTask(Task):
    """Predict one label per cell (`data.label_key`) from its embedding."""

    n_classes: int | None = None
    n_cls_layers: int = 3
    head: str = "cls_decoder"

    @dataclass
    class Evaluation:
        baselines: bool
        knn_k: int
        silhouette: bool
        umap: bool

    monitors = {"val_loss": -1, "val_macro_f1": 1, "val_accuracy": 1}
    sweep_metric = "best_val_macro_f1"
    uses_split = True

    # ------------------------------------------------------------------------------ the contract
    def load(self, cfg: DictConfig) -> TaskData:
        adata = instantiate(cfg.data)
        classes = [str(c) for c in adata.obs["label"].cat.categories]
        labels = adata.obs["label"].cat.codes.to_numpy().astype(np.int64)
        split = instantiate(cfg.split, _partial_=True)(obs=adata.obs, labels=labels, seed=cfg.seed)
        index = {s: np.flatnonzero(split == s) for s in SPLITS}
        console.print(f"split: {', '.join(f'{s} {len(index[s])}' for s in SPLITS)} cells")
        return TaskData(
            adata=adata, index=index, targets={"labels": labels}, split_table=summarize_split(split, labels, classes),
            head_settings={"classes": classes},
        )

    def build_head(self, kind: str, backbone, settings: dict[str, Any]) -> nn.Module:
        n_classes = len(settings["classes"]) if "classes" in settings else int(settings["n_classes"])
        return build_head(kind, backbone.model, n_classes, self.n_cls_layers)

    def head_settings_from_config(self) -> dict[str, Any] | None:
        return {"n_classes": self.n_classes} if self.n_classes else None

    def describe_head(self, settings: dict[str, Any]) -> str:
        return f"{len(settings['classes']) if 'classes' in settings else settings['n_classes']} classes"

    def objective(self, data: TaskData, trainer):
        weight = self._loss_weight(data, trainer)

        def cross_entropy(model, batch):
            logits, _ = model(batch)
            if not len(batch["labels"]):  # an empty shard under torchrun
                return logits.sum() * 0.0, {}
            return self.loss(logits, batch["labels"], weight), {}

        return cross_entropy

    def _loss_weight(self, data: TaskData, trainer) -> torch.Tensor | None:
        """Class weights of the training cells when `trainer.class_weighted_loss` (validation and test losses too)."""
        if not trainer.class_weighted_loss:
            return None
        labels = data.targets["labels"][data.index["train"]]
        return self.class_weights(labels, len(data.head_settings["classes"])).to(trainer.device)

    def validate(self, data: TaskData, trainer, loader):
        n_classes, weight = len(data.head_settings["classes"]), self._loss_weight(data, trainer)

        def scores(model) -> dict[str, float]:
            evaluation = self.evaluate(model, loader, trainer.runtime, weight)
            metrics = self.metrics(evaluation.labels, evaluation.predictions, n_classes)
            return {"val_loss": evaluation.loss, **{f"val_{k}": v for k, v in metrics.items()}}

        return scores

    def before_training(self, cfg: DictConfig, data: TaskData, backbone, trainer, loader) -> dict[str, Any]:
        if not (cfg.evaluation.baselines or cfg.evaluation.silhouette):
            return {}
        info("embedding train and test cells with the frozen backbone (zero-shot reference)")
        return {s: trainer.embed(backbone.model, loader(s)) for s in ("train", "test")}

    def finish(self, run: RunContext) -> dict[str, Any]:
        cfg, data, classes = run.cfg, run.data, run.data.head_settings["classes"]
        weight = self._loss_weight(data, run.trainer)
        evaluations = {s: self.evaluate(run.parts.model, run.loader(s), run.trainer.runtime, weight) for s in SPLITS}
        test = evaluations["test"]
        self._write_tables(run, evaluations)
        quality = self._embedding_quality(run, test)
        metrics = {
            **self.metrics(test.labels, test.predictions, len(classes)),
            "test_loss": test.loss,
            **{f"n_{s}": len(data.index[s]) for s in SPLITS},
            "n_classes": len(classes),
        }
        return {"results": metrics, "best": {"best_val_macro_f1": run.fit.history[run.fit.best_epoch - 1]["val_macro_f1"]},
                "quality": quality, "baselines": self._baselines(run) if cfg.evaluation.baselines else None}

    def summary(self, metrics: dict[str, Any]) -> str:
        return (
            f"[bold]test[/] accuracy {metrics['accuracy']:.3f}  balanced_accuracy {metrics['balanced_accuracy']:.3f}  "
            f"macro_f1 {metrics['macro_f1']:.3f}"
        )

    # ------------------------------------------------------------------------------ evaluation
    def evaluate(self, model: nn.Module, loader, runtime, weight: torch.Tensor | None = None) -> Evaluation:
        """The model's logits and embeddings over `loader`, and the (class-weighted) mean cross-entropy."""
        model.eval()

        def forward(batch):
            logits, embeddings = model(batch)
            summed_loss = self.loss(logits, batch["labels"], weight).reshape(1) * len(batch["labels"])
            return {"logits": logits, "embeddings": embeddings, "labels": batch["labels"], "loss": summed_loss}

        out = runtime.collect(forward, loader)
        return Evaluation(
            loss=float(out["loss"].sum()) / max(len(out["labels"]), 1),
            logits=out["logits"], embeddings=out["embeddings"], labels=out["labels"],
        )

    def _write_tables(self, run: RunContext, evaluations: dict[str, Evaluation]) -> None:
        test, classes, run_dir = evaluations["test"], run.data.head_settings["classes"], run.run_dir
        artifacts.write_csv(run_dir / "per_class.csv", self.per_class(test.labels, test.predictions, classes))
        confusion = self.confusion(test.labels, test.predictions, classes)
        artifacts.write_csv(run_dir / "confusion_matrix.csv", confusion, index=True)
        artifacts.plot_confusion(run_dir / "confusion_matrix.png", confusion, title=f"test confusion: {run.title}")
        artifacts.write_csv(run_dir / "split_summary.csv", run.data.split_table, index=True)
        names = np.asarray(classes)
        rows = [
            pd.DataFrame({
                "cell_id": np.asarray(run.data.adata.obs_names)[run.data.index[split]], "split": split,
                "label": names[evaluation.labels], "prediction": names[evaluation.predictions],
                "confidence": evaluation.confidence,
            })
            for split, evaluation in evaluations.items()
        ]  # fmt: skip
        artifacts.write_csv(run_dir / "predictions.csv", pd.concat(rows, ignore_index=True))

    def _embedding_quality(self, run: RunContext, test: Evaluation) -> dict[str, float]:
        quality, evaluation = {}, run.cfg.evaluation
        if evaluation.silhouette:
            quality = {
                "silhouette_before": label_silhouette(run.before["test"], test.labels),
                "silhouette_after": label_silhouette(test.embeddings, test.labels),
            }
        if evaluation.umap:
            names = np.asarray(run.data.head_settings["classes"])
            plot_umap(run.run_dir / "umap.png", test.embeddings, labels=list(names[test.labels]),
                      predictions=list(names[test.predictions]), seed=run.cfg.seed, title=run.title)  # fmt: skip
        return quality

    def _baselines(self, run: RunContext) -> dict[str, dict[str, float]]:
        data, frozen, n_classes = run.data, run.before, len(run.data.head_settings["classes"])
        labels, train, test = data.targets["labels"], data.index["train"], data.index["test"]

        def metrics(y_true, y_pred):
            return self.metrics(y_true, y_pred, n_classes)

        knn = knn_reference_mapping(
            np.concatenate([frozen["train"], frozen["test"]]), labels[np.concatenate([train, test])],
            train=np.arange(len(train)), test=len(train) + np.arange(len(test)), metrics=metrics, k=run.cfg.evaluation.knn_k,
        )  # fmt: skip
        pca = pca_logreg(data.adata.X, labels, train=train, test=test, seed=run.cfg.seed, metrics=metrics)
        console.print(f"baselines: PCA+logreg accuracy {pca['accuracy']:.3f}, zero-shot kNN accuracy {knn['accuracy']:.3f}")
        return {"pca_logreg": pca, "zero_shot_knn": knn}

    # ------------------------------------------------------------------------------ classification
    @staticmethod
    def class_weights(train_labels: np.ndarray, n_classes: int) -> torch.Tensor:
        """(1 - p_k)^2 per class, p_k its share of the training cells (the scPEFT package's weighting)."""
        share = np.bincount(train_labels, minlength=n_classes) / len(train_labels)
        return torch.tensor((1.0 - share) ** 2, dtype=torch.float32)

    @staticmethod
    def loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets, weight=weight)

    @staticmethod
    def metrics(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> dict[str, float]:
        """Accuracy, balanced accuracy, macro precision/recall/F1 and weighted F1, over the classes present."""
        labels = np.arange(n_classes)
        present = np.unique(y_true)
        return {
            "accuracy": float(skm.accuracy_score(y_true, y_pred)),
            "balanced_accuracy": float(skm.recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
            "macro_precision": float(skm.precision_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
            "macro_recall": float(skm.recall_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
            "macro_f1": float(skm.f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
            "weighted_f1": float(skm.f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        }

    @staticmethod
    def per_class(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> pd.DataFrame:
        precision, recall, f1, support = skm.precision_recall_fscore_support(
            y_true, y_pred, labels=np.arange(len(classes)), zero_division=0
        )
        return pd.DataFrame(
            {"cell_type": classes, "precision": precision, "recall": recall, "f1": f1, "support": support}
        )

    @staticmethod
    def confusion(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> pd.DataFrame:
        matrix = skm.confusion_matrix(y_true, y_pred, labels=np.arange(len(classes)))
        return pd.DataFrame(matrix, index=pd.Index(classes, name="true"), columns=classes)
