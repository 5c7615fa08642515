"""Train/val/test splits of the cells, each returned as one "train"/"val"/"test" string per cell.

Every split is configured through keyword-only options (Hydra ``_partial_``) and finally called
as ``fn(obs=adata.obs, labels=codes, seed=seed)``, so they are interchangeable.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from scpeft_cli.console import warn
from scpeft_cli.errors import UserError

SPLITS = ("train", "val", "test")


def stratified_split(
    obs: pd.DataFrame, labels: np.ndarray, *, seed: int, val_fraction: float = 0.1, test_fraction: float = 0.2
) -> np.ndarray:
    """Split each class separately so every class appears in every split (a fair per-class test)."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0 <= value < 1:
            raise UserError(f"split.{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1:
        raise UserError(
            f"split.val_fraction + split.test_fraction must be < 1 to leave training cells, got {val_fraction + test_fraction}"
        )
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    needed = 1 + (val_fraction > 0) + (test_fraction > 0)
    small = [(c, n) for c, n in zip(classes, counts, strict=True) if n < needed]
    if small:
        names = _class_names(obs, labels)
        listed = ", ".join(f"{names[c]} ({n})" for c, n in small)
        raise UserError(
            f"classes with fewer than {needed} cells cannot appear in every split: {listed}; "
            f"set data.min_cells_per_class={needed} to drop them"
        )

    rng = np.random.default_rng(seed)
    split = np.full(len(labels), "train", dtype=object)
    for c, n in zip(classes, counts, strict=True):
        n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
        n_test = max(1, round(test_fraction * n)) if test_fraction > 0 else 0
        while n_val + n_test >= n:  # always keep at least one training cell
            if n_val >= n_test:
                n_val -= 1
            else:
                n_test -= 1
        cells = rng.permutation(np.flatnonzero(labels == c))
        split[cells[:n_val]] = "val"
        split[cells[n_val : n_val + n_test]] = "test"
    return split.astype(str)


def group_split(
    obs: pd.DataFrame, labels: np.ndarray, *, seed: int, group_key: str, test_fraction: float = 0.2
) -> np.ndarray:
    """Hold out whole groups (donors, patients) so the test measures generalisation to unseen ones.

    As in the scPEFT paper, one of the remaining training groups becomes the validation group.
    """
    if group_key not in obs.columns:
        raise UserError(
            f"group column '{group_key}' not in obs; available: {_names(obs.columns)}; set split.group_key to one of them"
        )
    if not 0 < test_fraction < 1:
        raise UserError(f"split.test_fraction must be in (0, 1), got {test_fraction}")
    column = obs[group_key]
    n_missing = int(column.isna().sum())
    if n_missing:
        raise UserError(f"{n_missing} cells have no value in obs['{group_key}']; fill them or choose another split.group_key")
    groups = column.astype(str).to_numpy()
    unique = np.unique(groups)
    if len(unique) < 3:
        raise UserError(
            f"a group split needs at least 3 groups in obs['{group_key}'], found {len(unique)} ({_names(unique)}); "
            "choose another split.group_key or use split=stratified"
        )

    n_test = min(max(1, round(test_fraction * len(unique))), len(unique) - 2)
    shuffled = np.random.default_rng(seed).permutation(unique)
    split = np.full(len(groups), "train", dtype=object)
    split[np.isin(groups, shuffled[:n_test])] = "test"
    split[groups == shuffled[n_test]] = "val"

    labels = np.asarray(labels)
    missing = np.setdiff1d(np.unique(labels), labels[split == "train"])
    if len(missing):
        names = _class_names(obs, labels)
        warn(f"classes absent from the training groups (the model cannot learn them): {_names(names[c] for c in missing)}")
    return split.astype(str)


def column_split(
    obs: pd.DataFrame,
    labels: np.ndarray,
    *,
    seed: int,
    column: str,
    train_value: str = "train",
    val_value: str = "val",
    test_value: str = "test",
) -> np.ndarray:
    """Use a split the user already defined in an obs column (e.g. to reproduce a published benchmark).

    ``labels`` and ``seed`` are unused: they are accepted so every split has the same call.
    """
    if column not in obs.columns:
        raise UserError(f"split column '{column}' not in obs; available: {_names(obs.columns)}; set split.column to one of them")
    values = obs[column].astype(str).to_numpy()
    mapping = {str(train_value): "train", str(val_value): "val", str(test_value): "test"}
    unexpected = pd.Series(values[~np.isin(values, list(mapping))]).value_counts()
    if len(unexpected):
        listed = ", ".join(f"'{v}' ({n} cells)" for v, n in unexpected.items())
        raise UserError(
            f"obs['{column}'] has values other than {_names(repr(v) for v in mapping)}: {listed}; "
            "fix the column or set split.train_value/val_value/test_value"
        )
    for value, name in mapping.items():
        if not np.any(values == value):
            raise UserError(f"no cells have value '{value}' in obs['{column}'], so the {name} split would be empty; fix the column")
    return np.array([mapping[v] for v in values], dtype=str)


def summarize_split(split: np.ndarray, labels: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """Cells per class (rows) and split (columns train/val/test), for the run report."""
    table = pd.crosstab(np.asarray(labels), np.asarray(split))
    table = table.reindex(index=range(len(classes)), columns=list(SPLITS), fill_value=0)
    table.index = pd.Index(classes, name="class")
    table.columns.name = None
    return table.astype(int)


def _class_names(obs: pd.DataFrame, labels: np.ndarray) -> dict:
    """Readable class names for messages: from obs["label"] when present, else the codes."""
    if "label" not in obs.columns:
        return {c: str(c) for c in np.unique(labels)}
    names = obs["label"].astype(str).to_numpy()
    return {c: names[np.flatnonzero(labels == c)[0]] for c in np.unique(labels)}


def _names(values: object) -> str:
    return ", ".join(str(v) for v in values) or "(none)"
