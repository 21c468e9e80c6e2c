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
