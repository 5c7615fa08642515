"""Cell-type annotation heads: scGPT's classifier or one Linear layer on the cell embedding, and scBERT's
published head on the token states."""

from __future__ import annotations

import torch
from torch import nn

from scpeft_cli.errors import UserError
from scpeft_cli.tasks.base import CellHead, TaskHead

HEADS = ("cls_decoder", "linear", "scbert_conv")


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


class ScBERTConvHead(TaskHead):
    """scBERT's fine-tuning head: a Conv2d of width d_model collapses each position's state to one number, then
    Linear(positions, 512) -> ReLU -> Linear(512, 128) -> ReLU -> Linear(128, classes) (upstream's dropout 0).
    It reads every position, so it needs a backbone whose cells all have the same positions."""

    def __init__(self, d_model: int, positions: int, n_classes: int, hidden: tuple[int, int] = (512, 128)):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, (1, d_model))
        self.fc1 = nn.Linear(positions, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], n_classes)

    def forward(self, backbone, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        states = backbone(batch)
        x = torch.relu(self.conv1(states.unsqueeze(1))).flatten(1)
        logits = self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))
        return logits, backbone.cell_embedding(states, batch)


def build_head(kind: str, backbone, n_classes: int, n_cls_layers: int) -> TaskHead:
    """The classifier a strategy asks for: "cls_decoder" (scGPT's), "linear" (a linear probe) or
    "scbert_conv" (scBERT's published head on the token states)."""
    width = backbone.cell_embedding_dim
    if kind == "cls_decoder":
        return ClsDecoder(width, n_classes, n_cls_layers)
    if kind == "linear":
        return LinearHead(width, n_classes)
    if kind == "scbert_conv":
        if backbone.sequence_length is None:
            raise UserError(f"task.head=scbert_conv reads a fixed number of positions, which {backbone.family} cells do not have (scBERT's do)")
        return ScBERTConvHead(backbone.d_model, backbone.sequence_length, n_classes)
    raise UserError(f"task=annotation has no head '{kind}'; use one of: {', '.join(HEADS)}")
