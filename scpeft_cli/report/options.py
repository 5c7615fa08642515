"""A run's backbone and strategy as the user chose them (`peft=head_only`), never as a class name (`HeadOnly`).

Sources, most reliable first: `.hydra/hydra.yaml` (`hydra.runtime.choices`: the option of every group, given or
default), the run's own overrides (`peft=head_only`), then metrics.json (its "peft" is the option name in new
runs; older runs recorded the strategy's class name, which is mapped back to its option through conf/peft/).
A combination reads `combo:PART+PART`, its parts in the order of `peft.parts`.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml

from scpeft_cli.paths import config_dir

COMBO = "combo"


def read_choices(run_dir: Path) -> dict[str, str]:
    """hydra.runtime.choices of the run's .hydra/hydra.yaml: {"peft": "head_only", ...}; {} when absent."""
    data = _read_yaml(run_dir / ".hydra" / "hydra.yaml")
    choices = ((data.get("hydra") or {}).get("runtime") or {}).get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, dict):
        return {}
    return {str(group): str(option) for group, option in choices.items() if option is not None}


def option_names(run_dir: Path, overrides: list[str], metrics: dict[str, Any] | None) -> tuple[str, str]:
    """(backbone, peft) option names of a run; "" where nothing says."""
    choices = read_choices(run_dir)
    given = _given_options(overrides)
    recorded = metrics or {}
    backbone = choices.get("backbone") or given.get("backbone") or str(recorded.get("backbone") or "")
    peft = choices.get("peft") or given.get("peft")
    if peft is None:
        return backbone, recorded_option(str(recorded.get("peft") or ""))
    if peft == COMBO:
        parts = _combo_parts(run_dir) or recorded_option(str(recorded.get("peft") or "")).partition(":")[2]
        return backbone, f"{COMBO}:{parts}" if parts else COMBO
    return backbone, peft


def _given_options(overrides: list[str]) -> dict[str, str]:
    """`peft=lora`, `+peft=lora`, `++peft=lora` -> {"peft": "lora"}; the last one of a group wins, as in Hydra."""
    given = {}
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key.lstrip("+") in {"backbone", "peft"} and not key.startswith("~"):
            given[key.lstrip("+")] = value
    return given


def _combo_parts(run_dir: Path) -> str:
    """'token_prompt+encoder_prompt' from the composed config's peft.parts; '' when it cannot be read."""
    for path in (run_dir / ".hydra" / "config.yaml", run_dir / "config.yaml"):
        data = _read_yaml(path)
        peft = data.get("peft") if isinstance(data, dict) else None
        parts = peft.get("parts") if isinstance(peft, dict) else None
        if isinstance(parts, list) and parts:
            return "+".join(map(str, parts))
    return ""


def recorded_option(name: str) -> str:
    """metrics.json's "peft": an option name as is; an older run's class name (or `A+B` of a combination's
    class names) mapped to its option; anything else unchanged."""
    options = _options_by_class()
    if not name or name.startswith(f"{COMBO}:") or Path(config_dir(), "peft", f"{name}.yaml").is_file():
        return name
    if "+" in name:
        return f"{COMBO}:" + "+".join(options.get(part, part) for part in name.split("+"))
    return options.get(name, name)


@functools.cache
def _options_by_class() -> dict[str, str]:
    """{"HeadOnly": "head_only", ...} from the _target_ of each conf/peft/ option (the first option of a class)."""
    options: dict[str, str] = {}
    for path in sorted(Path(config_dir(), "peft").glob("*.yaml")):
        data = _read_yaml(path)
        target = data.get("_target_") if isinstance(data, dict) else None
        if isinstance(target, str):
            options.setdefault(target.rsplit(".", 1)[-1], path.stem)
    return options


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
