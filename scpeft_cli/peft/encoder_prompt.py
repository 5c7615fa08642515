"""Gene encoder prompt: a space adapter after attention and a scaled parallel MLP adapter on the FFN.

`variant="paper"`: both adapters (the published tables); `variant="package"`: the space adapter only
(the later official package's default).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from scpeft_cli.errors import UserError
from scpeft_cli.peft.adapter import Adapter, check_init, check_ratio, occupy, select_layers
from scpeft_cli.peft.base import Strategy

VARIANTS = ("paper", "package")


@dataclass
class EncoderPrompt(Strategy):
    ratio: float = 0.25
    mlp_ratio: float = 0.25
    scale: float = 0.5
    layers: Sequence[int] | None = None
    variant: str = "paper"
    init: str = "zero"

    def __post_init__(self):
        check_ratio(self.ratio, "peft.ratio")
        check_ratio(self.mlp_ratio, "peft.mlp_ratio")
        check_init(self.init)
        if self.variant not in VARIANTS:
            raise UserError(f"peft.variant must be one of {', '.join(VARIANTS)}, got '{self.variant}'")

    def attach(self, backbone: nn.Module) -> None:
        d_model = backbone.d_model
        for index in select_layers(self.layers, len(backbone.active_layers), default="first_half"):
            layer = backbone.active_layers[index]
            occupy(layer, "scpeft_attn_adapter", Adapter(d_model, self.ratio, skip=True, init=self.init), strategy=self.name)
            if self.variant == "paper":
                mlp = Adapter(d_model, self.mlp_ratio, skip=False, scale=self.scale, init=self.init)
                occupy(layer, "scpeft_ffn_adapter", mlp, strategy=self.name)

    def placement(self, backbone: nn.Module) -> str:
        layers = select_layers(self.layers, len(backbone.active_layers), default="first_half")
        parts = "space adapter after attention" + (" + parallel scaled MLP adapter on the FFN" if self.variant == "paper" else "")
        return f"{parts}, layers {layers}"
