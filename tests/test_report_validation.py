"""Ground-truth comparison helpers (purity of views, oracle clustering, mixture maps)."""

from __future__ import annotations

import numpy as np
import pytest

from isavar.report.validation import (
    axis_angles_deg,
    masked_correlation,
    mixture_std_map,
    oracle_view_classes,
    sphere_mask,
    view_purity,
)


def _cap(rng, axis, n, spread_deg):
    v = np.asarray(axis, float) + rng.normal(0, np.deg2rad(spread_deg), (n, 3))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_view_purity_counts_particles_near_the_medoid(rng):
    a = _cap(rng, [0, 0, 1], 50, 2)
    b = _cap(rng, [1, 0, 0], 50, 2)
    dirs = np.concatenate([a, -b])          # opposite directions are the same view
    assert view_purity(dirs, np.repeat([0, 1], 50)) == 1.0
    # a class mixing the two views: only its majority half is within 15 degrees of the medoid
    mixed = np.concatenate([a[:30], b[:20]])
    assert view_purity(mixed, np.zeros(50, int)) == pytest.approx(0.6)


def test_oracle_recovers_planted_views(rng):
    axes = np.eye(3)
    dirs = np.concatenate([_cap(rng, ax, 40, 3) * rng.choice([-1, 1], (40, 1)) for ax in axes])
    labels = oracle_view_classes(dirs, 3)
    assert view_purity(dirs, labels) == 1.0
    assert len(np.unique(labels)) == 3
    assert axis_angles_deg(axes[:1], -axes[:1])[0, 0] == pytest.approx(0.0, abs=1e-6)


def test_mixture_std_map_two_states():
    v1, v2 = np.zeros((4, 4, 4)), np.zeros((4, 4, 4))
    v1[2, 2, 2] = 2.0
    std = mixture_std_map([v1, v2], [0.3, 0.7])
    assert std[2, 2, 2] == pytest.approx(np.sqrt(0.21) * 2.0, rel=1e-6)
    assert std.sum() == pytest.approx(std[2, 2, 2])
    m = sphere_mask(4, 1.0)
    assert m[2, 2, 2] and m.sum() == 7
    assert masked_correlation(std, std * 3 + 1, m) == pytest.approx(1.0)
