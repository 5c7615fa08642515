"""Cell-type annotation heads: scGPT's classifier, or one Linear layer."""

from __future__ import annotations

import torch
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


def build_head(kind: str, d_model: int, n_classes: int, n_cls_layers: int) -> nn.Module:
    """The classifier a strategy asks for: "cls_decoder" (scGPT's) or "linear" (a linear probe)."""
    if kind == "cls_decoder":
        return ClsDecoder(d_model, n_classes, n_cls_layers)
    if kind == "linear":
        return nn.Linear(d_model, n_classes)
    raise UserError(f"unknown head '{kind}'; use cls_decoder or linear")
