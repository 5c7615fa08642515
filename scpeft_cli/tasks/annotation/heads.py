"""Cell-type annotation heads on the cell embedding: scGPT's classifier, or one Linear layer."""

from __future__ import annotations

import torch
from torch import nn

from scpeft_cli.errors import UserError
from scpeft_cli.tasks.base import CellHead

HEADS = ("cls_decoder", "linear")


class ClsDecoder(CellHead):
    """scGPT's classifier: [Linear, ReLU, LayerNorm] x (n_layers - 1), then Linear to the classes."""

    def __init__(self, d_model: int, n_classes: int, n_layers: int = 3):
        super().__init__()
        blocks: list[nn.Module] = []
        for _ in range(n_layers - 1):
            blocks += [nn.Linear(d_model, d_model), nn.ReLU(), nn.LayerNorm(d_model)]
        self._decoder = nn.ModuleList(blocks)
        self.out_layer = nn.Linear(d_model, n_classes)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        for block in self._decoder:
            x = block(x)
        return self.out_layer(x)


class LinearHead(CellHead, nn.Linear):
    """One Linear layer (a linear probe); its tensors are a plain Linear's (`head.weight`, `head.bias`)."""

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return nn.Linear.forward(self, x)


def build_head(kind: str, d_model: int, n_classes: int, n_cls_layers: int) -> CellHead:
    """The classifier a strategy asks for: "cls_decoder" (scGPT's) or "linear" (a linear probe)."""
    if kind == "cls_decoder":
        return ClsDecoder(d_model, n_classes, n_cls_layers)
    if kind == "linear":
        return LinearHead(d_model, n_classes)
    raise UserError(f"task=annotation has no head '{kind}'; use one of: {', '.join(HEADS)}")
