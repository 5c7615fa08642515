"""Preflight checks behind `scpeft inspect`: pure functions over a prepared AnnData, a vocabulary and a split.

Nothing here prints, builds a model or reads weights; each check returns a small dataclass and the
verdict turns them into a list of problems (a run would fail) and warnings (a run works, but look).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from scpeft_cli.data.splits import SPLITS, summarize_split
from scpeft_cli.errors import UserError
from scpeft_cli.tokenizers.base import Vocabulary
from scpeft_cli.tokenizers.vocab import (
    MIN_OVERLAP,
    WARN_OVERLAP,
    ensembl_fraction,
    gene_id_hint,
    gene_id_kind,
)

# Classes smaller than this cannot be in train, val and test at once (the stratified split refuses them).
MIN_CLASS_CELLS = 3
# Classes smaller than this give noisy per-class test figures: a warning.
WARN_CLASS_CELLS = 10
MAX_CLASS_ROWS = 15
N_EXAMPLES = 5


# ---------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DataSummary:
    n_cells: int
    n_genes: int
    n_classes: int
    input_kind: str  # "counts" (normalised by the loader) | "log_normalized" (used as is) | "unknown"
    source: str | None = None
    path: str | None = None


def summarize_data(adata) -> DataSummary:
    """Size and input kind of a prepared AnnData (see scpeft_cli.data.loading)."""
    meta = dict(adata.uns.get("scpeft_input", {}))
    return DataSummary(
        n_cells=int(adata.n_obs),
        n_genes=int(adata.n_vars),
        n_classes=len(adata.obs["label"].cat.categories) if "label" in adata.obs else 0,
        input_kind=str(meta.get("input_kind", "unknown")),
        source=meta.get("source"),
        path=meta.get("path"),
    )


# --------------------------------------------------------------------------------- gene identifiers
@dataclass(frozen=True)
class GeneIds:
    kind: str  # "ensembl" | "symbol" | "mixed"
    ensembl_fraction: float
    symbol_fraction: float
    examples: list[str]


def gene_ids(genes: Sequence[str]) -> GeneIds:
    """Whether the data's gene identifiers look like Ensembl ids or symbols."""
    fraction = ensembl_fraction(genes)
    return GeneIds(
        kind=gene_id_kind(genes),
        ensembl_fraction=fraction,
        symbol_fraction=1.0 - fraction if len(genes) else 0.0,
        examples=[str(g) for g in list(genes)[:N_EXAMPLES]],
    )


@dataclass(frozen=True)
class VocabOverlap:
    source: str  # "checkpoint" (its gene vocabulary) | "data" (a random backbone's vocabulary: the data's genes)
    n_genes: int  # the data's genes
    count: int  # of them in the vocabulary
    fraction: float
    vocab_size: int  # gene tokens in the vocabulary (special tokens excluded)
    vocab_kind: str
    data_kind: str
    unmatched_examples: list[str]
    n_unmatched: int
    path: str | None = None

    @property
    def hint(self) -> str:
        return gene_id_hint(self.data_kind, self.vocab_kind)

    @property
    def kinds_differ(self) -> bool:
        return self.data_kind != self.vocab_kind


def vocab_overlap(genes: Sequence[str], vocab: Vocabulary, *, source: str, path: str | None = None) -> VocabOverlap:
    """How many of the data's genes the vocabulary knows (as `map_genes` counts them, through `vocab.lookup`)."""
    genes = [str(g) for g in genes]
    found = vocab.lookup(genes) >= 0
    unmatched = [g for g, ok in zip(genes, found, strict=True) if not ok]
    vocab_genes = vocab.genes
    count = int(found.sum())
    return VocabOverlap(
        source=source,
        n_genes=len(genes),
        count=count,
        fraction=count / len(genes) if genes else 0.0,
        vocab_size=len(vocab_genes),
        vocab_kind=gene_id_kind(vocab_genes),
        data_kind=gene_id_kind(genes),
        unmatched_examples=unmatched[:N_EXAMPLES],
        n_unmatched=len(unmatched),
        path=path,
    )


