"""Backbone + strategy + task head as one module, with the trainable set decided by the strategy."""

from __future__ import annotations

import torch
from torch import nn

from scpeft_cli.backbones.base import Backbone
from scpeft_cli.peft.base import Strategy


class PeftModel(nn.Module):
    """Attaches the strategy to the backbone, freezes what it does not train, and classifies cells.

    Backbone parameters the forward pass never reads (`Backbone.unused_parameter_names`) stay frozen
    whatever the strategy: they would get no gradient and be saved untrained.
    """

    def __init__(self, backbone: Backbone, head: nn.Module, strategy: Strategy):
        super().__init__()
        strategy.attach(backbone)
        self.backbone = backbone
        self.head = head
        self.strategy = strategy
        unused = {f"backbone.{name}" for name in backbone.unused_parameter_names()}
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(strategy.trains(name) and name not in unused)

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.backbone.cell_embedding(self.backbone(batch), batch)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, cell embeddings)."""
        embedding = self.embed(batch)
        return self.head(embedding), embedding

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore exactly the trainable tensors; anything else in `state` or absent from it is an error."""
        expected = {name for name, p in self.named_parameters() if p.requires_grad}
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ValueError(f"trainable tensors do not match: missing {missing[:5]}, unexpected {extra[:5]}")
        parameters = dict(self.named_parameters())
        with torch.no_grad():
            for name, tensor in state.items():
                parameters[name].copy_(tensor)

    def parameter_groups(self) -> dict[str, tuple[int, int]]:
        """(total, trainable) parameter counts per top-level module group, for `describe`."""
        groups: dict[str, tuple[int, int]] = {}
        for name, parameter in self.named_parameters():
            group = _group_of(name)
            total, trainable = groups.get(group, (0, 0))
            groups[group] = (total + parameter.numel(), trainable + (parameter.numel() if parameter.requires_grad else 0))
        return groups


def _group_of(name: str) -> str:
    """'backbone.layers.3.linear1.weight' -> 'backbone.layers'; 'head.out_layer.bias' -> 'head'."""
    parts = name.split(".")
    if parts[0] != "backbone":
        return parts[0]
    return ".".join(parts[:2])
