"""Linear-based methods of the huggingface `peft` library (LoRA, DoRA, IA3, ...) on the shared layers.

The library injects its layers into our Linear modules; the parameters it adds are recorded at attach
time (by object, as the library renames the weights it wraps), so the trainable filter stays one rule: the head plus what the library added.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from scpeft_cli.errors import UserError
from scpeft_cli.peft.adapter import select_layers
from scpeft_cli.peft.base import HEAD_PREFIX, Strategy

BACKBONE_PREFIX = "backbone."
MODULES = {"qkv": "self_attn.qkv", "out_proj": "self_attn.out_proj", "linear1": "linear1", "linear2": "linear2"}
METHODS = ("lora", "dora", "ia3")


@dataclass
class HFPeft(Strategy):
    method: str = "lora"
    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: Sequence[str] = field(default_factory=lambda: ["qkv"])
    layers: Sequence[int] | None = None
    added: set[str] = field(default_factory=set, repr=False)

    def __post_init__(self):
        if self.method not in METHODS:
            raise UserError(f"peft.method must be one of {', '.join(METHODS)}, got '{self.method}'")
        if self.r < 1:
            raise UserError(f"peft.r must be >= 1, got {self.r}")
        unknown = sorted(set(self.targets) - set(MODULES))
        if unknown or not self.targets:
            raise UserError(f"peft.targets {list(self.targets)}: choose from {', '.join(MODULES)}")

    @property
    def name(self) -> str:
        return f"HF-{self.method}"

    def _config(self, target_modules: list[str]):
        import peft  # optional dependency: imported only when this strategy is used

        if self.method == "ia3":
            ff = [m for m in target_modules if m.endswith(("linear1", "linear2"))]
            return peft.IA3Config(target_modules=target_modules, feedforward_modules=ff)
        return peft.LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=target_modules,
            use_dora=self.method == "dora",
        )

    def attach(self, backbone: nn.Module) -> None:
        try:
            import peft
        except ImportError as err:
            raise UserError("peft=hf needs the huggingface peft library: pip install 'scpeft-cli[hf]'") from err
        layers = select_layers(self.layers, len(backbone.active_layers), default="first_half")
        target_modules = [f"layers.{i}.{MODULES[t]}" for i in layers for t in self.targets]
        existing = {id(p) for p in backbone.parameters()}  # the library renames wrapped weights, so compare objects
        peft.inject_adapter_in_model(self._config(target_modules), backbone)
        self.added = {name for name, p in backbone.named_parameters() if id(p) not in existing}

    def trains(self, parameter_name: str) -> bool:
        return parameter_name.startswith(HEAD_PREFIX) or parameter_name.removeprefix(BACKBONE_PREFIX) in self.added

    def placement(self, backbone: nn.Module) -> str:
        layers = select_layers(self.layers, len(backbone.active_layers), default="first_half")
        return f"huggingface peft {self.method} on {', '.join(self.targets)}, layers {layers}"
