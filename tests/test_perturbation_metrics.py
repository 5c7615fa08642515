"""Perturbation metrics and baselines (scpeft_cli.tasks.perturbation) on the simulated Perturb-seq oracle
(scpeft_cli/data/simulated_perturbation.py), whose true condition means and planted DE genes are known.
Figures measured for seed 0 are in the comments."""

from __future__ import annotations

import warnings

import anndata
import numpy as np
import pytest
import scanpy as sc
from scipy import stats

from scpeft_cli.data.simulated_perturbation import (
    load_simulated_perturbseq,
    simulate_perturbseq,
    true_condition_means,
    write_simulated_perturbseq_h5ad,
)
from scpeft_cli.tasks.perturbation.baselines import baseline_predictions
from scpeft_cli.tasks.perturbation.metrics import (
    METRICS,
    condition_metrics,
    per_condition_table,
    summarise,
    top_de_genes,
)


@pytest.fixture(scope="module")
def screen():
    """The default screen, prepared; its per-condition observed means; and the planted log fold changes."""
    adata = load_simulated_perturbseq()
    conditions = adata.obs["scpeft_condition"].to_numpy()
    means = {c: np.asarray(adata.X[conditions == c].mean(axis=0)).ravel() for c in np.unique(conditions)}
    truth = true_condition_means(adata)
    planted = np.log(truth / truth.loc["ctrl"])
    return adata, conditions, means, planted


@pytest.fixture(scope="module")
def de(screen):
    return top_de_genes(screen[0])


def _doubles(conditions: np.ndarray) -> list[str]:
    return sorted(c for c in set(conditions) if "ctrl" not in c.split("+"))


def test_simulator_is_seeded():
    first, again, other = simulate_perturbseq(seed=0), simulate_perturbseq(seed=0), simulate_perturbseq(seed=1)
    assert (first.X != again.X).nnz == 0 and first.obs.equals(again.obs)
    assert (first.X != other.X).nnz > 0
    categories = list(first.obs["condition"].cat.categories)
    assert categories[0] == "ctrl" and len(categories) == 1 + 24 + 8
    assert sum(c.endswith("+ctrl") for c in categories) == 24


def test_knockdown_and_program_show_in_the_data(screen):
    adata, _, means, planted = screen
    for condition in (c for c in means if c.endswith("+ctrl")):
        gene = adata.var_names.get_loc(condition.split("+")[0])
        assert means[condition][gene] < 0.5 * means["ctrl"][gene]  # at most 0.45 for seed 0
        lfc = planted.loc[condition].to_numpy()
        program = np.flatnonzero(np.abs(lfc) > 0)
        program = program[program != gene]
        assert len(program) == 15
        shift = means[condition][program] - means["ctrl"][program]
        assert np.mean(np.sign(shift) == np.sign(lfc[program])) >= 0.8  # 1.0 for seed 0


def test_a_double_is_the_additive_combination_of_its_singles(screen):
    _, conditions, _, planted = screen
    doubles = _doubles(conditions)
    assert len(doubles) == 8
    for double in doubles:
        a, b = double.split("+")
        np.testing.assert_allclose(planted.loc[double], planted.loc[f"{a}+ctrl"] + planted.loc[f"{b}+ctrl"], atol=1e-12)


def test_write_and_load_keep_the_counts_and_the_conditions(tmp_path, screen):
    path = write_simulated_perturbseq_h5ad(tmp_path / "screen.h5ad", n_single=6, n_double=2, n_control=20)
    written = anndata.read_h5ad(path)
    fresh = simulate_perturbseq(n_single=6, n_double=2, n_control=20)
    assert (written.X != fresh.X).nnz == 0
    assert list(written.obs["condition"].astype(str)) == list(fresh.obs["condition"].astype(str))
    adata = screen[0]
    assert adata.obs["scpeft_condition"].tolist() == adata.obs["condition"].astype(str).tolist()
    assert adata.uns["scpeft_input"]["input_kind"] == "counts" and adata.X.max() < 15  # log-normalised


def test_near_truth_scores_high(screen, de):
    _, conditions, means, _ = screen
    rng = np.random.default_rng(0)
    for condition in _doubles(conditions):
        noisy = means[condition] + rng.normal(0, 0.05, means[condition].size)
        scores = condition_metrics(noisy, means[condition], means["ctrl"], de[condition])
        assert scores["pearson"] > 0.99 and scores["pearson_delta"] > 0.5  # pearson_delta 0.99 for seed 0


def test_control_mean_scores_zero_delta_without_warnings(screen, de):
    _, conditions, means, _ = screen
    for condition in _doubles(conditions):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            scores = condition_metrics(means["ctrl"], means[condition], means["ctrl"], de[condition])
        assert scores["pearson_delta"] == 0.0 and scores["pearson_de_delta"] == 0.0
        assert all(np.isfinite(v) for v in scores.values())


