"""Perturbation conditions in GEARS notation: ``ctrl``, ``GENE+ctrl`` / ``ctrl+GENE`` and ``GENE_A+GENE_B``.

GEARS datasets (Norman, Adamson, Replogle) label every cell this way, so we read the labels as they are
and reject anything else up front instead of mis-splitting it later.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from scpeft_cli.console import warn
from scpeft_cli.errors import UserError

CONTROL = "ctrl"
NOTATION = f"{CONTROL}, GENE+{CONTROL}, GENE_A+GENE_B"
UNKNOWN_CHOICES = ("drop", "error")
_LISTED = 5


def _parse(condition: object) -> tuple[str, ...] | None:
    """The perturbed genes of a condition, or None when it is not GEARS notation."""
    if not isinstance(condition, str):
        return None
    if condition.strip() == CONTROL:
        return ()
    parts = [part.strip() for part in condition.split("+")]
    if len(parts) != 2 or not all(parts):
        return None
    genes = tuple(part for part in parts if part != CONTROL)
    if not genes or len(set(genes)) != len(genes):
        return None
    return genes


def perturbed_genes(condition: str) -> tuple[str, ...]:
    """The genes a condition perturbs, in written order: () for control, one for a single, two for a double."""
    genes = _parse(condition)
    if genes is None:
        raise UserError(f"condition {condition!r} is not GEARS notation ({NOTATION})")
    return genes


def is_control(condition: str) -> bool:
    """Whether a label is the unperturbed control (no validation: invalid labels are simply not control)."""
    return isinstance(condition, str) and condition.strip() == CONTROL


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown if len(names) <= _LISTED else f"{shown}, ... ({len(names)} in all)"


def check_conditions(conditions: Sequence[str], genes: Sequence[str], *, unknown: str, key: str) -> np.ndarray:
    """Keep-mask over cells: every label must parse, and a perturbed gene outside `genes` cannot be modelled.

    Such cells are dropped (with a warning) or rejected, as `unknown` says; control cells are required
    because every perturbation effect is predicted relative to them.
    """
    if unknown not in UNKNOWN_CHOICES:
        raise UserError(f"data.unknown_perturbations must be one of {', '.join(UNKNOWN_CHOICES)}, got {unknown!r}")
    codes, labels = pd.factorize(pd.Series(list(conditions), dtype=object), use_na_sentinel=False)
    known = set(genes)
    bad_codes, missing = [], set()
    for code, label in enumerate(labels):
        parsed = _parse(label)
        if parsed is None:
            raise UserError(f"obs['{key}'] value {label!r} is not GEARS notation ({NOTATION}); relabel those cells")
        outside = set(parsed) - known
        if outside:
            bad_codes.append(code)
            missing |= outside
    dropped = np.isin(codes, bad_codes)
    if bad_codes:
        what = (
            f"{len(missing)} perturbed genes in obs['{key}'] are not among the {len(known)} genes: "
            f"{_listing(sorted(missing))} ({len(bad_codes)} conditions, {int(dropped.sum())} cells)"
        )
        if unknown == "error":
            raise UserError(f"{what}; set data.unknown_perturbations=drop to drop those cells")
        warn(f"{what}; dropping those cells")
    if not any(is_control(label) for label in labels):
        raise UserError(f"obs['{key}'] has no control cells; label the unperturbed cells '{CONTROL}' in that column")
    return ~dropped
