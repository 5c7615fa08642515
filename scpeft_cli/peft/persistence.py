"""Adapter-only checkpoints: the trained tensors as safetensors plus the config that rebuilds the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from scpeft_cli.artifacts import write_json
from scpeft_cli.errors import UserError
from scpeft_cli.peft.model import PeftModel

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
TRAINING_GENES_FILE = "training_genes.txt"  # written when training used a gene selection (HVGs)


def save_adapter(model: PeftModel, directory: str | Path, *, config: dict[str, Any]) -> int:
    """Write the trainable tensors and `config`; returns the weight file's size in bytes."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in model.trainable_state_dict().items()}
    weights = directory / WEIGHTS_FILE
    tmp = weights.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "strategy": model.strategy.name})
    tmp.replace(weights)
    write_json(directory / CONFIG_FILE, config)
    return weights.stat().st_size


def read_adapter_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{directory} holds no {CONFIG_FILE}; give the adapter/ folder of a finished run")
    return json.loads(path.read_text())


def load_adapter(model: PeftModel, directory: str | Path) -> None:
    """Load the trained tensors saved by `save_adapter` into `model` (exactly those, no others)."""
    model.load_trainable_state_dict(load_file(str(Path(directory) / WEIGHTS_FILE)))
