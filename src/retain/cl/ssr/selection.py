"""SSR's choice of diverse rows: K-means over row features, then the rows nearest each centroid first."""

from __future__ import annotations

import warnings

import numpy as np


def round_robin_nearest(
    features: np.ndarray, labels: np.ndarray, centers: np.ndarray, budget: int
) -> list[int]:
    """Up to `budget` row indices: the nearest row (Euclidean, ties by index) of cluster 0, 1, ..., k-1,
    then the second nearest of each, and so on; a cluster with no rows left is skipped."""
    ranked = []
    for cluster, center in enumerate(centers):
        members = np.flatnonzero(labels == cluster)
        distances = np.linalg.norm(features[members] - center, axis=1)
        ranked.append([int(i) for _, i in sorted(zip(distances.tolist(), members.tolist(), strict=True))])
    selected: list[int] = []
    depth = 0
    while len(selected) < budget and any(depth < len(rows) for rows in ranked):
        for rows in ranked:
            if depth < len(rows) and len(selected) < budget:
                selected.append(rows[depth])
        depth += 1
    return selected


def cluster_select(features: np.ndarray, n_clusters: int, budget: int, seed: int) -> list[int]:
    """K-means (scikit-learn, `random_state=seed`, 10 initialisations) with `min(n_clusters, budget, rows)`
    clusters, then `round_robin_nearest`: the first round takes one row per cluster, the one nearest
    its centroid. With at most `budget` rows, every row is kept (in that order)."""
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    count = min(n_clusters, budget, len(features))
    if count <= 0:
        return []
    points = np.asarray(features, dtype=np.float64)
    with warnings.catch_warnings():  # fewer distinct points than clusters: some clusters stay small
        warnings.simplefilter("ignore", ConvergenceWarning)
        kmeans = KMeans(n_clusters=count, random_state=seed, n_init=10).fit(points)
    return round_robin_nearest(points, kmeans.labels_, kmeans.cluster_centers_, budget)
