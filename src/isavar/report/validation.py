"""Comparisons of results with simulated ground truth (used by the demo, tests and benchmarks)."""

from __future__ import annotations

import numpy as np


def mixture_std_map(volumes, weights) -> np.ndarray:
    """Voxelwise standard deviation of a discrete mixture of volumes.

    Parameters
    ----------
    volumes : sequence of numpy.ndarray
        ``K`` volumes of the same shape ``(N, N, N)``.
    weights : sequence of float
        Their probabilities (normalised here).

    Returns
    -------
    numpy.ndarray
        ``sqrt(sum_k w_k (V_k - V_mean)^2)``; for two states ``sqrt(p (1 - p)) |V_1 - V_2|``.
    """
    vols = np.stack([np.asarray(v, dtype=np.float64) for v in volumes])
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    mean = np.tensordot(w, vols, axes=1)
    return np.sqrt(np.tensordot(w, (vols - mean) ** 2, axes=1)).astype(np.float32)


def sphere_mask(size: int, radius: float) -> np.ndarray:
    """Boolean ``(size, size, size)`` ball of ``radius`` voxels about the centre ``size // 2``."""
    c = size // 2
    z, y, x = np.ogrid[:size, :size, :size]
    return (z - c) ** 2 + (y - c) ** 2 + (x - c) ** 2 <= radius ** 2


def masked_correlation(a, b, mask) -> float:
    """Pearson correlation of two maps over the voxels where ``mask`` is true."""
    x = np.asarray(a, dtype=np.float64)[mask]
    y = np.asarray(b, dtype=np.float64)[mask]
    return float(np.corrcoef(x, y)[0, 1])


def axis_angles_deg(a, b) -> np.ndarray:
    """Angles in degrees between axes (unit vectors, a direction and its opposite counted as one).

    Parameters
    ----------
    a : numpy.ndarray
        ``(n, 3)`` unit vectors.
    b : numpy.ndarray
        ``(m, 3)`` unit vectors.

    Returns
    -------
    numpy.ndarray
        ``(n, m)`` angles in [0, 90].
    """
    return np.rad2deg(np.arccos(np.clip(np.abs(np.asarray(a) @ np.asarray(b).T), 0.0, 1.0)))


def view_purity(directions, labels, threshold_deg: float = 15.0) -> float:
    """Fraction of particles within ``threshold_deg`` of their class's medoid true viewing direction.

    A view and its opposite count as one (2D classification aligns with mirrors). This is the
    ``purity15`` figure of the ISAC2 benchmark with the default threshold.

    Parameters
    ----------
    directions : numpy.ndarray
        ``(n, 3)`` true viewing directions (unit vectors).
    labels : numpy.ndarray
        ``(n,)`` class labels.
    threshold_deg : float
        Angular tolerance in degrees.

    Returns
    -------
    float
        In [0, 1].
    """
    directions, labels = np.asarray(directions, dtype=np.float64), np.asarray(labels)
    good = 0
    for k in np.unique(labels):
        v = directions[labels == k]
        medoid = v[np.argmin(axis_angles_deg(v, v).sum(1))]
        good += int((axis_angles_deg(v, medoid[None])[:, 0] <= threshold_deg).sum())
    return good / max(len(directions), 1)


def oracle_view_classes(directions, n_classes: int, *, seed: int = 0, iterations: int = 50) -> np.ndarray:
    """Cluster true viewing axes into ``n_classes`` by spherical k-means (the oracle of the ISAC2 benchmark).

    Parameters
    ----------
    directions : numpy.ndarray
        ``(n, 3)`` unit vectors; a direction and its opposite are the same axis.
    n_classes : int
        Number of clusters.
    seed : int
        Seed of the k-means++ start.
    iterations : int
        Lloyd iterations.

    Returns
    -------
    numpy.ndarray
        ``(n,)`` labels.
    """
    dirs = np.asarray(directions, dtype=np.float64)
    rng = np.random.default_rng(seed)
    centres = [dirs[rng.integers(len(dirs))]]
    for _ in range(1, n_classes):
        d = np.clip(1 - np.max(np.abs(dirs @ np.array(centres).T), axis=1), 0.0, None) + 1e-12
        centres.append(dirs[rng.choice(len(dirs), p=d / d.sum())])
    c = np.array(centres)
    for _ in range(iterations):
        labels = np.abs(dirs @ c.T).argmax(1)
        new = []
        for j in range(n_classes):
            v = dirs[labels == j]
            # principal axis of the members: the mean of axes with their signs ignored
            new.append(c[j] if len(v) == 0 else np.linalg.eigh(v.T @ v)[1][:, -1])
        c = np.array(new)
    return np.abs(dirs @ c.T).argmax(1)
