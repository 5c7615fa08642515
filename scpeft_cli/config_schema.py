"""Config validation before any data is read: every `_target_` node is checked against its target's
signature, so an unknown key or a value of the wrong type is one clear error up front.

The schema of each node is derived from the constructor it names (a structured OmegaConf dataclass built
from the type hints), so the options and their types are written once: in the code that uses them.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from scpeft_cli.errors import UserError

SPECIAL_KEYS = {"_target_", "_partial_", "_args_", "_recursive_", "_convert_"}
OWN_PACKAGE = "scpeft_cli."


def check_required(cfg: DictConfig) -> None:
    """Mandatory values (`???`) the user has not given, all named at once."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        example = f"{missing[0]}=VALUE"
        raise UserError(f"missing required setting(s): {', '.join(missing)}; give them on the command line, e.g. {example}")


def validate(cfg: DictConfig, *, options: Mapping[str, type] | None = None) -> None:
    """Check every node whose `_target_` is one of ours against that target's signature, and plain
    settings against `options`: {node path ("" = top level): dataclass naming its keys and types}."""
    check_required(cfg)
    for path, node in _target_nodes(cfg, ""):
        _validate_node(path, node)
    for path, dataclass in (options or {}).items():
        node = OmegaConf.select(cfg, path) if path else cfg
        if node is None:  # e.g. a task without `evaluation:` settings
            continue
        hints = typing.get_type_hints(dataclass)
        unknown = sorted(set(node) - set(hints)) if path else []
        if unknown:
            raise UserError(f"unknown setting {path}.{unknown[0]}; {path} accepts: {', '.join(sorted(hints))}")
        values = {key: node._get_node(key) for key in hints if key in node}
        prefix = f"{path}." if path else ""
        _merge_checked(prefix, _schema(dataclass.__name__, {k: hints[k] for k in values}), values, lambda key, h=hints: h.get(key, Any))


def _target_nodes(node: Any, path: str):
    if isinstance(node, DictConfig):
        if isinstance(node.get("_target_"), str) and node["_target_"].startswith(OWN_PACKAGE):
            yield path, node
        for key in node:
            yield from _target_nodes(node._get_node(key), f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            yield from _target_nodes(item, f"{path}[{i}]")


def _validate_node(path: str, node: DictConfig) -> None:
    target = _load(node["_target_"])
    parameters, accepts_any = _parameters(target)
    given = {key: node._get_node(key) for key in node if key not in SPECIAL_KEYS}
    unknown = sorted(set(given) - set(parameters)) if not accepts_any else []
    if unknown:
        raise UserError(f"unknown setting {path}.{unknown[0]}; {path} accepts: {', '.join(sorted(parameters))}")
    values = {k: v for k, v in given.items() if k in parameters}
    schema = _schema(getattr(target, "__name__", "Target"), {k: parameters[k] for k in values})
    _merge_checked(f"{path}.", schema, values, lambda key: parameters.get(key, Any))


def _schema(name: str, hints: dict[str, Any]) -> DictConfig:
    """A structured config enforcing these hints (every field nullable: null means 'the default')."""
    fields = [(key, _omegaconf_type(hint), dataclasses.field(default=None)) for key, hint in hints.items()]
    return OmegaConf.structured(dataclasses.make_dataclass(f"{name}Schema", fields))


def _merge_checked(prefix: str, schema: DictConfig, values: dict, hint_of: Callable[[str], Any]) -> None:
    """Merge values into the schema; the first type error becomes one line naming key, value and type."""
    try:
        OmegaConf.merge(schema, values)
    except OmegaConfBaseException as err:
        key = (getattr(err, "full_key", "") or "?").split(".")[0]
        value = OmegaConf.to_container(values[key]) if isinstance(values.get(key), DictConfig | ListConfig) else values.get(key)
        raise UserError(f"{prefix}{key}={value!r} is not valid: expected {_describe(hint_of(key))}") from None


def _load(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(__import__(module, fromlist=[name]), name)


def _parameters(target: Callable) -> tuple[dict[str, Any], bool]:
    """Keyword parameters and their type hints; True if the target takes **kwargs."""
    function = target.__init__ if inspect.isclass(target) else target
    hints = typing.get_type_hints(function)
    signature = inspect.signature(target)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    names = {
        name: hints.get(name, Any)
        for name, p in signature.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }
    return names, accepts_any


def _omegaconf_type(hint: Any) -> Any:
    """Map a type hint to one OmegaConf can enforce (None allowed everywhere: null keeps a default)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _omegaconf_type(inner[0]) if len(inner) == 1 else Any
    if origin in (list, Sequence, typing.Sequence) or (inspect.isclass(origin) and issubclass(origin, Sequence) and origin is not str):
        item = _omegaconf_type(args[0]) if args else Any
        return Optional[list[item if item is not Any else Any]]  # noqa: UP045 (OmegaConf wants typing.Optional)
    if origin in (dict, Mapping) or hint in (dict, Mapping):
        return Optional[dict[str, Any]]  # noqa: UP045
    if hint in (int, float, str, bool):
        return Optional[hint]  # noqa: UP045
    return Any


def _describe(hint: Any) -> str:
    mapped = _omegaconf_type(hint)
    args = [a for a in typing.get_args(mapped) if a is not type(None)]
    base = args[0] if args else mapped
    if typing.get_origin(base) is list:
        return "a list, e.g. [0,1,2]"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(base, "another value")
