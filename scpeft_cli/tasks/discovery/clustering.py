"""Clusters of an embedding and how well they find the known cell states: Leiden on scanpy's kNN graph at a
fixed resolution (the number of clusters is part of the answer), NMI and ARI of the clusters against the
labels (the integration metrics), and Calinski-Harabasz of the embedding against the labels."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from sklearn.metrics import calinski_harabasz_score

from scpeft_cli.tasks.integration.metrics import ari, knn_graph, leiden, nmi


class Clustering(NamedTuple):
    clusters: np.ndarray  # each cell's cluster (strings "0", "1", ... by size, as scanpy numbers them)
    scores: dict[str, float]


def cluster_embedding(embedding: np.ndarray, labels: np.ndarray | None, *, resolution: float, n_neighbors: int, seed: int) -> Clustering:
    """Leiden clusters of `embedding` and, with `labels`, nmi / ari / calinski_harabasz; n_clusters always."""
    graph = knn_graph(embedding, n_neighbors=n_neighbors, random_state=seed)
    clusters = leiden(graph, resolution, flavor="leidenalg", random_state=seed)
    scores: dict[str, float] = {"n_clusters": int(len(np.unique(clusters)))}
    if labels is not None:
        labels = np.asarray(labels).astype(str)
        scores["nmi"] = nmi(labels, clusters)
        scores["ari"] = ari(labels, clusters)
        scores["calinski_harabasz"] = float(calinski_harabasz_score(np.asarray(embedding, dtype=np.float64), labels))
    return Clustering(clusters, scores)
