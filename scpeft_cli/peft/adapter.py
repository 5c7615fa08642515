"""The bottleneck adapter block shared by the scPEFT prompts, and the layer-selection rule they use."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scpeft_cli.errors import UserError

INITS = ("zero", "published")


class Adapter(nn.Module):
    """`x + up(GELU(down(x)))` (skip) or `scale * up(GELU(down(x)))` (no skip).

    `init="zero"` zeroes `up`, so the adapted model equals the pretrained one at step 0;
    `init="published"` keeps PyTorch's default init, as the published scPEFT code did.
    """

    def __init__(self, d_model: int, ratio: float, *, skip: bool, scale: float = 1.0, init: str = "zero"):
        super().__init__()
        self.skip = skip
        self.scale = scale
        self.down = nn.Linear(d_model, max(1, int(d_model * ratio)))
        self.up = nn.Linear(self.down.out_features, d_model)
        if init == "zero":
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.up(F.gelu(self.down(x)))
        return x + delta if self.skip else self.scale * delta


def occupy(owner: nn.Module, slot: str, module: nn.Module, *, strategy: str) -> None:
    """Put `module` into an empty insertion point; two strategies on one point is a config error."""
    current = getattr(owner, slot)
    if current is not None and not isinstance(current, nn.Identity):
        raise UserError(f"{strategy} cannot attach: insertion point '{slot}' is already used by another strategy")
    setattr(owner, slot, module)


def check_ratio(ratio: float, name: str) -> None:
    if not 0 < ratio <= 1:
        raise UserError(f"{name} must be in (0, 1], got {ratio}")


def check_init(init: str) -> None:
    if init not in INITS:
        raise UserError(f"peft.init must be one of {', '.join(INITS)}, got '{init}'")


def select_layers(layers: Sequence[int] | None, n_layers: int, *, default: str) -> list[int]:
    """0-based layer indices; None means the strategy's default ('first_half' (at least one) or 'all')."""
    if layers is None:
        return list(range(max(1, n_layers // 2) if default == "first_half" else n_layers))
    chosen = sorted({int(i) for i in layers})
    bad = [i for i in chosen if not 0 <= i < n_layers]
    if bad or not chosen:
        raise UserError(f"peft.layers={list(layers)} must name layers 0..{n_layers - 1} (0-based) of this backbone")
    return chosen
