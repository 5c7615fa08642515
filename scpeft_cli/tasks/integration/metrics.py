"""Batch-integration metrics, defined as scib 1.1.7 defines them (``scib.metrics``), on numpy arrays and AnnData.

Bio conservation: NMI and ARI of the NMI-optimal Leiden clustering against the cell-type labels, and the label
silhouette (ASW). Batch removal: the batch silhouette within each label, graph connectivity of each label's kNN
subgraph, and principal component regression of the batch before vs after integration. ``integration_scores``
aggregates them as scGPT's integration tutorial reports them (``avg_bio``, ``avg_batch``).

Each function's docstring names the scib function it reproduces and any place where we deliberately differ.
None of them needs scib; ``tests/test_integration_metrics.py`` checks them against scib when it is installed
(the ``scib`` extra).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import anndata
import numpy as np
import pandas as pd
import scanpy as sc
from scipy import sparse
from scipy.sparse.csgraph import connected_components
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_samples, silhouette_score

__all__ = [
    "SCIB_RESOLUTIONS",
    "LeidenResult",
    "PCRComparison",
    "ari",
    "asw_batch",
    "asw_label",
    "graph_connectivity",
    "integration_scores",
    "knn_graph",
    "leiden",
    "nmi",
    "optimal_leiden",
    "pc_regression",
    "pcr_batch",
]

# scib 1.1.7 `cluster_optimal_resolution(resolutions=None)` -> `get_resolutions(n=10, max=2)`: 0.2, 0.4, ..., 2.0,
# computed as scib computes them (`2 * (x + 1) / 10`), so the floats are the same. (The 20 values 0.1..2.0 were
# scib's older `opt_louvain` default; `scib.metrics.metrics`, which scGPT calls, uses the 10 above.)
SCIB_RESOLUTIONS: tuple[float, ...] = tuple(2 * (x + 1) / 10 for x in range(10))


def _labels(values) -> np.ndarray:
    return np.asarray(pd.Series(values).astype(str).to_numpy())


def nmi(labels, clusters) -> float:
    """Normalised mutual information between labels and clusters: scib ``nmi(implementation="arithmetic")``, its
    default, which is sklearn's ``normalized_mutual_info_score(average_method="arithmetic")``."""
    return float(normalized_mutual_info_score(_labels(labels), _labels(clusters), average_method="arithmetic"))


def ari(labels, clusters) -> float:
    """Adjusted Rand index between labels and clusters (sklearn's ``adjusted_rand_score``).

    scib's default ``ari(implementation=None)`` evaluates the same formula from the contingency table itself; the two
    agree except where the index is 0/0 (one cluster and one label, or every cell its own cluster), where sklearn
    returns 1.0 and scib NaN."""
    return float(adjusted_rand_score(_labels(labels), _labels(clusters)))


def asw_label(embedding, labels) -> float:
    """Label ASW: scib ``silhouette(metric="euclidean", scale=True)``, i.e. ``(silhouette_score(X, labels) + 1) / 2``
    over all cells (no subsampling); 1 = compact, well separated labels, 0.5 = overlapping."""
    return float((silhouette_score(np.asarray(embedding), _labels(labels), metric="euclidean") + 1) / 2)


def asw_batch(embedding, batches, labels) -> float:
    """Batch ASW: scib ``silhouette_batch(metric="euclidean", scale=True)``.

    For each label, the silhouette of each of its cells with the *batches* as clusters, computed on that label's
    cells only (``silhouette_samples``); per cell ``1 - |s|`` (absolute value per cell, then scaled); the mean per
    label; the mean over labels. 1 = batches perfectly mixed within every label, 0 = batches fully separated.
    Labels are skipped as scib skips them: those whose cells come from a single batch, and those where every cell
    is its own batch (silhouette undefined). NaN when every label is skipped."""
    embedding = np.asarray(embedding)
    batches, labels = _labels(batches), _labels(labels)
    per_label = []
    for label in pd.unique(labels):
        cells = labels == label
        n_batches = len(np.unique(batches[cells]))
        if n_batches == 1 or n_batches == cells.sum():
            continue
        sil = silhouette_samples(embedding[cells], batches[cells], metric="euclidean")
        per_label.append(np.mean(1 - np.abs(sil)))
    return float(np.mean(per_label)) if per_label else float("nan")


def knn_graph(embedding, *, n_neighbors: int = 15, random_state: int = 0) -> sparse.csr_matrix:
    """The kNN graph scib clusters and measures: scanpy's ``neighbors(use_rep=..., n_neighbors=15)`` connectivities
    (UMAP fuzzy union, symmetric) on the embedding, as scib's ``cluster_optimal_resolution(use_rep=embed)`` computes
    it with scanpy's defaults (``metric="euclidean"``, ``random_state=0``)."""
    embedding = np.asarray(embedding)
    cells = anndata.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(len(embedding))]))
    cells.obsm["X_emb"] = embedding
    sc.pp.neighbors(cells, use_rep="X_emb", n_neighbors=n_neighbors, random_state=random_state)
    return sparse.csr_matrix(cells.obsp["connectivities"])


def _graph(adata_or_graph) -> sparse.csr_matrix:
    if isinstance(adata_or_graph, anndata.AnnData):
        if "connectivities" not in adata_or_graph.obsp:
            raise KeyError("the AnnData has no kNN graph (obsp['connectivities']): run sc.pp.neighbors first")
        return sparse.csr_matrix(adata_or_graph.obsp["connectivities"])
    return sparse.csr_matrix(adata_or_graph)


def graph_connectivity(adata_or_knn_graph, labels) -> float:
    """Graph connectivity: scib ``graph_connectivity``. For each label, the share of its cells in the largest
    (strongly) connected component of the kNN graph restricted to that label's cells; the mean over labels.

    ``adata_or_knn_graph`` is an AnnData with ``obsp["connectivities"]`` (scanpy's neighbours graph, which scib uses)
    or an (n_cells, n_cells) adjacency matrix. scib loops over the label column's categories, so an unused category
    makes its score NaN; we loop over the labels present."""
    graph = _graph(adata_or_knn_graph)
    labels = _labels(labels)
    if graph.shape != (len(labels), len(labels)):
        raise ValueError(f"the graph is {graph.shape} for {len(labels)} labels")
    shares = []
    for label in pd.unique(labels):
        cells = np.flatnonzero(labels == label)
        _, component = connected_components(graph[cells][:, cells], directed=True, connection="strong")
        shares.append(np.bincount(component).max() / len(cells))
    return float(np.mean(shares))


class LeidenResult(NamedTuple):
    clusters: np.ndarray  # cluster of each cell (strings), at the NMI-optimal resolution
    resolution: float
    nmi: float
    scores: dict[float, float]  # NMI at each resolution tried


def leiden(graph: sparse.csr_matrix, resolution: float, *, flavor: str, random_state: int) -> np.ndarray:
    """Leiden clusters (strings) of a kNN graph at one resolution, seeded; `flavor` as in `optimal_leiden`."""
    cells = anndata.AnnData(obs=pd.DataFrame(index=[str(i) for i in range(graph.shape[0])]))
    if flavor == "leidenalg":
        # scanpy's sc.tl.leiden defaults, which scib 1.1.7 calls: leidenalg's RBConfigurationVertexPartition on the
        # graph taken as directed, edge weights, iterations until convergence (-1), seed 0.
        options = {"flavor": "leidenalg", "n_iterations": -1}
    elif flavor == "igraph":
        # scanpy's recommended future default: igraph's community_leiden (modularity), undirected, 2 iterations.
        options = {"flavor": "igraph", "n_iterations": 2, "directed": False}
    else:
        raise ValueError(f"flavor must be 'leidenalg' (scib's) or 'igraph', not {flavor!r}")
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="In the future, the default backend for leiden", category=FutureWarning
        )
        try:
            sc.tl.leiden(
                cells, resolution=resolution, adjacency=graph, random_state=random_state, key_added="leiden", **options
            )
        except ImportError as error:
            needs = "leidenalg and igraph" if flavor == "leidenalg" else "igraph"
            raise ImportError(
                f"Leiden clustering (flavor={flavor!r}) needs {needs}: pip install 'scpeft-cli[scib]'"
            ) from error
    return cells.obs["leiden"].astype(str).to_numpy()


def optimal_leiden(
    adata_or_embedding,
    labels,
    *,
    resolutions: Sequence[float] = SCIB_RESOLUTIONS,
    use_rep: str | None = None,
    n_neighbors: int = 15,
    flavor: str = "leidenalg",
    random_state: int = 0,
) -> LeidenResult:
    """Leiden clustering at the resolution that maximises NMI with ``labels``: scib ``cluster_optimal_resolution``
    (``metric=nmi``, its default resolutions 0.2, 0.4, ..., 2.0, see ``SCIB_RESOLUTIONS``).

    The graph: an embedding (dense array) gets scanpy's 15-neighbour graph (``knn_graph``), as scib recomputes it
    with ``sc.pp.neighbors(adata, use_rep=embed)``; a scipy sparse matrix is taken as the graph itself; an AnnData
    gives ``obsm[use_rep]``'s graph when ``use_rep`` is set, else its existing ``obsp["connectivities"]`` (the
    AnnData is not modified). Ties keep the first resolution in ``resolutions`` (scib keeps the first strictly
    better score); if every NMI is 0, the first resolution's clustering (scib would store none).

    ``flavor="leidenalg"`` (default) is what scib 1.1.7 runs: it calls ``sc.tl.leiden`` with scanpy's defaults,
    which in scanpy 1.11 are leidenalg's RBConfigurationVertexPartition on the graph taken as directed,
    ``n_iterations=-1`` and ``random_state=0``; only this flavour reproduces scib's clusters, hence its NMI/ARI,
    exactly. ``flavor="igraph"`` is scanpy's recommended future default (igraph's ``community_leiden``,
    ``n_iterations=2``, undirected) and needs no leidenalg, but its partitions differ: on the 400-cell data of the
    parity test it picks resolution 0.2 with NMI 0.805 / ARI 0.599 where scib finds 1.0 with 0.796 / 0.478.
    Both are seeded with ``random_state``."""
    if isinstance(adata_or_embedding, anndata.AnnData):
        if use_rep is not None:
            graph = knn_graph(adata_or_embedding.obsm[use_rep], n_neighbors=n_neighbors, random_state=random_state)
        else:
            graph = _graph(adata_or_embedding)
    elif sparse.issparse(adata_or_embedding):
        graph = sparse.csr_matrix(adata_or_embedding)
    else:
        graph = knn_graph(adata_or_embedding, n_neighbors=n_neighbors, random_state=random_state)
    labels = _labels(labels)
    if len(labels) != graph.shape[0]:
        raise ValueError(f"{len(labels)} labels for {graph.shape[0]} cells")
    if len(resolutions) == 0:
        raise ValueError("resolutions is empty")
    best: LeidenResult | None = None
    scores: dict[float, float] = {}
    for resolution in resolutions:
        clusters = leiden(graph, float(resolution), flavor=flavor, random_state=random_state)
        score = nmi(labels, clusters)
        scores[float(resolution)] = score
        if best is None or score > best.nmi:
            best = LeidenResult(clusters, float(resolution), score, scores)
    return best


class PCRComparison(NamedTuple):
    score: float  # (before - after) / before, 0 when the batch's variance share grew; NaN when before is 0
    pcr_before: float
    pcr_after: float


def pc_regression(X, batches, *, n_comps: int | None = 50) -> float:
    """Variance share of ``X`` explained by the batch: scib ``pc_regression`` (as ``pcr_comparison`` calls it,
    ``linreg_method="numpy"``): ``sum_i R^2(PC_i ~ batch) * Var(PC_i) / sum_j Var(PC_j)`` over the first
    ``n_comps`` principal components (all of them when ``n_comps`` is None or >= min(X.shape)).

    PCA as scib runs it (``sc.tl.pca``: centred; ARPACK, or an exact SVD when ``n_comps == min(X.shape)``);
    variances are the PCs' sample variances, normalised over the computed PCs only. ``R^2`` is that of an
    ordinary least-squares fit of each PC on an intercept plus the one-hot batch (scib: ``pd.get_dummies``),
    clipped at 0; for a one-hot design the fit is the per-batch mean, so we compute it as
    ``sum_b n_b * mean_b(PC)^2 / sum(PC^2)`` directly. Deviation: scib regresses on a *numeric* covariate column
    as one continuous variable (e.g. integer batch codes); here the batch is always categorical."""
    batches = _labels(batches)
    if X.shape[0] != len(batches):
        raise ValueError(f"{X.shape[0]} cells for {len(batches)} batch values")
    full_rank = min(X.shape)
    n_comps = full_rank if n_comps is None or n_comps > full_rank else n_comps
    solver = "full" if n_comps == full_rank else "arpack"
    if sparse.issparse(X):
        X = X.toarray() if solver == "full" else sparse.csr_matrix(X)
    else:
        X = np.asarray(X)
    pca = PCA(n_components=n_comps, svd_solver=solver, random_state=0)
    pcs = np.asarray(pca.fit_transform(X), dtype=np.float64)
    variance = np.asarray(pca.explained_variance_, dtype=np.float64)
    pcs = pcs - pcs.mean(axis=0)
    codes = pd.factorize(batches)[0]
    counts = np.bincount(codes)
    means = np.stack([np.bincount(codes, weights=pc) for pc in pcs.T], axis=1) / counts[:, None]
    total = (pcs**2).sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(total > 0, (counts[:, None] * means**2).sum(axis=0) / total, 0.0)
    r2 = np.clip(r2, 0.0, 1.0)
    return float(np.sum(r2 * variance / variance.sum()))


def pcr_batch(X_before, X_after, batches, *, n_comps: int | None = 50, before: float | None = None) -> PCRComparison:
    """PCR batch score: scib ``pcr_comparison(scale=True)``: ``pcr_before`` and ``pcr_after`` are the batch's variance
    shares (``pc_regression``) of the data before and after integration, each with its own PCA of ``n_comps`` PCs;
    score = ``(before - after) / before``, set to 0 when negative (the batch's share grew), so it lies in [0, 1]:
    1 = the batch explains nothing any more, 0 = no change. NaN when ``pcr_before`` is 0 (scib divides by it).
    ``before``: ``pc_regression(X_before, batches, n_comps=n_comps)`` when already computed (``X_before`` is then unread)."""
    if before is None:
        before = pc_regression(X_before, batches, n_comps=n_comps)
    after = pc_regression(X_after, batches, n_comps=n_comps)
    if before == 0:
        score = float("nan")
    else:
        score = max(0.0, (before - after) / before)
    return PCRComparison(float(score), before, after)


def _matrix(adata: anndata.AnnData, key: str):
    return adata.X if key == "X" else adata.obsm[key]


def integration_scores(
    adata: anndata.AnnData,
    *,
    embedding_key: str,
    batch_key: str,
    label_key: str | None = None,
    unintegrated_key: str | None = "X",
    n_neighbors: int = 15,
    resolutions: Sequence[float] = SCIB_RESOLUTIONS,
    flavor: str = "leidenalg",
    n_comps: int | None = 50,
    random_state: int = 0,
    unintegrated_pcr: float | None = None,
) -> dict[str, float]:
    """scib's integration metrics of ``adata.obsm[embedding_key]``, as scGPT's integration tutorial runs them
    (``scib.metrics.metrics(adata, adata_int=adata, embed=..., nmi_, ari_, silhouette_, graph_conn_, pcr_)``).

    The kNN graph (``knn_graph``: scanpy, 15 neighbours, on the embedding) is built once and used both for the
    NMI-optimal Leiden clustering and for graph connectivity, as in scib, which recomputes the graph on the
    embedding during clustering and then measures connectivity on it. ``adata`` is not modified.

    Keys: ``nmi``, ``ari`` (of the ``optimal_leiden`` clustering, whose resolution is ``leiden_resolution``),
    ``asw_label``, ``asw_batch``, ``graph_connectivity``, ``pcr_batch`` (``pcr_batch``: before = PCA of ``adata.X``
    when ``unintegrated_key="X"``, else of ``obsm[unintegrated_key]``; omitted when ``unintegrated_key`` is None),
    ``avg_bio = mean(nmi, ari, asw_label)`` (scGPT's AvgBIO), ``avg_batch = mean(asw_batch, graph_connectivity)``
    (scGPT's AvgBATCH: ``pcr_batch`` is reported but, as in scGPT, not averaged in), and
    ``overall = 0.6 * avg_bio + 0.4 * avg_batch`` (scib's overall-score weighting, on these two averages).

    Without labels (``label_key`` None) the bio metrics cannot be computed: the result has only the batch metrics
    ``asw_batch``, ``graph_connectivity``, ``pcr_batch`` and ``avg_batch``, the first two with all cells as one label
    (what scib returns for a constant label column).

    ``unintegrated_pcr``: the unintegrated data's ``pc_regression``, when scoring several embeddings of the same cells
    (it is the same for each, and its PCA the costliest step)."""
    embedding = np.asarray(adata.obsm[embedding_key])
    batches = _labels(adata.obs[batch_key])
    has_labels = label_key is not None
    labels = _labels(adata.obs[label_key]) if has_labels else np.full(adata.n_obs, "all")
    graph = knn_graph(embedding, n_neighbors=n_neighbors, random_state=random_state)
    scores: dict[str, float] = {}
    if has_labels:
        best = optimal_leiden(graph, labels, resolutions=resolutions, flavor=flavor, random_state=random_state)
        scores["nmi"] = best.nmi
        scores["ari"] = ari(labels, best.clusters)
        scores["asw_label"] = asw_label(embedding, labels)
    scores["asw_batch"] = asw_batch(embedding, batches, labels)
    scores["graph_connectivity"] = graph_connectivity(graph, labels)
    if unintegrated_key is not None:
        scores["pcr_batch"] = pcr_batch(
            _matrix(adata, unintegrated_key), embedding, batches, n_comps=n_comps, before=unintegrated_pcr
        ).score
    scores["avg_batch"] = float(np.mean([scores["asw_batch"], scores["graph_connectivity"]]))
    if has_labels:
        scores["avg_bio"] = float(np.mean([scores["nmi"], scores["ari"], scores["asw_label"]]))
        scores["overall"] = 0.6 * scores["avg_bio"] + 0.4 * scores["avg_batch"]
        scores["leiden_resolution"] = best.resolution
    return scores
