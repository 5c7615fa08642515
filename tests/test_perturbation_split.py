"""Tests for GEARS condition notation, the condition checks and GEARS' simulation split (no model involved)."""

from __future__ import annotations

import itertools
import random
import types

import numpy as np
import pandas as pd
import pytest

from scpeft_cli.data.conditions import CONTROL, check_conditions, is_control, perturbed_genes
from scpeft_cli.errors import UserError
from scpeft_cli.tasks.perturbation.splits import SUBGROUPS, simulation_split, split_summary

GENES = [f"G{i:02d}" for i in range(20)]


def make_conditions(order_seed: int = 0) -> list[str]:
    """One label per cell: control, a single for every gene (both spellings) and 95 doubles, shuffled.

    Every gene of a double also has a single, so "seen" genes can be read off the training singles.
    """
    singles = [f"{g}+ctrl" if i % 3 else f"ctrl+{g}" for i, g in enumerate(GENES)]
    doubles = [f"{a}+{b}" for a, b in itertools.combinations(GENES, 2)][::2]
    cells = [CONTROL] * 5 + singles * 3 + doubles * 2
    random.Random(order_seed).shuffle(cells)
    return cells


def single_genes(conditions) -> set[str]:
    return {g for c in conditions if len(genes := perturbed_genes(c)) == 1 for g in genes}


def expected_subgroup(condition: str, seen: set[str]) -> str:
    genes = perturbed_genes(condition)
    n_seen = sum(g in seen for g in genes)
    return "unseen_single" if len(genes) == 1 and not n_seen else f"combo_seen{n_seen}"


@pytest.mark.parametrize(
    ("condition", "genes"),
    [
        ("ctrl", ()),
        (" ctrl ", ()),
        ("A+ctrl", ("A",)),
        ("ctrl+A", ("A",)),
        (" A + ctrl", ("A",)),
        ("A+B", ("A", "B")),
        ("B+A", ("B", "A")),
    ],
)
def test_perturbed_genes_valid(condition, genes):
    assert perturbed_genes(condition) == genes


@pytest.mark.parametrize("condition", ["", "A", "A+B+C", "+A", "A+", "A++ctrl", "ctrl+ctrl", "A+A", float("nan"), None])
def test_perturbed_genes_invalid(condition):
    with pytest.raises(UserError, match="is not GEARS notation"):
        perturbed_genes(condition)


def test_is_control():
    assert is_control("ctrl") and is_control(" ctrl")
    assert not is_control("A+ctrl") and not is_control(float("nan"))


def test_check_conditions_keeps_all_known():
    mask = check_conditions(["ctrl", "A+ctrl", "A+B", "ctrl"], ["A", "B"], unknown="error", key="condition")
    assert mask.dtype == bool and mask.all()


def test_check_conditions_unknown_gene_error():
    conditions = ["ctrl", "A+ctrl", "X+ctrl", "X+ctrl", "A+Y"]
    with pytest.raises(UserError, match=r"X, Y \(2 conditions, 3 cells\); set data.unknown_perturbations=drop"):
        check_conditions(conditions, ["A"], unknown="error", key="condition")


def test_check_conditions_unknown_gene_drop(capsys):
    conditions = ["ctrl", "A+ctrl", "X+ctrl", "X+ctrl", "A+Y"]
    mask = check_conditions(conditions, ["A"], unknown="drop", key="condition")
    assert mask.tolist() == [True, True, False, False, False]
    out = capsys.readouterr().out
    assert "X, Y (2 conditions, 3 cells)" in out and "dropping those cells" in out


def test_check_conditions_lists_at_most_five_genes():
    conditions = ["ctrl"] + [f"X{i}+ctrl" for i in range(7)]
    with pytest.raises(UserError, match=r"X0, X1, X2, X3, X4, \.\.\. \(7 in all\)"):
        check_conditions(conditions, ["A"], unknown="error", key="condition")


