"""The edge where user errors become one line and exit code 2; in a sweep a failed job is recorded
(`failed.json`) and the sweep goes on."""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from scpeft_cli import artifacts
from scpeft_cli.console import console
from scpeft_cli.errors import UserError


def run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


def guarded(task: Callable[[DictConfig, Path], Any]) -> Callable[[DictConfig], Any]:
    """Run `task(cfg, run_dir)`; a UserError prints one line and exits 2 (single run) or is recorded (sweep)."""

    @functools.wraps(task)
    def wrapper(cfg: DictConfig) -> Any:
        directory = run_dir()
        in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
        try:
            return task(cfg, directory)
        except Exception as err:
            if not (in_sweep or isinstance(err, UserError)):
                raise
            console.print(f"[bold red]error:[/] {err}")
            if in_sweep:
                console.print(f"[bold red]job failed[/] ({directory}); the sweep goes on")
                record = {"error": " ".join(str(err).split()), "type": type(err).__name__}
                if not isinstance(err, UserError):
                    record["traceback"] = traceback.format_exc()
                artifacts.write_json(directory / "failed.json", record)
                return None
            sys.exit(err.exit_code)

    return wrapper
