"""Resumable training state, written atomically after every epoch and read back without running code.

Holds the trainable tensors, optimiser and scheduler state, the RNG states that drive dropout and data
order, and the best-so-far state, so a run killed at any moment continues as if never interrupted.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from scpeft_cli.errors import UserError

CHECKPOINT_FILE = "checkpoint/last.pt"


@dataclass
class TrainingState:
    """Everything the loop needs to continue; also the training summary once it is done."""

    epoch: int = 0  # completed epochs
    steps: int = 0
    cells_seen: int = 0
    step_seconds: float = 0.0  # time inside training steps only (no validation)
    train_seconds: float = 0.0
    best_epoch: int = 0
    best_score: float = float("nan")
    stale: int = 0  # epochs since the monitored score last improved
    done: bool = False
    history: list[dict] = field(default_factory=list)

    @property
    def cells_per_second(self) -> float:
        return self.cells_seen / self.step_seconds if self.step_seconds else 0.0


def save_checkpoint(path: Path, *, state: TrainingState, tensors: dict[str, Any]) -> None:
    """`tensors`: model, best, optimizer, scheduler and RNG states (all torch.load(weights_only) safe)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"state": asdict(state), **tensors}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> tuple[TrainingState, dict[str, Any]]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot resume from {path} ({type(err).__name__}: {err}); delete it to start again") from err
    return TrainingState(**payload.pop("state")), payload


def rng_states() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
