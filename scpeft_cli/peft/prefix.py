"""Deep prefix prompts: learned tokens attended to in every prompted layer, replaced per prompted layer.

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
    """One block of `n_tokens` prompt vectors per prompted layer (zero-initialised).

    The published method puts the block right after `<cls>`; here it goes in front of the sequence. The
    layers carry no position, so that gives the same results (tests/test_prefix.py), and in front the
    positions a block takes form one slice. A prompted layer's outputs at
    the prompt positions are computed only where an unprompted layer reads them: the next prompted layer
    puts in its own block, and the stack's output leaves the prompts out.
    """

    def __init__(self, layers: list[int], n_tokens: int, d_model: int, *, n_layers: int):
        super().__init__()
        self.layers = layers
        self.position = {layer: i for i, layer in enumerate(layers)}
        self.n_tokens = n_tokens
        self.n_layers = n_layers
        self.scpeft_prefix = nn.Parameter(torch.zeros(len(layers), n_tokens, d_model))

    def block(self, index, x):
        if index not in self.position:
            return None
        return self.scpeft_prefix[self.position[index]].to(x.dtype).expand(x.shape[0], -1, -1)

    def unread_outputs(self, index):
        carries_prompts = index >= self.layers[0]
        replaced_or_dropped_next = index + 1 in self.position or index + 1 == self.n_layers
        return self.n_tokens if carries_prompts and replaced_or_dropped_next else 0


@dataclass
class Prefix(Strategy):
    n_tokens: int = 64
    layers: Sequence[int] | None = None

    def __post_init__(self):
        if not 1 <= self.n_tokens <= MAX_PREFIX_TOKENS:
            raise UserError(f"peft.n_tokens must be between 1 and {MAX_PREFIX_TOKENS}, got {self.n_tokens}")

    def attach(self, backbone: nn.Module) -> None:
        backbone.require("prompts", by=f"peft={self.name}")
        layers = select_layers(self.layers, len(backbone.active_layers), default="all")
        prompts = PrefixPrompts(layers, self.n_tokens, backbone.d_model, n_layers=len(backbone.active_layers))
        occupy(backbone, "scpeft_prompts", prompts, strategy=self.name)

    def placement(self, backbone: nn.Module) -> str:
        layers = select_layers(self.layers, len(backbone.active_layers), default="all")
        return f"{self.n_tokens} prompt tokens attended to from layer {layers[0]} on, replaced in layers {layers}"
