"""Gene token prompt: one adapter (with skip) on the expression-value embedding; gene ids untouched."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from scpeft_cli.peft.adapter import Adapter, check_init, check_ratio, occupy
from scpeft_cli.peft.base import Strategy


@dataclass
class TokenPrompt(Strategy):
    ratio: float = 0.25
    init: str = "zero"

    def __post_init__(self):
        check_ratio(self.ratio, "peft.ratio")
        check_init(self.init)

    def attach(self, backbone: nn.Module) -> None:
        backbone.require("token_adapter", by=f"peft={self.name}")
        host = backbone.token_embedding_adapter_owner
        occupy(host, "scpeft_adapter", Adapter(backbone.d_model, self.ratio, skip=True, init=self.init), strategy=self.name)

    def placement(self, backbone: nn.Module) -> str:
        return f"adapter (skip) on {backbone.token_adapter_placement}"
