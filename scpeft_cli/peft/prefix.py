"""Deep prefix prompts: learned tokens after `<cls>`, replaced per prompted layer, stripped at the end.

The prompt positions are never masked. Unlike the adapters, prompts change the attention even when
they are zero, so the adapted model is not the pretrained one at step 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from scpeft_cli.backbones.layers import PromptHook
from scpeft_cli.errors import UserError
from scpeft_cli.peft.adapter import occupy, select_layers
from scpeft_cli.peft.base import Strategy

MAX_PREFIX_TOKENS = 1024


class PrefixPrompts(PromptHook):
    """One block of `n_tokens` prompt vectors per prompted layer (zero-initialised)."""

    def __init__(self, layers: list[int], n_tokens: int, d_model: int):
        super().__init__()
        self.layers = layers
        self.position = {layer: i for i, layer in enumerate(layers)}
        self.n_tokens = n_tokens
        self.scpeft_prefix = nn.Parameter(torch.zeros(len(layers), n_tokens, d_model))

    def before_layer(self, index, x, padding_mask):
        if index not in self.position:
            return x, padding_mask
        prompt = self.scpeft_prefix[self.position[index]].to(x.dtype).expand(x.shape[0], -1, -1)
        if index == self.layers[0]:  # insert after <cls>
            visible = padding_mask.new_zeros(x.shape[0], self.n_tokens)
            return (
                torch.cat([x[:, :1], prompt, x[:, 1:]], dim=1),
                torch.cat([padding_mask[:, :1], visible, padding_mask[:, 1:]], dim=1),
            )
        return torch.cat([x[:, :1], prompt, x[:, 1 + self.n_tokens :]], dim=1), padding_mask

    def after_stack(self, x, padding_mask):
        keep = torch.cat([x[:, :1], x[:, 1 + self.n_tokens :]], dim=1)
        return keep, torch.cat([padding_mask[:, :1], padding_mask[:, 1 + self.n_tokens :]], dim=1)


@dataclass
class Prefix(Strategy):
    n_tokens: int = 64
    layers: Sequence[int] | None = None

    def __post_init__(self):
        if not 1 <= self.n_tokens <= MAX_PREFIX_TOKENS:
            raise UserError(f"peft.n_tokens must be between 1 and {MAX_PREFIX_TOKENS}, got {self.n_tokens}")

    def attach(self, backbone: nn.Module) -> None:
        layers = select_layers(self.layers, len(backbone.layers), default="all")
        occupy(backbone, "scpeft_prompts", PrefixPrompts(layers, self.n_tokens, backbone.d_model), strategy=self.name)

    def placement(self, backbone: nn.Module) -> str:
        layers = select_layers(self.layers, len(backbone.layers), default="all")
        return f"{self.n_tokens} prompt tokens after <cls>, replaced in layers {layers}"
