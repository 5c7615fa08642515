"""GEARS' "simulation" split of perturbation conditions, so results compare with published GEARS numbers.

Conditions, never cells, are split: a held-out condition's cells are all unseen in training. Genes are
drawn first; a held-out condition is graded by how many of its genes were drawn for training.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from scpeft_cli.data.conditions import CONTROL, perturbed_genes
from scpeft_cli.errors import UserError

SUBGROUPS = ("combo_seen0", "combo_seen1", "combo_seen2", "unseen_single")
# GEARS carves validation out of training with these fixed fractions, whatever the test split used.
VAL_GENE_SET_SIZE = 0.9
VAL_COMBO_SEEN2_TRAIN_FRAC = 0.9


@dataclass(frozen=True)
class PerturbationSplit:
    """Conditions per split ("train" / "val" / "test", sorted; control in train) and held-out subgroups."""

    conditions: dict[str, tuple[str, ...]]
    subgroups: dict[str, dict[str, str]]


def _draw(items: list[str], fraction: float, seed: int) -> set[str]:
    """floor(fraction * n) of the sorted items, drawn as GEARS does (legacy NumPy seeding) for identical splits."""
    chosen = np.random.RandomState(seed).choice(items, int(len(items) * fraction), replace=False)
    return {str(item) for item in chosen}


def _hold_out(
    perts: dict[str, tuple[str, ...]], *, seed: int, gene_fraction: float, seen2_train_frac: float
) -> tuple[list[str], dict[str, str]]:
    """One GEARS simulation step: the conditions kept for training and the held-out ones with their subgroup."""
    seen = _draw(sorted({g for genes in perts.values() for g in genes}), gene_fraction, seed)
    kept, held, seen2 = [], {}, []
    for condition, genes in perts.items():
        n_seen = sum(g in seen for g in genes)
        if len(genes) == 1:
            if n_seen:
                kept.append(condition)
            else:
                held[condition] = "unseen_single"
        elif n_seen == 2:
            seen2.append(condition)
        else:
            held[condition] = f"combo_seen{n_seen}"
    seen2_kept = _draw(sorted(seen2), seen2_train_frac, seed)
    kept += [c for c in seen2 if c in seen2_kept]
    held.update({c: "combo_seen2" for c in seen2 if c not in seen2_kept})
    return kept, dict(sorted(held.items()))


def _check_fraction(name: str, value: float) -> None:
    if not 0 < value < 1:
        raise UserError(f"split.{name} must be in (0, 1), got {value}")


def _count_genes(perts: Iterable[tuple[str, ...]]) -> int:
    return len({g for genes in perts for g in genes})


def simulation_split(
    conditions: Iterable[str], *, seed: int, train_gene_set_size: float = 0.75, combo_seen2_train_frac: float = 0.75
) -> PerturbationSplit:
    """GEARS' simulation split (PertData.prepare_split(split='simulation')) of the unique conditions.

    Test: the step above on all perturbations; val: the same step on what it kept for training, with
    GEARS' fixed 0.9 fractions. Control always trains. Same seed and condition set give the same split.
    """
    _check_fraction("train_gene_set_size", train_gene_set_size)
    _check_fraction("combo_seen2_train_frac", combo_seen2_train_frac)
    parsed = {c: perturbed_genes(c) for c in sorted(set(conditions))}
    perts = {c: genes for c, genes in parsed.items() if genes}
    controls = {CONTROL, *(c for c, genes in parsed.items() if not genes)}
    train, test = _hold_out(
        perts, seed=seed, gene_fraction=train_gene_set_size, seen2_train_frac=combo_seen2_train_frac
    )
    if not test:
        raise UserError(
            f"the simulation split left no unseen condition for testing: {len(perts)} perturbations over "
            f"{_count_genes(perts.values())} genes; give more perturbations or lower split.train_gene_set_size"
        )
    kept = {c: perts[c] for c in train}
    train, val = _hold_out(
        kept, seed=seed, gene_fraction=VAL_GENE_SET_SIZE, seen2_train_frac=VAL_COMBO_SEEN2_TRAIN_FRAC
    )
    if not val or not train:
        raise UserError(
            f"the simulation split left {len(kept)} training perturbations over {_count_genes(kept.values())} genes "
            "after holding out the test set, too few for both training and validation; "
            "give more perturbations or raise split.train_gene_set_size"
        )
    return PerturbationSplit(
        conditions={"train": tuple(sorted([*train, *controls])), "val": tuple(val), "test": tuple(test)},
        subgroups={"val": val, "test": test},
    )


def split_summary(split: PerturbationSplit) -> str:
    """One console line: conditions per split and the test conditions per subgroup."""
    counts = ", ".join(f"{name} {len(split.conditions[name])}" for name in ("train", "val", "test"))
    groups = list(split.subgroups["test"].values())
    per_group = ", ".join(f"{name} {groups.count(name)}" for name in SUBGROUPS)
    return f"simulation split over conditions: {counts} (train incl. {CONTROL}); test subgroups: {per_group}"


MODES = ("simulation",)


def perturbation_split(*, conditions: Iterable[str], seed: int, mode: str, train_gene_set_size: float, combo_seen2_train_frac: float) -> PerturbationSplit:
    """`split=perturbation`: conditions split by `split.mode` (GEARS' `simulation`, the split scPEFT used)."""
    if mode not in MODES:
        raise UserError(f"split.mode={mode} is not known; choose one of: {', '.join(MODES)}")
    return simulation_split(conditions, seed=seed, train_gene_set_size=train_gene_set_size, combo_seen2_train_frac=combo_seen2_train_frac)
