"""LoRA on the shared layers' Linear modules; by default on the fused QKV's query and value rows only.

The low-rank update is added in the forward pass in train and eval mode alike and never merged into
the frozen weight, so it counts exactly once everywhere (the published code counted it twice in eval).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from scpeft_cli.errors import UserError
from scpeft_cli.peft.adapter import select_layers
from scpeft_cli.peft.base import Strategy

QKV_TARGETS = ("q", "k", "v")
LINEAR_TARGETS = ("out_proj", "linear1", "linear2")


class LoRALinear(nn.Module):
    """`base(x) + scaling * B(A(dropout(x)))`, with one (A, B) pair per adapted block of output rows."""

    def __init__(self, base: nn.Linear, *, blocks: Sequence[tuple[int, int]], r: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base
        self.blocks = list(blocks)
        self.scaling = alpha / r
        self.dropout = nn.Dropout(dropout)
        self.scpeft_lora_A = nn.ParameterList(
            nn.Parameter(nn.init.kaiming_uniform_(torch.empty(r, base.in_features), a=math.sqrt(5))) for _ in self.blocks
        )
        self.scpeft_lora_B = nn.ParameterList(nn.Parameter(torch.zeros(stop - start, r)) for start, stop in self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        h = self.dropout(x)
        pieces, cursor = [], 0
        for (start, stop), a, b in zip(self.blocks, self.scpeft_lora_A, self.scpeft_lora_B, strict=True):
            if start > cursor:
                pieces.append(out.new_zeros(*out.shape[:-1], start - cursor))
            pieces.append((h @ a.T @ b.T) * self.scaling)
            cursor = stop
        if cursor < out.shape[-1]:
            pieces.append(out.new_zeros(*out.shape[:-1], out.shape[-1] - cursor))
        return out + torch.cat(pieces, dim=-1)


@dataclass
class LoRA(Strategy):
    r: int = 8
    alpha: float = 1.0
    dropout: float = 0.0
    targets: Sequence[str] = field(default_factory=lambda: ["q", "v"])
    layers: Sequence[int] | None = None

    def __post_init__(self):
        if self.r < 1:
            raise UserError(f"peft.r (LoRA rank) must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise UserError(f"peft.alpha must be positive, got {self.alpha}")
        unknown = sorted(set(self.targets) - set(QKV_TARGETS + LINEAR_TARGETS))
        if unknown or not self.targets:
            raise UserError(f"peft.targets {list(self.targets)}: choose from {', '.join(QKV_TARGETS + LINEAR_TARGETS)}")

    def attach(self, backbone: nn.Module) -> None:
        for index in select_layers(self.layers, len(backbone.active_layers), default="first_half"):
            layer = backbone.active_layers[index]
            qkv_rows = [QKV_TARGETS.index(t) for t in QKV_TARGETS if t in self.targets]
            if qkv_rows:
                d = layer.self_attn.qkv.out_features // 3  # rows of each of q, k, v
                blocks = [(row * d, (row + 1) * d) for row in qkv_rows]
                layer.self_attn.qkv = self._wrap(layer.self_attn.qkv, blocks)
            for name in LINEAR_TARGETS:
                if name in self.targets:
                    owner = layer.self_attn if name == "out_proj" else layer
                    linear = getattr(owner, name)
                    setattr(owner, name, self._wrap(linear, [(0, linear.out_features)]))

    def _wrap(self, linear: nn.Module, blocks) -> LoRALinear:
        if not isinstance(linear, nn.Linear):
            raise UserError(f"{self.name} cannot attach: a target Linear is already wrapped by another strategy")
        return LoRALinear(linear, blocks=blocks, r=self.r, alpha=self.alpha, dropout=self.dropout)

    def placement(self, backbone: nn.Module) -> str:
        layers = select_layers(self.layers, len(backbone.active_layers), default="first_half")
        return f"rank-{self.r} updates of {', '.join(self.targets)} (alpha {self.alpha}), layers {layers}"
