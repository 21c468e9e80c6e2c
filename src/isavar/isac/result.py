"""The result of an ISAC2 run (plain arrays; writing them is the workflow's job)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Isac2Result:
    """Class averages, memberships and alignment parameters of an ISAC2 run.

    Attributes
    ----------
    averages : ndarray, (C, T, T) float32
        Accepted class averages at the working scale, in order of acceptance
        (SPHIRE ``class_averages.hdf``).
    members : list of ndarray
        Absolute (0-based input) indices of each class's stable members, sorted.
    pixel_errors : ndarray, (C,)
        RMS pixel error of each class (working pixels, before pruning).
    origin : ndarray, (C, 2) int
        (main iteration, generation) that produced each class.
    params : ndarray, (N, 4)
        ``[alpha, sx, sy, mirror]`` of every input image at the working scale
        (SPHIRE ``all_parameters.txt``; mirror -1 = never accounted).
    prealign_shifts : ndarray, (N, 2)
        Pre-alignment centring shifts in original pixels (``initial2Dparams.txt``).
    shrink : float
        Working pixels per original pixel.
    order : ndarray, (C,) int or None
        Ordering of the averages (position -> class index), None if skipped.
    order_params : ndarray, (C, 4) or None
        Rotation/mirror bringing each average (by class index) into the ordered frame.
    history : list of dict
        One entry per generation (sizes, good classes, ...).
    """

    averages: np.ndarray
    members: list
    pixel_errors: np.ndarray
    origin: np.ndarray
    params: np.ndarray
    prealign_shifts: np.ndarray
    shrink: float
    order: np.ndarray | None = None
    order_params: np.ndarray | None = None
    history: list = field(default_factory=list)

    @property
    def n_classes(self) -> int:
        """Number of accepted classes."""
        return len(self.members)

    @property
    def accounted(self) -> np.ndarray:
        """Sorted indices of the images in accepted classes."""
        if not self.members:
            return np.zeros(0, np.int64)
        return np.unique(np.concatenate(self.members))

    def class_of(self, n_total: int) -> np.ndarray:
        """Class index (0-based, acceptance order) of each image; -1 if unaccounted."""
        out = np.full(n_total, -1, np.int64)
        for k, m in enumerate(self.members):
            out[m] = k
        return out
