"""Dropout that keeps 1-byte masks for the backward pass, and ReLU + dropout keeping one mask for both.

`nn.Dropout` on CPU keeps a float32 mask as large as its input, and `nn.ReLU` keeps its float32
output: with a frozen backbone these masks are most of what the backward pass stores besides attention
and LayerNorm inputs (benchmarks/results/saved_activations.md). Both modules compute the same
function as `nn.Dropout` / `ReLU` + `nn.Dropout` and are exact no-ops in eval mode or with p = 0.
"""

from __future__ import annotations

import torch
from torch import nn


class Dropout(nn.Dropout):
    """`nn.Dropout` through `torch.native_dropout`, whose backward keeps a bool mask (float32 on CPU otherwise)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return self._without_dropout(x)
        if self.p == 1:
            return torch.zeros_like(x)
        return self._with_dropout(x)

    def _without_dropout(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _with_dropout(self, x: torch.Tensor) -> torch.Tensor:
        return torch.native_dropout(x, self.p, True)[0]


class _ReluDropoutFunction(torch.autograd.Function):
    """relu(x) * keep / (1 - p); the backward needs only where that is non-zero, one bool per element."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        passed = torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)
        passed &= x > 0
        ctx.scale = 1 / (1 - p)
        ctx.save_for_backward(passed)
        return torch.where(passed, x * ctx.scale, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (passed,) = ctx.saved_tensors
        return torch.where(passed, grad * ctx.scale, 0), None


class ReluDropout(Dropout):
    """`Dropout(p)(relu(x))` storing one bool mask for the backward pass instead of two float32 tensors.

    A `nn.Dropout` subclass, so code that sets every dropout's `p` reaches this one too.
    """

    def _without_dropout(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x)

    def _with_dropout(self, x: torch.Tensor) -> torch.Tensor:
        return _ReluDropoutFunction.apply(x, self.p)


def activation_dropout(activation: str, p: float) -> nn.Module:
    """The feed-forward block's activation followed by dropout, fused where that saves memory."""
    if activation == "relu":
        return ReluDropout(p)
    if activation == "gelu":
        return nn.Sequential(nn.GELU(), Dropout(p))
    raise ValueError(f"unknown activation '{activation}': use relu or gelu")
