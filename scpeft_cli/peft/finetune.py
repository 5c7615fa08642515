"""The reference points every PEFT method is compared with: full fine-tuning, head only, linear probe."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from scpeft_cli.peft.base import Strategy


@dataclass
class FullFineTuning(Strategy):
    """Every backbone parameter trains, as does the head."""

    def trains(self, parameter_name: str) -> bool:
        return True

    def placement(self, backbone: nn.Module) -> str:
        return "every backbone parameter, plus the task head"


@dataclass
class HeadOnly(Strategy):
    """Frozen backbone; only the task head trains."""

    def placement(self, backbone: nn.Module) -> str:
        return "task head; backbone frozen"


@dataclass
class LinearProbe(Strategy):
    """Frozen backbone; one Linear layer on the cell embedding trains."""

    head: str = "linear"

    def placement(self, backbone: nn.Module) -> str:
        return "one Linear layer on the cell embedding; backbone frozen"
