"""Batch-integration metrics (scpeft_cli.tasks.integration.metrics): known values on constructed embeddings, small
examples checked by hand, and parity with scib 1.1.7 itself when it is installed (the `scib` extra)."""

from __future__ import annotations

import anndata
import numpy as np
import pandas as pd
import pytest
from scipy import sparse
from sklearn.metrics import silhouette_samples

from scpeft_cli.tasks.integration import metrics as im


def _leiden_available() -> bool:
    try:
        import igraph  # noqa: F401
        import leidenalg  # noqa: F401
    except ImportError:
        return False
    return True


needs_leiden = pytest.mark.skipif(not _leiden_available(), reason="Leiden needs igraph + leidenalg (the scib extra)")

CENTRES = np.array([[0.0, 0.0, 0.0], [30.0, 0.0, 0.0], [0.0, 30.0, 0.0]])


def _cells(embedding, batches, labels, X=None) -> anndata.AnnData:
    obs = pd.DataFrame(
        {"batch": pd.Categorical(batches), "celltype": pd.Categorical(labels)},
        index=[f"c{i}" for i in range(len(batches))],
    )
    cells = anndata.AnnData(X=X if X is not None else np.zeros((len(batches), 1)), obs=obs)
    cells.obsm["X_emb"] = np.asarray(embedding, dtype=np.float64)
    return cells


@pytest.fixture(scope="module")
def mixed():
    """3 well separated cell types; every cell of batch "x" has a twin in batch "y" 1e-3 away: batches mixed."""
    rng = np.random.default_rng(0)
    n = 30  # cells per label and batch
    points = np.concatenate([c + rng.normal(size=(n, 3)) for c in CENTRES])
    twins = points + rng.normal(scale=1e-3, size=points.shape)
    labels = np.repeat(["a", "b", "c"], n)
    return _cells(np.concatenate([points, twins]), np.repeat(["x", "y"], 3 * n), np.concatenate([labels, labels])), n


@pytest.fixture(scope="module")
def separated():
    """2 batches, each its own far cluster; 3 cell types mixed at random inside each batch."""
    rng = np.random.default_rng(1)
    n = 90  # cells per batch
    embedding = np.concatenate([c + rng.normal(size=(n, 3)) for c in CENTRES[:2]])
    labels = rng.choice(["a", "b", "c"], size=2 * n)
    return _cells(embedding, np.repeat(["x", "y"], n), labels)


@needs_leiden
def test_mixed_batches_within_separated_labels_score_near_one(mixed):
    cells, n = mixed
    scores = im.integration_scores(
        cells, embedding_key="X_emb", batch_key="batch", label_key="celltype", unintegrated_key=None
    )
    assert scores["nmi"] == pytest.approx(1.0) and scores["ari"] == pytest.approx(1.0)
    assert scores["graph_connectivity"] == 1.0
    assert scores["asw_label"] > 0.95
    # exact twins give s = -1/n per cell (n - 1 same-batch cells vs n in the other batch, one at distance 0): 1 - 1/n
    assert scores["asw_batch"] == pytest.approx(1 - 1 / n, abs=1e-3)
    assert scores["avg_bio"] == pytest.approx(np.mean([scores["nmi"], scores["ari"], scores["asw_label"]]))
    assert scores["avg_batch"] == pytest.approx(np.mean([scores["asw_batch"], scores["graph_connectivity"]]))
    assert scores["overall"] == pytest.approx(0.6 * scores["avg_bio"] + 0.4 * scores["avg_batch"])
    assert scores["leiden_resolution"] in im.SCIB_RESOLUTIONS
    assert "pcr_batch" not in scores


@needs_leiden
def test_batch_separated_embedding_scores_low(separated):
    scores = im.integration_scores(
        separated, embedding_key="X_emb", batch_key="batch", label_key="celltype", unintegrated_key=None
    )
    assert scores["asw_batch"] < 0.1
    assert 0.4 < scores["graph_connectivity"] < 0.7  # each label split over the two batch clusters
    assert scores["nmi"] < 0.2 and scores["ari"] < 0.1 and scores["asw_label"] < 0.55


def test_resolutions_are_scibs_default():
    # scib 1.1.7 get_resolutions(n=10, max=2), the default of cluster_optimal_resolution
    assert im.SCIB_RESOLUTIONS == tuple(2 * (x + 1) / 10 for x in range(10))
    assert im.SCIB_RESOLUTIONS[0] == 0.2 and im.SCIB_RESOLUTIONS[-1] == 2.0 and len(im.SCIB_RESOLUTIONS) == 10


def test_asw_batch_by_hand():
    # 1-D coordinates. Label A: batch x at 0, 1; y at 2, 3 -> s = 3/5, 1/3, 1/3, 3/5: mean 1 - |s| = 8/15.
    # Label B: x at 10, 12; y at 11, 14 -> s = 1/5, -1/4, -2/3, 0: mean 1 - |s| = 173/240 (|mean s| would differ).
    # Label C: one batch -> skipped; label D: every cell its own batch -> skipped.
    coords = [0, 1, 2, 3, 10, 12, 11, 14, 50, 51, 80, 81]
    batches = ["x", "x", "y", "y", "x", "x", "y", "y", "x", "x", "x", "y"]
    labels = ["A"] * 4 + ["B"] * 4 + ["C"] * 2 + ["D"] * 2
    X = np.array(coords, dtype=float)[:, None]
    assert im.asw_batch(X, batches, labels) == pytest.approx((8 / 15 + 173 / 240) / 2)
    s_b = silhouette_samples(X[4:8], batches[4:8])
    np.testing.assert_allclose(s_b, [1 / 5, -1 / 4, -2 / 3, 0], atol=1e-12)
    assert np.isnan(im.asw_batch(X[8:], batches[8:], labels[8:]))  # C and D only: nothing left


def test_asw_label_is_scaled_silhouette():
    X = np.array([[0.0], [1.0], [10.0], [11.0]])
    # a = 1, b = 10 or 9 (mean to the other label) -> s = 0.9, 0.8889, 0.8889, 0.9
    expected = np.mean([1 - 1 / 10.5, 1 - 1 / 9.5, 1 - 1 / 9.5, 1 - 1 / 10.5])
    assert im.asw_label(X, ["a", "a", "b", "b"]) == pytest.approx((expected + 1) / 2)


def test_graph_connectivity_by_hand():
    # A = cells 0, 1, 2 with only 0-1 inside A (2 is linked to a B cell); B = 3, 4, 5 as a path: (2/3 + 1) / 2.
    edges = [(0, 1), (2, 3), (3, 4), (4, 5)]
    graph = sparse.lil_matrix((6, 6))
    for i, j in edges:
        graph[i, j] = graph[j, i] = 1.0
    labels = ["A", "A", "A", "B", "B", "B"]
    assert im.graph_connectivity(graph.tocsr(), labels) == pytest.approx(5 / 6)
    cells = anndata.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(6)]))
    cells.obsp["connectivities"] = graph.tocsr()
    assert im.graph_connectivity(cells, labels) == pytest.approx(5 / 6)
    # scib's components are strongly connected ones: a one-way edge does not join two cells
    one_way = sparse.csr_matrix(([1.0], ([0], [1])), shape=(2, 2))
    assert im.graph_connectivity(one_way, ["A", "A"]) == 0.5
    with pytest.raises(KeyError, match="neighbors"):
        im.graph_connectivity(anndata.AnnData(obs=pd.DataFrame(index=["0", "1"])), ["A", "A"])


def test_pc_regression_by_hand():
    # dim 0 is the batch (+-2), dim 1 has mean 0 in each batch and no correlation with dim 0: PCs are the dims,
    # R^2 = 1 and 0, variances 4 and 1 (x 8/7): PCR = 4 / (4 + 1).
    batch = ["x"] * 4 + ["y"] * 4
    X = np.column_stack([[2, 2, 2, 2, -2, -2, -2, -2], [1, -1, 1, -1, 1, -1, 1, -1]]).astype(float)
    assert im.pc_regression(X, batch) == pytest.approx(0.8)
    assert im.pc_regression(X, [0] * 4 + [1] * 4) == pytest.approx(0.8)  # batch codes are categories
    assert im.pc_regression(sparse.csr_matrix(X), batch) == pytest.approx(0.8)