def test_additive_beats_control_mean_on_doubles_with_seen_singles(screen, de):
    adata, conditions, means, _ = screen
    doubles = _doubles(conditions)
    train = ~np.isin(conditions, doubles)  # control and every single: both genes of each double are seen
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preds = baseline_predictions(adata.X[train], conditions[train], doubles)
        truth = {c: means[c] for c in doubles}
        tables = {
            name: per_condition_table(dict(zip(doubles, p, strict=True)), truth, means["ctrl"], de, {})
            for name, p in preds.items()
        }
    assert (tables["control_mean"]["pearson_delta"] == 0.0).all()
    assert (tables["additive"]["pearson_delta"] > 0.5).all()  # mean 0.79 for seed 0
    assert tables["additive"]["pearson_delta"].mean() > tables["perturbed_mean"]["pearson_delta"].mean()  # 0.25


def test_additive_adds_nothing_for_a_gene_without_a_training_single():
    X = np.array([[1.0, 2.0], [3.0, 2.0], [1.0, 6.0]])
    preds = baseline_predictions(X, ["ctrl", "A+ctrl", "B+C"], ["A+Z", "Z+ctrl", "ctrl"])
    np.testing.assert_allclose(preds["additive"], [[3.0, 2.0], [1.0, 2.0], [1.0, 2.0]])
    np.testing.assert_allclose(preds["control_mean"], [[1.0, 2.0]] * 3)
    np.testing.assert_allclose(preds["perturbed_mean"], [[2.0, 4.0]] * 3)


def test_condition_metrics_match_scipy():
    rng = np.random.default_rng(1)
    pred, truth, control = rng.normal(size=(3, 50))
    de_idx = rng.choice(50, size=20, replace=False)
    scores = condition_metrics(pred, truth, control, de_idx)
    assert scores["pearson"] == pytest.approx(stats.pearsonr(pred, truth)[0], abs=1e-12)
    assert scores["pearson_de"] == pytest.approx(stats.pearsonr(pred[de_idx], truth[de_idx])[0], abs=1e-12)
    assert scores["pearson_delta"] == pytest.approx(stats.pearsonr(pred - control, truth - control)[0], abs=1e-12)
    assert scores["pearson_de_delta"] == pytest.approx(
        stats.pearsonr((pred - control)[de_idx], (truth - control)[de_idx])[0], abs=1e-12
    )
    assert scores["mse"] == pytest.approx(np.mean((pred - truth) ** 2))
    assert scores["mse_de"] == pytest.approx(np.mean((pred[de_idx] - truth[de_idx]) ** 2))


def test_top_de_genes_find_the_planted_genes(screen, de):
    adata, _, _, planted = screen
    assert set(de) == set(planted.index) - {"ctrl"}
    for condition, idx in de.items():
        assert len(idx) == 20
        planted_idx = np.flatnonzero(np.abs(planted.loc[condition].to_numpy()) > 0)
        assert np.isin(idx, planted_idx).sum() >= 12  # of at most 16 for a single; at least 13 for seed 0
        for gene in condition.split("+"):
            if gene != "ctrl":
                assert adata.var_names.get_loc(gene) in idx  # the knockdown itself


@pytest.mark.filterwarnings("ignore::pandas.errors.PerformanceWarning")  # scanpy, many groups
def test_top_de_genes_match_scanpy_and_leave_the_data_alone(screen, de):
    adata = screen[0]
    assert "rank_genes_groups" not in adata.uns
    direct = adata.copy()
    sc.tl.rank_genes_groups(
        direct, groupby="scpeft_condition", reference="ctrl", rankby_abs=True, n_genes=20, use_raw=False
    )
    names = direct.uns["rank_genes_groups"]["names"]
    for condition in names.dtype.names:
        np.testing.assert_array_equal(de[condition], adata.var_names.get_indexer(names[condition]))


def test_summarise_gives_overall_and_subgroup_means(screen, de):
    _, conditions, means, _ = screen
    doubles = _doubles(conditions)
    subgroups = {c: "combo_seen2" if i % 2 else "combo_seen1" for i, c in enumerate(doubles[:-1])}
    truth = {c: means[c] for c in doubles}
    table = per_condition_table(truth, truth, means["ctrl"], de, subgroups)
    assert table["subgroup"].isna().sum() == 1
    summary = summarise(table)
    assert set(summary) == {*METRICS, *(f"{g}_{m}" for g in ("combo_seen1", "combo_seen2") for m in METRICS)}
    assert summary["pearson"] == pytest.approx(1.0) and summary["combo_seen1_mse"] == 0.0
