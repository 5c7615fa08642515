"""Cell-type annotation: classification head, (optionally class-weighted) cross-entropy and metrics."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from sklearn import metrics as skm
from torch import nn

from scpeft_cli.errors import UserError


class ClsDecoder(nn.Module):
    """scGPT's classifier: [Linear, ReLU, LayerNorm] x (n_layers - 1), then Linear to the classes."""

    def __init__(self, d_model: int, n_classes: int, n_layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = []
        for _ in range(n_layers - 1):
            blocks += [nn.Linear(d_model, d_model), nn.ReLU(), nn.LayerNorm(d_model)]
        self._decoder = nn.ModuleList(blocks)
        self.out_layer = nn.Linear(d_model, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self._decoder:
            x = block(x)
        return self.out_layer(x)


@dataclass
class AnnotationTask:
    """Predict one label per cell from its embedding."""

    n_classes: int | None = None
    n_cls_layers: int = 3

    def build_head(self, kind: str, d_model: int, n_classes: int) -> nn.Module:
        if kind == "cls_decoder":
            return ClsDecoder(d_model, n_classes, self.n_cls_layers)
        if kind == "linear":
            return nn.Linear(d_model, n_classes)
        raise UserError(f"unknown head '{kind}'; use cls_decoder or linear")

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
