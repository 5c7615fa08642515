"""Dropout that keeps 1-byte masks for the backward pass, and ReLU + dropout keeping one mask for both.

`nn.Dropout` on CPU keeps a float32 mask as large as its input, and `nn.ReLU` keeps its float32
output: with a frozen backbone these masks are most of what the backward pass stores besides attention
and LayerNorm inputs (benchmarks/results/saved_activations.md). Both modules compute the same
function as `nn.Dropout` / `ReLU` + `nn.Dropout` and are exact no-ops in eval mode or with p = 0.
"""

from __future__ import annotations

import torch
from torch import nn


class _MaskedDropout(torch.autograd.Function):
    """x * keep / (1 - p), optionally after ReLU; the backward needs only where that is non-zero, one
    bool per element. The mask comes from `rand < 1 - p`: on CPU 2.5x faster than `bernoulli_`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, relu: bool) -> torch.Tensor:
        passed = torch.rand(x.shape, device=x.device) >= p
        if relu:
            passed &= x > 0
        ctx.scale = 1 / (1 - p)
        ctx.save_for_backward(passed)
        return torch.where(passed, x * ctx.scale, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (passed,) = ctx.saved_tensors
        return torch.where(passed, grad * ctx.scale, 0), None, None


class Dropout(nn.Dropout):
    """`nn.Dropout` keeping a bool mask for backward (float32 on CPU otherwise); exact no-op in eval mode."""

    relu = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return torch.relu(x) if self.relu else x
        if self.p == 1:
            return torch.zeros_like(x)
        if x.device.type == "cuda" and not self.relu:
            return torch.native_dropout(x, self.p, True)[0]  # one fused kernel, bool mask
        return _MaskedDropout.apply(x, self.p, self.relu)


class ReluDropout(Dropout):
    """`Dropout(p)(relu(x))` storing one bool mask for the backward pass instead of two float32 tensors.

    A `nn.Dropout` subclass, so code that sets every dropout's `p` reaches this one too.
    """

    relu = True


def activation_dropout(activation: str, p: float) -> nn.Module:
    """The feed-forward block's activation followed by dropout, fused where that saves memory."""
    if activation == "relu":
        return ReluDropout(p)
    if activation == "gelu":
        return nn.Sequential(nn.GELU(), Dropout(p))
    raise ValueError(f"unknown activation '{activation}': use relu or gelu")
