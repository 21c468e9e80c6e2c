"""Result of a 3D variability run (arrays only; writing is the workflow's job)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class VariabilityResult:
    """Volumes and bookkeeping of a 3D variability analysis.

    Attributes
    ----------
    var3d : numpy.ndarray
        ``(N, N, N)`` float32 reconstruction of the per-group 2D standard
        deviation maps (or variances, see ``var3d_stat``), on the input grid, masked.
    ave3d : numpy.ndarray or None
        ``(N, N, N)`` reconstruction of the group means (None in ``--VAR``/``--SND`` mode).
    pixel_size_A : float
        Voxel size (the input pixel size).
    working_box : int
        Box of the analysis grid (smaller than N when decimated).
    n_particles : int
        Input particles.
    n_groups : int
        Groups analysed (one per particle; 0 in ``--VAR`` mode).
    group_angle_deg : numpy.ndarray
        ``(n_groups,)`` angular radius of each group (largest member distance),
        in input order; empty in ``--VAR``/``--SND`` mode.
    group_mean_var : numpy.ndarray
        ``(n_groups,)`` mean of each group's 2D variance inside the disc, input order.
    timings_s : dict
        Wall time per stage.
    """

    var3d: np.ndarray
    ave3d: np.ndarray | None
    pixel_size_A: float
    working_box: int
    n_particles: int
    n_groups: int
    group_angle_deg: np.ndarray = field(default_factory=lambda: np.zeros(0))
    group_mean_var: np.ndarray = field(default_factory=lambda: np.zeros(0))
    timings_s: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """JSON-friendly summary (no volumes)."""
        out = {
            "n_particles": self.n_particles,
            "n_groups": self.n_groups,
            "box": int(self.var3d.shape[0]),
            "working_box": self.working_box,
            "pixel_size_A": self.pixel_size_A,
            "var3d": _stats(self.var3d),
            "timings_s": {k: round(float(v), 3) for k, v in self.timings_s.items()},
        }
        if self.ave3d is not None:
            out["ave3d"] = _stats(self.ave3d)
        if self.group_angle_deg.size:
            a = self.group_angle_deg
            out["group_radius_deg"] = {"min": float(a.min()), "median": float(np.median(a)), "max": float(a.max())}
        return out


def _stats(v: np.ndarray) -> dict:
    return {"min": float(v.min()), "max": float(v.max()), "mean": float(v.mean()), "std": float(v.std())}
