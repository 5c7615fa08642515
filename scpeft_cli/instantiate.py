"""Hydra `instantiate`, with the user's own mistakes (UserError) surfacing unwrapped."""

from __future__ import annotations

from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate

from scpeft_cli.errors import UserError


def instantiate(config: Any, **kwargs: Any) -> Any:
    try:
        return hydra_instantiate(config, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        while cause is not None and not isinstance(cause, UserError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise
