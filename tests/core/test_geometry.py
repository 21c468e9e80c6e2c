"""Symmetry groups, random rotations, sphere sampling and exact angular neighbours."""

from __future__ import annotations

import numpy as np
import pytest

from isavar.conventions import euler_to_matrix, viewing_direction
from isavar.core.geometry import (
    fibonacci_directions,
    parse_symmetry,
    random_rotations,
    symmetry_angles,
    symmetry_expand,
    symmetry_matrices,
    viewing_directions,
)
from isavar.core.projection import project

GROUPS = {"c1": 1, "c2": 2, "c5": 5, "d1": 2, "d2": 4, "d3": 6, "d7": 14, "tet": 12, "oct": 24, "icos": 60}


def _find(mats, m, tol=1e-9):
    d = np.abs(mats - m).reshape(len(mats), -1).max(axis=1)
    hits = np.nonzero(d < tol)[0]
    return hits


@pytest.mark.parametrize("sym, order", GROUPS.items())
def test_symmetry_group_is_closed_group_of_right_order(sym, order):
    s = symmetry_matrices(sym)
    assert s.shape == (order, 3, 3)
    np.testing.assert_array_equal(s[0], np.eye(3))  # identity first
    np.testing.assert_allclose(s @ s.transpose(0, 2, 1), np.broadcast_to(np.eye(3), s.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(s), 1.0, atol=1e-12)
    # distinct elements
    for g in range(order):
        assert len(_find(s, s[g])) == 1
    # closed under products and inverses
    for g in range(order):
        assert len(_find(s, s[g].T)) == 1
        for h in range(order):
            assert len(_find(s, s[g] @ s[h])) == 1, (sym, g, h)


def test_symmetry_angle_tables_match_sphire_lists():
    np.testing.assert_allclose(symmetry_angles("c4")[:, 2], [0, 90, 180, 270])
    d3 = symmetry_angles("d3")
    # SPHIRE: (0, 180, (360 i / n + 180 (n mod 2)) mod 360) for i = n-1..0
    np.testing.assert_allclose(d3[3:], [[0, 180, 60], [0, 180, 300], [0, 180, 180]])
    tet = symmetry_angles("tet")
    np.testing.assert_allclose(tet[3], [0, np.degrees(np.arccos(-1 / 3)), 60])
    icos = symmetry_angles("icos")
    np.testing.assert_allclose(icos[5], [0, np.degrees(np.arctan(2)), 36])
    np.testing.assert_allclose(icos[30], [36, 180 - np.degrees(np.arctan(2)), 0])
    np.testing.assert_allclose(icos[-1], [0, 180, 288])
    oct_ = symmetry_angles("oct")
    np.testing.assert_allclose(oct_[4:8], [[0, 90, 0], [90, 90, 0], [180, 90, 0], [270, 90, 0]])


def test_cyclic_group_is_rotation_about_z():
    s = symmetry_matrices("c6")
    np.testing.assert_allclose(s[:, 2], np.broadcast_to([0, 0, 1], (6, 3)), atol=1e-15)
    np.testing.assert_allclose(s[1], euler_to_matrix(0, 0, 60), atol=1e-12)


@pytest.mark.parametrize("bad", ["c0", "x3", "d", "ico", "", "c-2"])
def test_bad_symmetry_names_raise(bad):
    with pytest.raises(ValueError):
        parse_symmetry(bad)


def test_symmetry_names_case_insensitive():
    assert parse_symmetry("ICOS") == ("icos", 60)
    assert parse_symmetry(" D4 ") == ("d", 8)


def test_random_rotations_are_uniform_proper_rotations(rng):
    n = 20000
    a = random_rotations(n, rng)
    np.testing.assert_allclose(a @ a.transpose(0, 2, 1), np.broadcast_to(np.eye(3), a.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(a), 1.0, atol=1e-12)
    # Haar measure: E[A] = 0 and E[A_ij^2] = 1/3 (each entry has sd ~ 0.3/sqrt(n) ~ 0.002)
    np.testing.assert_allclose(a.mean(axis=0), 0.0, atol=0.02)
    np.testing.assert_allclose((a**2).mean(axis=0), 1 / 3, atol=0.02)
    # viewing directions uniform: z uniform on [-1, 1]
    z = a[:, 2, 2]
    hist, _ = np.histogram(z, bins=10, range=(-1, 1))
    assert np.all(np.abs(hist - n / 10) < 6 * np.sqrt(n / 10))


def test_fibonacci_directions_are_unit_and_even():
    d = fibonacci_directions(500)
    np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0)
    np.testing.assert_allclose(d.mean(axis=0), 0.0, atol=0.01)
    cos = np.clip(d @ d.T, -1.0, 1.0)
    np.fill_diagonal(cos, -1.0)
    nn = np.degrees(np.arccos(cos.max(axis=1)))                 # angle to the nearest other direction
    # expected spacing ~ sqrt(4 pi / n) rad = 9.1 deg; a lattice has no clumps or holes
    assert nn.min() > 0.6 * np.degrees(np.sqrt(4 * np.pi / 500))
    assert nn.max() < 1.5 * np.degrees(np.sqrt(4 * np.pi / 500))


def test_viewing_directions_match_conventions(rng):
    rot, tilt, psi = rng.uniform(-180, 180, 10), rng.uniform(0, 180, 10), rng.uniform(-180, 180, 10)
    a = euler_to_matrix(rot, tilt, psi)
    np.testing.assert_allclose(viewing_directions(a), viewing_direction(rot, tilt), atol=1e-12)


def _symmetric_blob_volume(n, sym, rng, sigma=1.3):
    """Sum of Gaussians at S_g X_m for every group element: V(S X) = V(X) exactly."""
    z, y, x = np.mgrid[:n, :n, :n] - n // 2
    vol = np.zeros((n, n, n), np.float32)
    s = symmetry_matrices(sym)
    for _ in range(2):
        centre = rng.uniform(-5, 5, 3)
        amp = rng.uniform(0.5, 1.5)
        for g in s:
            c = g @ centre
            vol += amp * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * sigma**2))
    return vol


@pytest.mark.parametrize("sym", ["c4", "d3", "tet"])
def test_symmetry_expanded_orientations_project_symmetric_volume_identically(rng, sym):
    vol = _symmetric_blob_volume(24, sym, rng)
    a = random_rotations(3, rng)
    expanded = symmetry_expand(a, sym)
    nsym = len(symmetry_matrices(sym))
    assert expanded.shape == (3 * nsym, 3, 3)
    np.testing.assert_allclose(expanded[:3], a)  # identity block first
    np.testing.assert_allclose(expanded[3 * 1 + 2], a[2] @ symmetry_matrices(sym)[1])
    proj = project(vol, expanded)
    ref = np.repeat(proj[None, :3], nsym, axis=0).reshape(proj.shape)
    scale = np.abs(ref).max()
    # different orientations, same image (to Fourier-interpolation error, ~1% of the peak)
    assert np.abs(proj - ref).max() < 0.02 * scale
    # ... and the test can fail: an asymmetric volume gives different images
    asym = _symmetric_blob_volume(24, "c1", rng)
    p2 = project(asym, expanded)
    assert np.abs(p2[3:6] - p2[:3]).max() > 0.1 * np.abs(p2).max()