@dataclass(frozen=True)
class GeneKeyCandidate:
    column: str | None  # None: var_names (data.gene_key=null)
    kind: str
    count: int  # its identifiers found in the vocabulary
    fraction: float

    @property
    def override(self) -> str:
        return f"data.gene_key={self.column if self.column is not None else 'null'}"


def gene_key_candidates(
    var: pd.DataFrame, vocab: Vocabulary, *, current: str | None = None, kind: str | None = None
) -> list[GeneKeyCandidate]:
    """var columns (and var_names) that could replace `data.gene_key`, best vocabulary overlap first.

    A candidate holds mostly unique text; with `kind` ("symbol" / "ensembl") only columns of that kind
    are kept. Columns already in use (`current`) and columns no gene of which is in the vocabulary are
    left out, unless `kind` is given (then a column of that kind is worth naming even when the
    vocabulary is unavailable or disjoint).
    """
    columns: list[tuple[str | None, pd.Series]] = [(None, pd.Series(var.index, dtype=object))]
    columns += [(str(name), var[name]) for name in var.columns]
    candidates = []
    for name, values in columns:
        if name == current or (name is None and current is None):
            continue
        if not (pd.api.types.is_object_dtype(values) or isinstance(values.dtype, pd.CategoricalDtype)
                or pd.api.types.is_string_dtype(values)):
            continue
        values = values.dropna().astype(str)
        if values.empty or values.nunique() < 0.5 * len(values) or values.str.fullmatch(r"[\d.\-+eE]+").mean() > 0.5:
            continue
        column_kind = gene_id_kind(values)
        if kind is not None and column_kind != kind:
            continue
        count = int((vocab.lookup(list(values)) >= 0).sum())
        if count == 0 and kind is None:
            continue
        candidates.append(GeneKeyCandidate(column=name, kind=column_kind, count=count, fraction=count / len(var)))
    return sorted(candidates, key=lambda c: (-c.count, c.column or ""))


# ------------------------------------------------------------------------------------ class balance
@dataclass(frozen=True)
class ClassBalance:
    counts: pd.Series  # cells per class, smallest first
    tiny: list[str]  # fewer than MIN_CLASS_CELLS cells
    small: list[str]  # at least MIN_CLASS_CELLS, fewer than WARN_CLASS_CELLS

    def smallest(self, n: int = MAX_CLASS_ROWS) -> list[tuple[str, int]]:
        return [(str(name), int(count)) for name, count in self.counts.iloc[:n].items()]


def class_balance(labels: pd.Series | pd.Categorical) -> ClassBalance:
    """Cells per class (every category, empty ones included), smallest first, ties by name."""
    series = pd.Series(labels)
    if not isinstance(series.dtype, pd.CategoricalDtype):
        series = series.astype("category")
    counts = series.value_counts(sort=False)
    counts.index = counts.index.astype(str)
    order = sorted(counts.index, key=lambda name: (int(counts[name]), name))
    counts = counts.loc[order].astype(int)
    counts.index.name = "class"
    return ClassBalance(
        counts=counts,
        tiny=[c for c in order if counts[c] < MIN_CLASS_CELLS],
        small=[c for c in order if MIN_CLASS_CELLS <= counts[c] < WARN_CLASS_CELLS],
    )


# ---------------------------------------------------------------------------------------------- split
@dataclass(frozen=True)
class SplitCheck:
    error: str | None  # the split's UserError: the run would stop there
    split: np.ndarray | None = None
    table: pd.DataFrame | None = None  # class x train/val/test cells, smallest classes first
    groups: pd.DataFrame | None = None  # class x (groups, train/val/test cells), for a group split
    absent_from_train: list[str] = field(default_factory=list)  # classes with no training cell
    in_test_not_train: list[str] = field(default_factory=list)  # ... of which some are in test

    @property
    def counts(self) -> dict[str, int]:
        if self.split is None:
            return {}
        return {s: int((self.split == s).sum()) for s in SPLITS}


