"""The edge of every Hydra command: config checked before any data is read; a user error becomes one
line and exit code 2, an internal error one line and exit code 3 (a traceback only with --debug or
HYDRA_FULL_ERROR=1); in a sweep a failed job is recorded (`failed.json`) and the sweep goes on."""

from __future__ import annotations

import functools
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from scpeft_cli import artifacts
from scpeft_cli.config_schema import validate
from scpeft_cli.console import console
from scpeft_cli.errors import UserError

INTERNAL_ERROR_EXIT = 3


def debugging() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def run_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


Options = Mapping[str, type] | Callable[[DictConfig], Mapping[str, type]]


def guarded(task: Callable[[DictConfig, Path], Any], *, options: Options | None = None) -> Callable[[DictConfig], Any]:
    """Validate `cfg` (see config_schema.validate; `options` may depend on the config), then run
    `task(cfg, run_dir)` behind the error edge."""

    @functools.wraps(task)
    def wrapper(cfg: DictConfig) -> Any:
        directory = run_dir()
        in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
        try:
            validate(cfg, options=options(cfg) if callable(options) else options)
            return task(cfg, directory)
        except Exception as err:
            if debugging():
                raise
            user_error = isinstance(err, UserError)
            message = " ".join(str(err).split()) if user_error else f"internal error: {type(err).__name__}: {' '.join(str(err).split())}"
            console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
            if not user_error:
                console.print("this is a bug in scpeft-cli; rerun with `scpeft --debug ...` for the traceback and report it")
            if in_sweep:
                console.print(f"[bold red]job failed[/] ({directory}); the sweep goes on")
                record = {"error": message, "type": type(err).__name__}
                if not user_error:
                    record["traceback"] = traceback.format_exc()
                artifacts.write_json(directory / "failed.json", record)
                return None
            sys.exit(err.exit_code if user_error else INTERNAL_ERROR_EXIT)

    return wrapper
