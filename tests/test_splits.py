"""Tests for the split functions: coverage of classes, group isolation, determinism and errors."""

import numpy as np
import pandas as pd
import pytest

from scpeft_cli.data.splits import column_split, group_split, stratified_split, summarize_split
from scpeft_cli.errors import UserError


def make_obs(counts=(50, 30, 20), n_donors=10):
    """obs with a categorical "label" (sizes ``counts``) and a donor column; returns (obs, codes)."""
    names = [f"type{i}" for i, n in enumerate(counts) for _ in range(n)]
    obs = pd.DataFrame({"label": pd.Categorical(names)}, index=[f"c{i}" for i in range(len(names))])
    obs["donor"] = [f"donor{i % n_donors}" for i in range(len(names))]
    return obs, obs["label"].cat.codes.to_numpy()


def test_stratified_every_class_in_every_split():
    obs, labels = make_obs()
    split = stratified_split(obs, labels, seed=0)
    assert split.dtype.kind == "U" and set(split) == {"train", "val", "test"}
    for c in np.unique(labels):
        assert set(split[labels == c]) == {"train", "val", "test"}
    assert np.mean(split == "test") == pytest.approx(0.2, abs=0.02)
    assert np.mean(split == "val") == pytest.approx(0.1, abs=0.02)


def test_stratified_deterministic_per_seed():
    obs, labels = make_obs()
    a = stratified_split(obs, labels, seed=1)
    assert np.array_equal(a, stratified_split(obs, labels, seed=1))
    assert not np.array_equal(a, stratified_split(obs, labels, seed=2))


def test_stratified_small_classes_are_named():
    obs, labels = make_obs(counts=(50, 2, 1))
    with pytest.raises(UserError, match="type1 \\(2\\), type2 \\(1\\).*data.min_cells_per_class=3"):
        stratified_split(obs, labels, seed=0)


def test_stratified_three_cells_suffice():
    obs, labels = make_obs(counts=(3, 3))
    split = stratified_split(obs, labels, seed=0, val_fraction=0.4, test_fraction=0.5)
    for c in (0, 1):
        assert sorted(split[labels == c]) == ["test", "train", "val"]


@pytest.mark.parametrize(
    ("val", "test", "message"),
    [(-0.1, 0.2, "val_fraction must be in"), (0.1, 1.0, "test_fraction must be in"), (0.5, 0.5, "must be < 1")],
)
def test_stratified_bad_fractions(val, test, message):
    obs, labels = make_obs()
    with pytest.raises(UserError, match=message):
        stratified_split(obs, labels, seed=0, val_fraction=val, test_fraction=test)


def test_group_split_keeps_groups_apart():
    obs, labels = make_obs(n_donors=10)
    split = group_split(obs, labels, seed=0, group_key="donor")
    groups = {name: set(obs["donor"][split == name]) for name in ("train", "val", "test")}
    assert not groups["train"] & groups["val"]
    assert not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    assert len(groups["val"]) == 1
    assert len(groups["test"]) == 2
    assert len(groups["train"]) == 7


def test_group_split_depends_on_seed():
    obs, labels = make_obs(n_donors=10)
    a = group_split(obs, labels, seed=0, group_key="donor")
    assert np.array_equal(a, group_split(obs, labels, seed=0, group_key="donor"))
    assert any(not np.array_equal(a, group_split(obs, labels, seed=s, group_key="donor")) for s in range(1, 5))


def test_group_split_errors():
    obs, labels = make_obs(n_donors=2)
    with pytest.raises(UserError, match="at least 3 groups in obs\\['donor'\\], found 2"):
        group_split(obs, labels, seed=0, group_key="donor")
    with pytest.raises(UserError, match="group column 'patient' not in obs; available: label, donor"):
        group_split(obs, labels, seed=0, group_key="patient")


def test_group_split_warns_about_classes_missing_from_train(capsys):
    obs, labels = make_obs(counts=(30, 30), n_donors=3)
    obs["donor"] = ["donor0"] * 30 + ["donor1"] * 15 + ["donor2"] * 15  # type0 lives only in donor0
    for seed in range(20):
        capsys.readouterr()
        split = group_split(obs, labels, seed=seed, group_key="donor")
        if not np.any(split[labels == 0] == "train"):
            break
    else:
        pytest.fail("no seed held out donor0")
    out = capsys.readouterr().out
    assert "classes absent from the training groups" in out and "type0" in out


def test_column_split_maps_values():
    obs, labels = make_obs(counts=(3, 3))
    obs["fold"] = ["tr", "va", "te", "te", "tr", "va"]
    split = column_split(obs, labels, seed=0, column="fold", train_value="tr", val_value="va", test_value="te")
    assert split.tolist() == ["train", "val", "test", "test", "train", "val"]


def test_column_split_errors():
    obs, labels = make_obs(counts=(3, 3))
    with pytest.raises(UserError, match="split column 'fold' not in obs; available: label, donor"):
        column_split(obs, labels, seed=0, column="fold")
    obs["fold"] = ["train", "val", "test", "dev", "dev", "train"]
    with pytest.raises(UserError, match="values other than .*'dev' \\(2 cells\\)"):
        column_split(obs, labels, seed=0, column="fold")
    obs["fold"] = ["train", "train", "test", "test", "train", "train"]
    with pytest.raises(UserError, match="no cells have value 'val'"):
        column_split(obs, labels, seed=0, column="fold")


def test_summarize_split():
    split = np.array(["train", "train", "val", "test", "train"])
    labels = np.array([0, 0, 0, 0, 1])
    table = summarize_split(split, labels, ["A", "B", "C"])
    assert list(table.columns) == ["train", "val", "test"]
    assert table.loc["A"].tolist() == [2, 1, 1]
    assert table.loc["B"].tolist() == [1, 0, 0]
    assert table.loc["C"].tolist() == [0, 0, 0]
