"""Keep a frozen projection's input instead of its output for the backward pass.

Attention saves q, k and v for backward: three tensors the size of its input, all views of the fused
QKV projection's output. When that projection is frozen (every prompt strategy), its output is a pure
function of its input, so keeping the input (one tensor) and running the projection again when the
backward pass asks for q, k or v gives the same values for a third of the memory. The cost is one more
QKV matmul per layer in the backward pass, cheaper than the weight gradients full fine-tuning computes.

When that input is itself a LayerNorm's output (every post-norm layer after the first, and every pre-norm
layer), the LayerNorm's own input is what is kept instead: LayerNorm keeps it for its backward pass
anyway, so the normalised tensor costs nothing more to keep, and it is recomputed with the projection.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn


def recomputable(projection: nn.Module, x: torch.Tensor) -> bool:
    """Whether recomputing `projection(x)` is worth it and exact: a plain frozen Linear under autograd."""
    return (
        torch.is_grad_enabled()
        and x.requires_grad
        and type(projection) is nn.Linear
        and not any(p.requires_grad for p in projection.parameters())
    )


_NORM_INPUT = "_scpeft_norm_input"  # tensor attribute: (norm, input) of a LayerNorm output


def normalized(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`norm(x)`, marked so that a frozen projection reading it keeps `x` instead (see the module docstring)."""
    out = norm(x)
    if type(norm) is nn.LayerNorm and torch.is_grad_enabled() and x.requires_grad:
        # weak: the mark must not keep `x` alive after the LayerNorm's backward pass has released it
        setattr(out, _NORM_INPUT, (norm, weakref.ref(x)))
    return out


class RecomputedProjection:
    """Saved-tensor hooks standing in for the views of `projection(x)` that autograd saves.

    Use as a context manager around the ops that consume the output; any other tensor they save is kept
    as usual. The projection runs again at most once, under the autocast state of the forward pass.
    """

    def __init__(self, projection: nn.Linear, x: torch.Tensor, output: torch.Tensor):
        self._projection = projection
        norm, norm_input = getattr(x, _NORM_INPUT, (None, lambda: None))
        norm_input = norm_input()
        self._norm, self._x = (None, x) if norm_input is None else (norm, norm_input)
        self._x_version = self._x._version
        self._storage = output.untyped_storage().data_ptr()
        self._dtype = output.dtype
        device = x.device.type
        self._autocast = (device, torch.get_autocast_dtype(device), torch.is_autocast_enabled(device))
        self._recomputed: torch.Tensor | None = None

    @property
    def kept_input(self) -> torch.Tensor:
        """The tensor kept in place of the projection's output: its input, or that input's LayerNorm input."""
        return self._x

    def pack(self, tensor: torch.Tensor):
        if tensor.untyped_storage().data_ptr() != self._storage:
            return tensor
        return tensor.size(), tensor.stride(), tensor.storage_offset()

    def unpack(self, packed) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        if self._recomputed is None:
            self._recomputed = self._recompute()
        size, stride, offset = packed
        return self._recomputed.as_strided(size, stride, offset)

    def _recompute(self) -> torch.Tensor:
        if self._x._version != self._x_version:
            raise RuntimeError(
                "the tensor kept to recompute a frozen projection was modified in place before the backward pass"
            )
        device, dtype, enabled = self._autocast
        with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            x = self._x if self._norm is None else self._norm(self._x)
            output = self._projection(x)
        if output.dtype != self._dtype:
            raise RuntimeError(f"recomputed projection has dtype {output.dtype}, the forward pass had {self._dtype}")
        return output

    def hooks(self) -> contextlib.AbstractContextManager:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
