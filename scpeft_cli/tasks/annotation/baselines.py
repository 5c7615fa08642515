"""Reference points computed on every annotation run's own split, so a strategy is never judged alone.

- PCA(50) + logistic regression on the log-normalised expression (no foundation model at all);
- zero-shot reference mapping: kNN on the frozen backbone's cell embeddings (training cells as the
  reference, test cells as the query), i.e. what the pretrained model gives without any training.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.sparse as sp
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import normalize

Metrics = Callable[[np.ndarray, np.ndarray], dict[str, float]]


def pca_logreg(
    X: sp.spmatrix, labels: np.ndarray, *, train: np.ndarray, test: np.ndarray, seed: int, metrics: Metrics, n_components: int = 50
) -> dict[str, float]:
    """PCA fitted on the training cells only (no test information leaks into the projection).

    The sparse matrix is never densified: arpack centres it implicitly.
    """
    n_components = min(n_components, len(train) - 1, X.shape[1] - 1)
    pca = PCA(n_components=n_components, svd_solver="arpack", random_state=seed).fit(X[train])
    classifier = LogisticRegression(max_iter=2000).fit(pca.transform(X[train]), labels[train])
    return metrics(labels[test], classifier.predict(pca.transform(X[test])))


def knn_reference_mapping(
    embeddings: np.ndarray, labels: np.ndarray, *, train: np.ndarray, test: np.ndarray, metrics: Metrics, k: int = 10
) -> dict[str, float]:
    """Cosine kNN on L2-normalised embeddings, as scGPT's zero-shot reference mapping does."""
    unit = normalize(embeddings)
    classifier = KNeighborsClassifier(n_neighbors=min(k, len(train)), metric="cosine").fit(unit[train], labels[train])
    return metrics(labels[test], classifier.predict(unit[test]))

