"""Shared builders for the io tests: random images and a table with every metadata group."""

from __future__ import annotations

import numpy as np
import pandas as pd


def random_images(rng, n=6, box=16):
    """``(n, box, box)`` float32 noise."""
    return rng.normal(size=(n, box, box)).astype(np.float32)


def full_table(rng, n=6):
    """A table with CTF, 3D pose, 2D alignment, classes, ground truth and a passthrough column."""
    return pd.DataFrame({
        "micrograph_name": [f"mic_{i % 2}.mrc" for i in range(n)],
        "coordinate_x_px": rng.integers(100, 3000, n).astype(float),
        "coordinate_y_px": rng.integers(100, 3000, n).astype(float),
        "defocus_u_A": rng.uniform(1.0e4, 3.0e4, n),
        "defocus_v_A": rng.uniform(1.0e4, 3.0e4, n),
        "defocus_angle_deg": rng.uniform(0, 180, n),
        "voltage_kV": 300.0,
        "cs_mm": 2.7,
        "amplitude_contrast": 0.1,
        "angle_rot_deg": rng.uniform(-179, 179, n),
        "angle_tilt_deg": rng.uniform(5, 175, n),
        "angle_psi_deg": rng.uniform(-179, 179, n),
        "origin_x_A": rng.normal(0, 3, n),
        "origin_y_A": rng.normal(0, 3, n),
        "align_alpha_deg": rng.uniform(-179, 179, n),
        "align_sx_px": rng.normal(0, 2, n),
        "align_sy_px": rng.normal(0, 2, n),
        "align_mirror": rng.integers(0, 2, n),
        "class_number": rng.integers(1, 4, n),
        "true_angle_rot_deg": rng.uniform(-179, 179, n),
        "true_conformation": rng.integers(0, 2, n),
        "rlnRandomSubset": rng.integers(1, 3, n),
    })


#: Tolerances of each column after a round trip through a format storing float32 or 8-digit text.
TOLERANCE = {
    "defocus_u_A": 0.01, "defocus_v_A": 0.01, "defocus_angle_deg": 1e-3,
    "angle_rot_deg": 1e-3, "angle_tilt_deg": 1e-3, "angle_psi_deg": 1e-3,
    "origin_x_A": 1e-4, "origin_y_A": 1e-4, "align_alpha_deg": 1e-3, "align_sx_px": 1e-4, "align_sy_px": 1e-4,
}


def angle_diff(a, b):
    """Absolute difference of angles in degrees, modulo 360."""
    d = np.mod(np.asarray(a, float) - np.asarray(b, float) + 180.0, 360.0) - 180.0
    return np.abs(d)


def assert_tables_match(got, expected, columns=None):
    """Compare the given columns of two tables with :data:`TOLERANCE` (angles modulo 360)."""
    for c in columns or expected.columns:
        assert c in got.columns, f"column {c} lost"
        if not pd.api.types.is_numeric_dtype(expected[c]):
            assert [str(v) for v in got[c]] == [str(v) for v in expected[c]], c
            continue
        tol = TOLERANCE.get(c, 1e-5)
        e = expected[c].to_numpy(float)
        g = got[c].to_numpy(float)
        diff = angle_diff(g, e) if c.endswith("_deg") and "angle" in c else np.abs(g - e)
        assert diff.max() <= tol, f"{c}: max difference {diff.max()}"


def open_files() -> list[str]:
    """Targets of this process's open file descriptors (Linux ``/proc/self/fd``; the listing's own is skipped)."""
    import os

    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            out.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return out
