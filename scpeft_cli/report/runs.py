"""Find run dirs and read what each left behind: finished metrics, a recorded failure, or nothing (a crash)."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from scpeft_cli.console import warn
from scpeft_cli.errors import UserError
from scpeft_cli.report.options import option_names

CRASHED = "no metrics.json (crashed, killed or still running)"


@dataclass(frozen=True)
class Run:
    path: Path
    overrides: list[str]
    metrics: dict[str, Any] | None  # None unless the run finished
    error: str | None = None
    backbone: str = ""  # the backbone and peft options as chosen (`head_only`, not the class name `HeadOnly`)
    strategy: str = ""

    @property
    def finished(self) -> bool:
        return self.metrics is not None


def is_run_dir(path: Path) -> bool:
    return (path / "metrics.json").is_file() or (path / "failed.json").is_file() or (path / ".hydra").is_dir()


def find_run_dirs(roots: Iterable[Path]) -> list[Path]:
    """Run dirs under each root (a root may be one itself), in natural order so that sweep job 10 follows job 9."""
    found: dict[Path, Path] = {}
    for root in roots:
        if not root.is_dir():
            raise UserError(f"{root} is not a directory")
        for current, subdirs, _ in os.walk(root):
            path = Path(current)
            if is_run_dir(path):
                found.setdefault(path.resolve(), path)
                subdirs.clear()  # adapter/ and .hydra/ hold no runs
            else:
                subdirs[:] = sorted((d for d in subdirs if not d.startswith(".")), key=_natural_key)
    return list(found.values())


def load_run(path: Path) -> Run:
    """metrics.json wins: it is written last, so a run that has it finished even if an older failed.json remains."""
    overrides = _read_overrides(path / ".hydra" / "overrides.yaml")
    metrics, error = None, CRASHED
    if (path / "metrics.json").is_file():
        metrics = _read_json(path / "metrics.json")
        error = None if metrics is not None else "unreadable metrics.json"
    elif (path / "failed.json").is_file():
        error = _failure_message(_read_json(path / "failed.json") or {})
    backbone, strategy = option_names(path, overrides, metrics)
    return Run(path, overrides, metrics, error, backbone=backbone, strategy=strategy)


def _failure_message(failure: dict[str, Any]) -> str:
    """A UserError's message says it all; other exceptions need their class name to be understood."""
    message = str(failure.get("error") or "failed.json without a message")
    kind = failure.get("type")
    return message if kind in (None, "UserError") else f"{kind}: {message}"


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_overrides(path: Path) -> list[str]:
    if not path.is_file():
        return []
    try:
        overrides = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        overrides = None
    if not isinstance(overrides, list):
        warn(f"{path}: unreadable overrides; the run is grouped as if it had none")
        return []
    return [str(override) for override in overrides]


def _natural_key(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
