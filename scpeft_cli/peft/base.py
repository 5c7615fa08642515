"""The strategy interface: what a PEFT method attaches to a backbone and which parameters it trains.

Every parameter a strategy adds carries `ADAPTER_PREFIX` in its name, and the task head lives under
`head.`, so "what trains" and "what is saved" are the same one-line filter (as in huggingface/peft).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

ADAPTER_PREFIX = "scpeft_"
HEAD_PREFIX = "head."


@dataclass
class Strategy:
    """Base strategy: attaches nothing and trains only the head.

    `head`: the task head it pairs with when the strategy is defined by its head (linear_probe: "linear");
    None takes the task's own head (`task.head` in conf/task/*.yaml).
    """

    head: str | None = None

    @property
    def name(self) -> str:
        return type(self).__name__

    def attach(self, backbone: nn.Module) -> None:
        """Insert this strategy's modules at the backbone's insertion points (none for the base)."""

    def placement(self, backbone: nn.Module) -> str:
        """Where the strategy sits in the network, in words, for `describe`."""
        return "task head on the cell embedding"

    def trains(self, parameter_name: str) -> bool:
        """Whether a parameter of the assembled model (backbone under `backbone.`) is trained."""
        return parameter_name.startswith(HEAD_PREFIX) or ADAPTER_PREFIX in parameter_name
