"""What every loader of an official checkpoint folder does alike: check the folder holds the release's
files, and rename the release's keys onto the shared layer stack (`layers.{i}.*`)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from scpeft_cli.errors import UserError


def checked_folder(folder: str | Path, files: Sequence[str], *, family: str) -> Path:
    """`folder` as a Path, after checking it exists and holds every one of `files` (one line otherwise)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"{family} checkpoint folder not found: {folder}; set backbone.checkpoint to a folder with {', '.join(files)}")
    absent = [name for name in files if not (folder / name).is_file()]
    if absent:
        raise UserError(f"{family} checkpoint folder {folder} lacks {', '.join(absent)}; it must hold {', '.join(files)}")
    return folder


def rename_layer_keys(
    state: Mapping[str, torch.Tensor], *, layer_key: re.Pattern, layer_names: Mapping[str, str],
    ignored_prefixes: tuple[str, ...], strip: str = "",
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Release keys -> this tool's module names; returns (converted, ignored keys).

    `strip` is removed from the front of every key; keys starting with `ignored_prefixes` are set aside;
    `layer_key` matches a layer's keys as (index, rest), and `rest` is renamed by `layer_names` (else kept)
    under `layers.{index}.`.
    """
    converted, ignored = {}, []
    for key, tensor in state.items():
        key = key.removeprefix(strip)
        if key.startswith(ignored_prefixes):
            ignored.append(key)
            continue
        match = layer_key.match(key)
        if match:
            index, rest = match.groups()
            key = f"layers.{index}.{layer_names.get(rest, rest)}"
        converted[key] = tensor
    return converted, ignored