def check_split(
    split_fn: Callable[..., np.ndarray],
    obs: pd.DataFrame,
    labels: np.ndarray,
    classes: Sequence[str],
    *,
    seed: int,
    group_key: str | None = None,
) -> SplitCheck:
    """Run the configured split as `train` does (`split_fn(obs=, labels=, seed=)`) and tabulate it."""
    try:
        split = np.asarray(split_fn(obs=obs, labels=labels, seed=seed)).astype(str)
    except UserError as err:
        return SplitCheck(error=str(err))
    classes = [str(c) for c in classes]
    table = summarize_split(split, labels, classes)
    table = table.loc[sorted(table.index, key=lambda c: (int(table.loc[c].sum()), c))]
    absent = [c for c in table.index if table.loc[c, "train"] == 0 and table.loc[c].sum() > 0]
    in_test = [c for c in absent if table.loc[c, "test"] > 0]
    groups = None
    if group_key is not None and group_key in obs.columns:
        groups = groups_per_class(obs[group_key].astype(str).to_numpy(), split, labels, classes).loc[table.index]
    return SplitCheck(error=None, split=split, table=table, groups=groups, absent_from_train=absent, in_test_not_train=in_test)


def groups_per_class(groups: np.ndarray, split: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """For each class: distinct groups (donors) holding it, those groups per split, and its cells per split."""
    frame = pd.DataFrame({"group": np.asarray(groups), "split": np.asarray(split), "label": np.asarray(labels)})
    columns = ["groups", *(f"{s}_groups" for s in SPLITS), *SPLITS]
    rows = {}
    for code, name in enumerate(classes):
        cells = frame[frame["label"] == code]
        row = {"groups": int(cells["group"].nunique())}
        for s in SPLITS:
            in_split = cells[cells["split"] == s]
            row[f"{s}_groups"] = int(in_split["group"].nunique())
            row[s] = len(in_split)
        rows[str(name)] = row
    table = pd.DataFrame.from_dict(rows, orient="index", columns=columns) if rows else pd.DataFrame(columns=columns)
    table.index.name = "class"
    return table.astype(int)


# ---------------------------------------------------------------------------------------------- verdict
@dataclass(frozen=True)
class Verdict:
    problems: list[str]  # the run would fail: exit code 2
    warnings: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems


def _classes(n: int) -> str:
    return f"{n} class" if n == 1 else f"{n} classes"


def _listed(items: Sequence[str], counts: pd.Series | None = None, limit: int = 8) -> str:
    shown = [f"{c} ({int(counts[c])})" if counts is not None else str(c) for c in items[:limit]]
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(shown) + more


def overlap_messages(overlap: VocabOverlap, candidates: Sequence[GeneKeyCandidate] = ()) -> tuple[list[str], list[str]]:
    """(problems, warnings) about the gene overlap with the vocabulary."""
    where = f"the vocabulary ({overlap.path})" if overlap.path else "the vocabulary"
    suggestion = ""
    if candidates:
        suggestion = "; try " + ", ".join(f"{c.override} ({c.count} genes found)" if c.count else c.override for c in candidates[:3])
    examples = f" (unmatched e.g. {', '.join(overlap.unmatched_examples[:3])})" if overlap.unmatched_examples else ""
    if overlap.count == 0:
        return [f"none of the {overlap.n_genes} genes are in {where}{examples}; {overlap.hint}{suggestion}"], []
    share = f"{overlap.count} / {overlap.n_genes} genes ({100 * overlap.fraction:.1f}%)"
    if overlap.fraction < MIN_OVERLAP:
        return [
            f"only {share} are in {where}, below the {100 * MIN_OVERLAP:.0f}% minimum (MIN_OVERLAP){examples}; "
            f"{overlap.hint}{suggestion}"
        ], []
    if overlap.fraction < WARN_OVERLAP:
        return [], [f"only {share} are in {where}; the rest are ignored; {overlap.hint}{suggestion}"]
    return [], []


def class_messages(balance: ClassBalance) -> list[str]:
    """Warnings about tiny and small classes."""
    warnings = []
    if balance.tiny:
        warnings.append(
            f"{_classes(len(balance.tiny))} with fewer than {MIN_CLASS_CELLS} cells: {_listed(balance.tiny, balance.counts)}; "
            f"they cannot be in train, val and test; set data.min_cells_per_class={MIN_CLASS_CELLS} to drop them"
        )
    if balance.small:
        warnings.append(
            f"{_classes(len(balance.small))} with fewer than {WARN_CLASS_CELLS} cells: {_listed(balance.small, balance.counts)}; "
            f"their test figures will be noisy (data.min_cells_per_class={WARN_CLASS_CELLS} drops them)"
        )
    return warnings


def split_messages(check: SplitCheck) -> tuple[list[str], list[str]]:
    """(problems, warnings) about the split."""
    if check.error is not None:
        return [f"split: {check.error}"], []
    warnings = []
    if check.absent_from_train:
        table = check.table
        described = [
            f"{c} (" + ", ".join(f"{s} {int(table.loc[c, s])}" for s in ("val", "test") if table.loc[c, s]) + ")"
            for c in check.absent_from_train
        ]
        warnings.append(
            f"{_classes(len(check.absent_from_train))} absent from train (the model cannot learn them"
            f"{', yet they are tested' if check.in_test_not_train else ''}): {', '.join(described[:8])}"
            f"{' ...' if len(described) > 8 else ''}"
        )
    empty = [s for s, n in check.counts.items() if n == 0 and s != "val"]
    if empty:
        warnings.append(f"the {' and '.join(empty)} split is empty")
    return [], warnings


def verdict(
    *,
    overlap: VocabOverlap | None,
    balance: ClassBalance,
    split: SplitCheck,
    candidates: Sequence[GeneKeyCandidate] = (),
    extra_problems: Sequence[str] = (),
) -> Verdict:
    """Problems (the run would fail) and warnings, problems in the order a run meets them:
    the split, then the backbone (`extra_problems`: its checkpoint folder), then the gene overlap."""
    split_problems, split_warnings = split_messages(split)
    overlap_problems, overlap_warnings = overlap_messages(overlap, candidates) if overlap is not None else ([], [])
    return Verdict(
        problems=[*split_problems, *extra_problems, *overlap_problems],
        warnings=[*overlap_warnings, *class_messages(balance), *split_warnings],
    )


def report(
    data: DataSummary,
    ids: GeneIds,
    overlap: VocabOverlap | None,
    balance: ClassBalance,
    split: SplitCheck,
    result: Verdict,
    *,
    split_name: str | None = None,
    pretrained: bool = False,
    candidates: Sequence[GeneKeyCandidate] = (),
) -> dict:
    """The figures of inspect.json (JSON-serialisable)."""
    per_class = None if split.table is None else {c: {s: int(v) for s, v in row.items()} for c, row in split.table.iterrows()}
    groups = None if split.groups is None else {c: {k: int(v) for k, v in row.items()} for c, row in split.groups.iterrows()}
    return {
        "ok": result.ok,
        "problems": list(result.problems),
        "warnings": list(result.warnings),
        "n_cells": data.n_cells,
        "n_genes": data.n_genes,
        "n_classes": data.n_classes,
        "input_kind": data.input_kind,
        "source": data.source,
        "path": data.path,
        "gene_id_kind": ids.kind,
        "ensembl_fraction": ids.ensembl_fraction,
        "symbol_fraction": ids.symbol_fraction,
        "pretrained": pretrained,
        "vocab_overlap": None if overlap is None else {
            "count": overlap.count,
            "fraction": overlap.fraction,
            "n_genes": overlap.n_genes,
            "source": overlap.source,
            "path": overlap.path,
            "vocab_size": overlap.vocab_size,
            "vocab_id_kind": overlap.vocab_kind,
            "unmatched_examples": overlap.unmatched_examples,
            "n_unmatched": overlap.n_unmatched,
        },
        "min_overlap": MIN_OVERLAP,
        "gene_key_candidates": [{"column": c.column, "kind": c.kind, "count": c.count, "fraction": c.fraction} for c in candidates],
        "smallest_classes": [{"class": c, "cells": n} for c, n in balance.smallest()],
        "split": {
            "name": split_name,
            "error": split.error,
            "counts": split.counts,
            "per_class": per_class,
            "groups_per_class": groups,
            "absent_from_train": split.absent_from_train,
            "in_test_not_train": split.in_test_not_train,
        },
        "split_counts": split.counts,
    }

