"""Backbone + strategy + task head as one module, with the trainable set decided by the strategy."""

from __future__ import annotations

import torch
from torch import nn

from scpeft_cli.backbones.base import Backbone
from scpeft_cli.peft.base import Strategy


class PeftModel(nn.Module):
    """Attaches the strategy to the backbone, freezes what it does not train, and runs the task head.

    Its state that training changes (`trainable_state_dict`) is the trainable parameters plus the head's
    buffers (e.g. batch-norm running statistics). Backbone parameters the forward pass never reads (`Backbone.unused_parameter_names`) stay frozen
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
        """The cell embeddings the task reports (`TaskHead.embed`)."""
        return self.head.embed(self.backbone, batch)

    def forward(self, batch: dict[str, torch.Tensor]):
        """What the task head makes of the batch (`TaskHead.forward`); a `CellHead` gives (outputs, embeddings)."""
        return self.head(self.backbone, batch)

    def _trained_tensors(self) -> dict[str, torch.Tensor]:
        trained = {name: p for name, p in self.named_parameters() if p.requires_grad}
        return trained | {f"head.{name}": b for name, b in self.head.named_buffers()}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach() for name, tensor in self._trained_tensors().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore exactly the trained tensors; anything else in `state` or absent from it is an error."""
        tensors = self._trained_tensors()
        if set(state) != set(tensors):
            missing, extra = sorted(set(tensors) - set(state)), sorted(set(state) - set(tensors))
            raise ValueError(f"trainable tensors do not match: missing {missing[:5]}, unexpected {extra[:5]}")
        with torch.no_grad():
            for name, tensor in state.items():
                tensors[name].copy_(tensor)

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
