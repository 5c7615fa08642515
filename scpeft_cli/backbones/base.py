"""What every backbone family hands to the rest of the tool, and the one exact weight-loading rule."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from scpeft_cli.errors import UserError


@dataclass
class LoadedBackbone:
    """A built backbone module with the tokenizer that feeds it and where its weights came from."""

    name: str
    model: nn.Module
    tokenizer: Any
    pretrained: bool
    checkpoint: str | None


def load_state_dict_exactly(model: nn.Module, state: Mapping[str, torch.Tensor], *, source: str) -> None:
    """Load every tensor of `model` from `state`; any missing, unexpected or mis-shaped key is an error.

    Silently skipped weights are the classic fine-tuning bug: a model that looks pretrained but is not.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{key} {tuple(state[key].shape)} (model expects {tuple(expected[key].shape)})"
        for key in sorted(set(expected) & set(state))
        if state[key].shape != expected[key].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped {_some(misshaped)}")
    if problems:
        raise UserError(f"checkpoint {source} does not match the model: " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def _some(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return f"{len(items)} tensor(s): {shown}" + (", ..." if len(items) > limit else "")
