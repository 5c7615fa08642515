"""Reading pickled dictionaries from model repositories (Geneformer's gene dictionaries) without
executing code: only plain containers, numbers, strings and numpy scalars may be reconstructed."""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from scpeft_cli.errors import UserError

ALLOWED = {
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"), ("builtins", "frozenset"),
    ("builtins", "str"), ("builtins", "int"), ("builtins", "float"), ("builtins", "bool"), ("builtins", "bytes"),
    ("collections", "OrderedDict"),
    ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


class AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is allowed")
        return super().find_class(module, name)


def load_pickled_data(path: str | Path) -> Any:
    """The object in `path` if it is plain data; a UserError naming the file otherwise."""
    try:
        return AllowListUnpickler(io.BytesIO(Path(path).read_bytes())).load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, AttributeError, IndexError) as err:
        raise UserError(f"cannot load {path} as a plain-data pickle ({err}); it may be corrupt or contain code") from err
