"""Where and in which precision the model runs: device choice, bf16 autocast, batched inference."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from scpeft_cli.errors import UserError

Batch = dict[str, torch.Tensor]


def resolve_device(device: str) -> torch.device:
    """'auto' picks cuda (this process's GPU under torchrun), then mps, then cpu."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device supports it ('auto' on CUDA with bf16), else full precision."""
    if precision not in {"auto", "bf16", "fp32"}:
        raise UserError(f"trainer.precision={precision}: use auto, bf16 or fp32")
    if precision == "fp32":
        return None
    supported = device.type == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "bf16" and not supported:
        raise UserError(f"trainer.precision=bf16 is not supported on {device}; use trainer.precision=auto or fp32")
    return torch.bfloat16 if supported else None


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None

    @classmethod
    def create(cls, *, device: str = "auto", precision: str = "auto") -> Runtime:
        resolved = resolve_device(device)
        return cls(resolved, autocast_dtype(precision, resolved))

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def to_device(self, batch: Batch) -> Batch:
        return {key: value.to(self.device, non_blocking=True) for key, value in batch.items()}

    @torch.no_grad()
    def collect(self, forward: Callable[[Batch], dict[str, torch.Tensor]], loader: Iterable[Batch]) -> dict[str, np.ndarray]:
        """Run `forward` over every batch (eval mode is the caller's job); outputs stacked in dataset
        order (a loader whose sampler has an `order` visits cells in that order; it is undone here)."""
        outputs: dict[str, list[torch.Tensor]] = defaultdict(list)
        for batch in loader:
            batch = self.to_device(batch)
            with self.autocast():
                for key, value in forward(batch).items():
                    outputs[key].append(value.float().cpu() if value.is_floating_point() else value.cpu())
        stacked = {key: torch.cat(values).numpy() for key, values in outputs.items()}
        order = getattr(getattr(loader, "sampler", None), "order", None)
        if order is None:
            return stacked
        restore = np.empty_like(order)
        restore[order] = np.arange(len(order))
        return {key: value[restore] if len(value) == len(order) else value for key, value in stacked.items()}