def test_check_conditions_bad_option_and_notation_and_no_control():
    with pytest.raises(UserError, match="data.unknown_perturbations must be one of drop, error"):
        check_conditions(["ctrl"], ["A"], unknown="keep", key="condition")
    with pytest.raises(UserError, match=r"obs\['condition'\] value 'A\+B\+C' is not GEARS notation"):
        check_conditions(["ctrl", "A+B+C"], ["A", "B", "C"], unknown="drop", key="condition")
    with pytest.raises(UserError, match=r"obs\['perturbation'\] has no control cells"):
        check_conditions(["A+ctrl", "B+ctrl"], ["A", "B"], unknown="drop", key="perturbation")


@pytest.fixture(scope="module")
def split():
    return simulation_split(make_conditions(), seed=1)


def test_split_partitions_the_conditions(split):
    parts = [set(split.conditions[name]) for name in ("train", "val", "test")]
    assert all(parts) and not any(a & b for a, b in itertools.combinations(parts, 2))
    assert set.union(*parts) == set(make_conditions())
    assert CONTROL in split.conditions["train"]
    assert all(list(names) == sorted(names) for names in split.conditions.values())


def test_split_subgroups_follow_the_training_genes(split):
    # Test subgroups count genes seen before val was carved out of train; val subgroups count final train.
    seen = {
        "test": single_genes(split.conditions["train"] + split.conditions["val"]),
        "val": single_genes(split.conditions["train"]),
    }
    for name in ("val", "test"):
        groups = split.subgroups[name]
        assert set(groups) == set(split.conditions[name]) and set(groups.values()) <= set(SUBGROUPS)
        assert groups == {c: expected_subgroup(c, seen[name]) for c in groups}
    assert set(split.subgroups["test"].values()) == set(SUBGROUPS)


def test_split_deterministic_and_order_independent(split):
    assert simulation_split(make_conditions(order_seed=5), seed=1) == split
    assert simulation_split(make_conditions(), seed=2) != split


def test_split_errors():
    with pytest.raises(UserError, match="split.train_gene_set_size must be in"):
        simulation_split(make_conditions(), seed=0, train_gene_set_size=1.0)
    with pytest.raises(UserError, match="split.combo_seen2_train_frac must be in"):
        simulation_split(make_conditions(), seed=0, combo_seen2_train_frac=0)
    with pytest.raises(UserError, match="is not GEARS notation"):
        simulation_split(["ctrl", "A+B+C"], seed=0)
    with pytest.raises(UserError, match="no unseen condition for testing: 0 perturbations over 0 genes"):
        simulation_split(["ctrl", "ctrl"], seed=0)
    with pytest.raises(UserError, match="too few for both training and validation"):
        simulation_split(["ctrl", "A+ctrl", "B+ctrl"], seed=0)


def test_split_summary(split):
    line = split_summary(split)
    assert f"train {len(split.conditions['train'])}" in line and "\n" not in line
    assert all(name in line for name in SUBGROUPS)


@pytest.mark.parametrize("seed", [0, 1, 42])
def test_split_matches_gears(seed):
    data_utils = pytest.importorskip("gears.data_utils")
    conditions = make_conditions()
    adata = types.SimpleNamespace(obs=pd.DataFrame({"condition": conditions}))
    adata, subgroups = data_utils.DataSplitter(adata, split_type="simulation").split_data(seed=seed)
    assigned = dict(zip(adata.obs["condition"], adata.obs["split"], strict=True))
    ours = simulation_split(conditions, seed=seed)
    for name in ("train", "val", "test"):
        assert list(ours.conditions[name]) == sorted(c for c, s in assigned.items() if s == name)
    for name in ("val", "test"):
        theirs = {str(c): group for group, names in subgroups[f"{name}_subgroup"].items() for c in np.ravel(names)}
        assert ours.subgroups[name] == theirs
