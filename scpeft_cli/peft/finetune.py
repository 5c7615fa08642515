"""The reference points every PEFT method is compared with: full fine-tuning, head only, linear probe."""

from __future__ import annotations

from dataclasses import dataclass

from scpeft_cli.peft.base import Strategy


@dataclass
class FullFineTuning(Strategy):
    """Every backbone parameter trains, as does the head."""

    def trains(self, parameter_name: str) -> bool:
        return True


@dataclass
class HeadOnly(Strategy):
    """Frozen backbone; scGPT's 3-layer classification head on the `<cls>` state trains."""


@dataclass
class LinearProbe(Strategy):
    """Frozen backbone; one Linear layer on the cell embedding trains."""

    head: str = "linear"
