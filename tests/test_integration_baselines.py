"""Integration baselines (scpeft_cli.tasks.integration.baselines) on the simulated-batch oracle
(scpeft_cli/data/simulated.py): PCA keeps the simulated batches apart, Harmony mixes them and keeps the cell
types, and neither finds batches where none were simulated. Figures measured for seed 0 are in the comments."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np
import pytest
import scanpy as sc

from scpeft_cli.data.simulated import simulate_batches
from scpeft_cli.tasks.integration import baselines
from scpeft_cli.tasks.integration.baselines import (
    HARMONY_INSTALL_HINT,
    harmony_embedding,
    missing_harmony,
    pca_embedding,
)
from scpeft_cli.tasks.integration.metrics import asw_batch, integration_scores


def _log_normalised(adata):
    adata = adata.copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    return adata


@pytest.fixture(scope="module")
def simulated():
    pytest.importorskip("harmonypy", reason="Harmony needs harmonypy (the integration extra)")
    adata = _log_normalised(simulate_batches(3, seed=0))
    adata.obsm["X_pca"] = pca_embedding(adata.X, n_comps=50, seed=0)
    adata.obsm["X_harmony"] = harmony_embedding(adata.obsm["X_pca"], adata.obs["batch"], seed=0)
    return adata


@pytest.fixture(scope="module")
def scores(simulated):
    pytest.importorskip("leidenalg", reason="NMI/ARI need igraph + leidenalg (the integration extra)")
    kwargs = {"batch_key": "batch", "label_key": "bulk_labels"}
    return {
        "pca": integration_scores(simulated, embedding_key="X_pca", **kwargs),
        "harmony": integration_scores(simulated, embedding_key="X_harmony", **kwargs),
    }


def test_simulation_is_deterministic_by_seed_and_shaped_as_documented():
    first, again, other = simulate_batches(3, seed=0), simulate_batches(3, seed=0), simulate_batches(3, seed=1)
    assert (first.X != again.X).nnz == 0
    assert (first.obs["batch"] == again.obs["batch"]).all()
    assert (first.X != other.X).nnz > 0
    assert first.shape == (700, 765)
    assert first.X.format == "csr" and first.X.dtype == np.float32
    assert np.array_equal(first.X.data, np.round(first.X.data))
    assert list(first.obs["batch"].cat.categories) == ["batch0", "batch1", "batch2"]
    assert sorted(first.obs["batch"].value_counts()) == [233, 233, 234]  # balanced
    assert np.allclose(first.obs["n_counts"], np.asarray(first.X.sum(axis=1)).ravel())
    assert first.obs["bulk_labels"].nunique() == 10


def test_pca_separates_simulated_batches_but_not_random_ones(simulated):
    # seed 0: batch ASW of PCA 0.873 with the simulated effect, 0.962 on the null (random batches, no effect)
    null = _log_normalised(simulate_batches(3, seed=0, strength=0.0, depth_strength=0.0))
    null_pca = pca_embedding(null.X, n_comps=50, seed=0)
    simulated_asw = asw_batch(simulated.obsm["X_pca"], simulated.obs["batch"], simulated.obs["bulk_labels"])
    null_asw = asw_batch(null_pca, null.obs["batch"], null.obs["bulk_labels"])
    assert simulated_asw < 0.9
    assert null_asw > 0.94
    assert null_asw - simulated_asw > 0.05


def test_harmony_mixes_batches_and_keeps_cell_types(scores):
    # seed 0: avg_batch PCA 0.863 -> Harmony 0.928 (seeds 0-3: margin 0.051-0.065); avg_bio 0.445 -> 0.566,
    # which is the null data's 0.572 (the effect blurs the cell types in PCA; Harmony restores them)
    pca, harmony = scores["pca"], scores["harmony"]
    assert harmony["avg_batch"] - pca["avg_batch"] > 0.03
    assert harmony["asw_batch"] > 0.93
    assert harmony["avg_bio"] - pca["avg_bio"] > 0.05
    assert harmony["pcr_batch"] > 0.9  # PCR of the batch: ~all of the batch variance removed (0.961)


def test_harmony_keeps_the_shape_and_dtype(simulated):
    assert simulated.obsm["X_harmony"].shape == simulated.obsm["X_pca"].shape == (700, 50)
    assert simulated.obsm["X_harmony"].dtype == simulated.obsm["X_pca"].dtype
    assert not np.allclose(simulated.obsm["X_harmony"], simulated.obsm["X_pca"])


def test_pca_clips_n_comps():
    rng = np.random.default_rng(0)
    assert pca_embedding(rng.normal(size=(12, 30)), n_comps=50).shape == (12, 11)
    assert pca_embedding(rng.normal(size=(40, 8)), n_comps=50).shape == (40, 7)


def _fake_harmonypy(monkeypatch, z_corr, z_orig=None):
    calls = {}

    def run_harmony(data_mat, meta_data, vars_use, **kwargs):
        calls.update(data_mat=data_mat, meta_data=meta_data, vars_use=vars_use, **kwargs)
        return SimpleNamespace(Z_corr=z_corr, Z_orig=z_orig if z_orig is not None else z_corr)

    monkeypatch.setitem(sys.modules, "harmonypy", SimpleNamespace(run_harmony=run_harmony))
    return calls


def test_harmony_accepts_dims_by_cells_z_corr_from_old_harmonypy(monkeypatch):
    pca = np.arange(20, dtype=np.float32).reshape(5, 4)  # 5 cells, 4 dims
    calls = _fake_harmonypy(monkeypatch, z_corr=(pca + 1).T.astype(np.float64))  # harmonypy 0.0.x: (dims, cells)
    out = harmony_embedding(pca, ["a", "a", "b", "b", "b"], seed=3)
    assert out.shape == pca.shape and out.dtype == np.float32
    assert np.array_equal(out, pca + 1)
    assert calls["vars_use"] == ["batch"] and calls["random_state"] == 3 and calls["verbose"] is False
    assert list(calls["meta_data"]["batch"]) == ["a", "a", "b", "b", "b"]

    _fake_harmonypy(monkeypatch, z_corr=pca + 2)  # harmonypy 2.x: (cells, dims)
    assert np.array_equal(harmony_embedding(pca, list("aabbb")), pca + 2)


def test_harmony_orientation_of_a_square_result_follows_z_orig(monkeypatch):
    pca = np.arange(16, dtype=np.float64).reshape(4, 4)
    _fake_harmonypy(monkeypatch, z_corr=(pca + 1).T, z_orig=pca.T)
    assert np.array_equal(harmony_embedding(pca, list("aabb")), pca + 1)
    _fake_harmonypy(monkeypatch, z_corr=pca + 1, z_orig=pca)
    assert np.array_equal(harmony_embedding(pca, list("aabb")), pca + 1)


def test_harmony_rejects_mismatched_input(monkeypatch):
    _fake_harmonypy(monkeypatch, z_corr=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="batch values for"):
        harmony_embedding(np.zeros((4, 2)), list("aab"))
    with pytest.raises(ValueError, match="shape"):
        harmony_embedding(np.zeros((4, 2)), list("aabb"))


def test_missing_harmony_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "harmonypy", None)  # import harmonypy -> ImportError
    assert missing_harmony() == HARMONY_INSTALL_HINT
    assert "pip install 'scpeft-cli[integration]'" in HARMONY_INSTALL_HINT
    with pytest.raises(ImportError, match="Harmony baseline skipped"):
        baselines.harmony_embedding(np.zeros((4, 2)), list("aabb"))


def test_missing_harmony_is_none_when_installed():
    pytest.importorskip("harmonypy")
    assert missing_harmony() is None
