"""Several strategies at once, e.g. token + encoder prompts (the revised paper's "hybrid").

`peft=combo "peft.parts=[token_prompt,encoder_prompt]"`: each part is the named `conf/peft/` option,
with per-part overrides under `peft.options.<part>` (e.g. `+peft.options.encoder_prompt.ratio=0.5`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from omegaconf import OmegaConf
from torch import nn

from scpeft_cli.errors import UserError
from scpeft_cli.instantiate import instantiate
from scpeft_cli.paths import config_dir
from scpeft_cli.peft.base import Strategy


def load_part(name: str, options: Mapping | None) -> Strategy:
    path = Path(config_dir()) / "peft" / f"{name}.yaml"
    if name in {"combo", "full"} or not path.is_file():
        choices = sorted(p.stem for p in path.parent.glob("*.yaml") if p.stem not in {"combo", "full"})
        raise UserError(f"peft.parts: '{name}' is not a combinable strategy; choose from {', '.join(choices)}")
    return instantiate(OmegaConf.merge(OmegaConf.load(path), options or {}))


class Combination(Strategy):
    """Attaches every part; a parameter trains if any part trains it."""

    def __init__(self, *, parts: Sequence[str], options: Mapping | None = None, head: str | None = None):
        super().__init__(head=head)
        if len(parts) < 2:
            raise UserError("peft=combo needs at least two parts, e.g. peft.parts=[token_prompt,encoder_prompt]")
        unknown = sorted(set(options or {}) - set(parts))
        if unknown:
            raise UserError(f"peft.options names {unknown}, which are not in peft.parts={list(parts)}")
        self.parts = [load_part(name, (options or {}).get(name)) for name in parts]

    @property
    def name(self) -> str:
        return "+".join(part.name for part in self.parts)

    def attach(self, backbone: nn.Module) -> None:
        for part in self.parts:
            part.attach(backbone)

    def trains(self, parameter_name: str) -> bool:
        return any(part.trains(parameter_name) for part in self.parts)

    def placement(self, backbone: nn.Module) -> str:
        return "; ".join(f"{part.name}: {part.placement(backbone)}" for part in self.parts)