def test_pcr_batch_removed_and_unchanged():
    rng = np.random.default_rng(2)
    batch = np.repeat(["x", "y", "z"], 60)
    biology = rng.normal(size=(180, 20))
    shift = rng.normal(scale=8.0, size=(3, 20))[np.repeat(np.arange(3), 60)]
    removed = im.pcr_batch(biology + shift, biology, batch, n_comps=10)
    assert removed.pcr_before > 0.9 and removed.pcr_after < 0.05
    assert removed.score > 0.95
    unchanged = im.pcr_batch(biology + shift, biology + shift, batch, n_comps=10)
    assert unchanged.score == 0.0 and unchanged.pcr_before == pytest.approx(unchanged.pcr_after)
    assert im.pcr_batch(biology, biology + shift, batch, n_comps=10).score == 0.0  # more batch after: clipped at 0


def test_nmi_ari():
    labels = ["a", "a", "b", "b"]
    assert im.nmi(labels, [1, 1, 0, 0]) == 1.0 and im.ari(labels, [1, 1, 0, 0]) == 1.0
    assert im.nmi(labels, [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)
    assert im.ari(labels, [0, 1, 0, 1]) == pytest.approx(-0.5)


def test_without_labels_only_batch_metrics(mixed):
    mixed_cells, _ = mixed
    shift = np.where(mixed_cells.obs["batch"].to_numpy() == "x", 5.0, -5.0)[:, None]
    cells = anndata.AnnData(X=mixed_cells.obsm["X_emb"] + shift, obs=mixed_cells.obs.drop(columns="celltype"))
    cells.obsm["X_emb"] = mixed_cells.obsm["X_emb"]
    scores = im.integration_scores(cells, embedding_key="X_emb", batch_key="batch")
    assert set(scores) == {"asw_batch", "graph_connectivity", "pcr_batch", "avg_batch"}
    assert scores["graph_connectivity"] == pytest.approx(1 / 3)  # one pseudo-label over 3 separate clusters
    assert scores["pcr_batch"] > 0.9


@needs_leiden
def test_optimal_leiden_inputs_agree(mixed):
    cells, _ = mixed
    labels = cells.obs["celltype"]
    from_embedding = im.optimal_leiden(cells.obsm["X_emb"], labels, resolutions=(0.2, 0.4))
    from_adata = im.optimal_leiden(cells, labels, use_rep="X_emb", resolutions=(0.2, 0.4))
    from_graph = im.optimal_leiden(im.knn_graph(cells.obsm["X_emb"]), labels, resolutions=(0.2, 0.4))
    assert from_embedding.resolution == from_adata.resolution == from_graph.resolution
    np.testing.assert_array_equal(from_embedding.clusters, from_graph.clusters)
    assert set(from_embedding.scores) == {0.2, 0.4}
    igraph_flavour = im.optimal_leiden(cells.obsm["X_emb"], labels, resolutions=(0.2,), flavor="igraph")
    assert igraph_flavour.nmi == pytest.approx(1.0)


@pytest.fixture(scope="module")
def realistic():
    """400 cells, 8 cell types x 3 batches: a partial batch effect in the embedding (every metric strictly between
    0 and 1, the NMI-optimal resolution inside the range) and a strong one in X."""
    rng = np.random.default_rng(3)
    n_cells, n_genes, n_dims, n_types = 400, 80, 10, 8
    types = rng.choice([f"t{i}" for i in range(n_types)], size=n_cells)
    batches = rng.choice(["b1", "b2", "b3"], size=n_cells)
    type_code = pd.Categorical(types).codes
    batch_code = pd.Categorical(batches).codes
    emb = rng.normal(scale=3.0, size=(n_types, n_dims))[type_code] + rng.normal(scale=1.4, size=(3, n_dims))[batch_code]
    emb = emb + rng.normal(size=(n_cells, n_dims))
    X = rng.normal(size=(n_types, n_genes))[type_code] + rng.normal(scale=2.0, size=(3, n_genes))[batch_code]
    X = X + rng.normal(size=(n_cells, n_genes))
    cells = _cells(emb, batches, types, X=X)
    cells.obs = cells.obs.rename(columns={"batch": "str_batch"})
    return cells


# scib's own deprecation noise (pd.value_counts, use_highly_variable, leidenalg default), not ours
scib_noise = pytest.mark.filterwarnings("ignore::FutureWarning")


@needs_leiden
@scib_noise
def test_parity_with_scib(realistic):
    scib = pytest.importorskip("scib")
    ours = im.integration_scores(
        realistic, embedding_key="X_emb", batch_key="str_batch", label_key="celltype", unintegrated_key="X"
    )
    # scGPT's eval_scib_metrics call
    theirs = scib.metrics.metrics(
        realistic.copy(),
        adata_int=realistic.copy(),
        batch_key="str_batch",
        label_key="celltype",
        embed="X_emb",
        isolated_labels_asw_=False,
        silhouette_=True,
        hvg_score_=False,
        graph_conn_=True,
        pcr_=True,
        isolated_labels_f1_=False,
        trajectory_=False,
        nmi_=True,
        ari_=True,
        cell_cycle_=False,
        kBET_=False,
        ilisi_=False,
        clisi_=False,
    )[0].to_dict()
    pairs = {
        "nmi": "NMI_cluster/label",
        "ari": "ARI_cluster/label",
        "asw_label": "ASW_label",
        "asw_batch": "ASW_label/batch",
        "graph_connectivity": "graph_conn",
        "pcr_batch": "PCR_batch",
    }
    for ours_key, scib_key in pairs.items():
        # measured: equal to 1e-15 except pcr_batch, 1.4e-8 (scanpy returns scib's PCs as float32)
        assert ours[ours_key] == pytest.approx(theirs[scib_key], abs=1e-6), (ours_key, ours[ours_key], theirs[scib_key])
    # the metrics are not trivial here (neither 0 nor 1), so agreement means something
    assert all(0.05 < ours[k] < 0.99 for k in pairs)


def test_a_precomputed_unintegrated_pcr_gives_the_same_scores(realistic):
    before = im.pc_regression(realistic.X, realistic.obs["str_batch"])
    kwargs = dict(embedding_key="X_emb", batch_key="str_batch")  # batch metrics only: no Leiden needed
    assert im.integration_scores(realistic, **kwargs, unintegrated_pcr=before) == im.integration_scores(realistic, **kwargs)


@needs_leiden
@scib_noise
def test_parity_with_scib_functions(realistic):
    scib = pytest.importorskip("scib")
    cells = realistic.copy()
    res, nmi_max = scib.metrics.cluster_optimal_resolution(
        cells, label_key="celltype", cluster_key="cluster", use_rep="X_emb", verbose=False
    )
    ours = im.optimal_leiden(realistic.obsm["X_emb"], realistic.obs["celltype"])
    assert ours.resolution == res == 1.0 and ours.nmi == pytest.approx(nmi_max, abs=1e-12)
    np.testing.assert_array_equal(ours.clusters, cells.obs["cluster"].astype(str).to_numpy())
    assert im.ari(cells.obs["celltype"], cells.obs["cluster"]) == pytest.approx(
        scib.metrics.ari(cells, cluster_key="cluster", label_key="celltype"), abs=1e-12
    )
    emb, batch, label = cells.obsm["X_emb"], cells.obs["str_batch"], cells.obs["celltype"]
    assert im.asw_batch(emb, batch, label) == pytest.approx(
        scib.metrics.silhouette_batch(cells, batch_key="str_batch", label_key="celltype", embed="X_emb", verbose=False),
        abs=1e-12,
    )
    assert im.graph_connectivity(cells, label) == pytest.approx(scib.metrics.graph_connectivity(cells, "celltype"))
    for n_comps in (5, 50):  # ARPACK and exact-SVD paths
        before = scib.metrics.pcr(
            cells, covariate="str_batch", n_comps=n_comps, recompute_pca=True, linreg_method="numpy"
        )
        assert im.pc_regression(cells.X, batch, n_comps=n_comps) == pytest.approx(before, abs=1e-5)
