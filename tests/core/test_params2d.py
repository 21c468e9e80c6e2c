"""2-D parameter algebra against matrix products and the closed forms of spec isac2.md §0.1."""

from __future__ import annotations

import numpy as np
import pytest

from isavar.core.params2d import (
    Params2D,
    apply_to_points,
    compose,
    from_matrix,
    identity,
    inverse,
    particle_centre,
    rotation_matrix,
    to_matrix,
)


def _random(rng, n):
    return Params2D(rng.uniform(-180, 180, n), rng.normal(0, 3, n), rng.normal(0, 3, n), rng.integers(0, 2, n))


def _homog(mat):
    out = np.zeros(mat.shape[:-2] + (3, 3))
    out[..., :2, :] = mat
    out[..., 2, 2] = 1.0
    return out


def _angle_diff(a, b):
    return np.abs((np.asarray(a) - np.asarray(b) + 180.0) % 360.0 - 180.0)


def test_rotation_matrix_sign():
    r = rotation_matrix(90.0)
    np.testing.assert_allclose(r, [[0, 1], [-1, 0]], atol=1e-15)


def test_matrix_definition():
    m = to_matrix((30.0, 1.0, 2.0, 1))
    a = np.deg2rad(30.0)
    expected_lin = np.diag([-1.0, 1.0]) @ np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    np.testing.assert_allclose(m[:, :2], expected_lin)
    np.testing.assert_allclose(m[:, 2], [-1.0, 2.0])


def test_compose_matches_matrix_product(rng):
    p1, p2 = _random(rng, 500), _random(rng, 500)
    prod = (_homog(to_matrix(p2)) @ _homog(to_matrix(p1)))[..., :2, :]
    np.testing.assert_allclose(to_matrix(compose(p1, p2)), prod, atol=1e-12)


def test_compose_closed_forms(rng):
    p1, p2 = _random(rng, 300), _random(rng, 300)
    c = compose(p1, p2)
    a2 = np.deg2rad(p2.alpha)
    t1 = np.stack([p1.sx, p1.sy], -1)
    t2 = np.stack([p2.sx, p2.sy], -1)
    r_pos = np.stack([np.stack([np.cos(a2), np.sin(a2)], -1), np.stack([-np.sin(a2), np.cos(a2)], -1)], -2)
    r_neg = np.transpose(r_pos, (0, 2, 1))
    m1 = p1.mirror == 1
    t_expected = np.where(
        m1[:, None],
        np.einsum("nij,nj->ni", r_neg, t1) + t2 * [-1, 1],
        np.einsum("nij,nj->ni", r_pos, t1) + t2,
    )
    alpha_expected = np.where(m1, p1.alpha - p2.alpha, p1.alpha + p2.alpha)
    mirror_expected = np.where(m1, 1 - p2.mirror, p2.mirror)
    assert _angle_diff(c.alpha, alpha_expected).max() < 1e-9
    np.testing.assert_allclose(np.stack([c.sx, c.sy], -1), t_expected, atol=1e-12)
    np.testing.assert_array_equal(c.mirror, mirror_expected)


def test_inverse_closed_forms(rng):
    p = _random(rng, 200)
    inv = inverse(p)
    a = np.deg2rad(p.alpha)
    rx = np.cos(a) * p.sx - np.sin(a) * p.sy  # R(-a) t
    ry = np.sin(a) * p.sx + np.cos(a) * p.sy
    m = p.mirror == 1
    assert _angle_diff(inv.alpha, np.where(m, p.alpha, -p.alpha)).max() < 1e-9
    np.testing.assert_allclose(inv.sx, np.where(m, rx, -rx), atol=1e-12)
    np.testing.assert_allclose(inv.sy, -ry, atol=1e-12)
    np.testing.assert_array_equal(inv.mirror, p.mirror)


def test_inverse_composes_to_identity(rng):
    p = _random(rng, 200)
    for c in (compose(p, inverse(p)), compose(inverse(p), p)):
        assert _angle_diff(c.alpha, 0.0).max() < 1e-9
        np.testing.assert_allclose(c.sx, 0, atol=1e-12)
        np.testing.assert_allclose(c.sy, 0, atol=1e-12)
        assert not c.mirror.any()


def test_from_matrix_round_trip(rng):
    p = _random(rng, 100)
    q = from_matrix(to_matrix(p))
    assert _angle_diff(q.alpha, p.alpha).max() < 1e-9
    np.testing.assert_allclose(q.sx, p.sx, atol=1e-12)
    np.testing.assert_array_equal(q.mirror, p.mirror)


def test_angles_wrapped_and_scalars_stay_scalars():
    c = compose((170.0, 0.0, 0.0, 0), (20.0, 0.0, 0.0, 0))
    assert isinstance(c.alpha, float) and c.alpha == pytest.approx(-170.0)
    assert compose((90.0, 0, 0, 0), (90.0, 0, 0, 0)).alpha == pytest.approx(180.0)


def test_apply_to_points_and_particle_centre(rng):
    p = _random(rng, 50)
    centre = particle_centre(p)
    mapped = apply_to_points(p, centre)
    np.testing.assert_allclose(mapped, 0.0, atol=1e-12)
    q = rng.normal(size=(50, 2))
    back = apply_to_points(inverse(p), apply_to_points(p, q))
    np.testing.assert_allclose(back, q, atol=1e-12)


def test_identity_and_array_conversion():
    ident = identity(3)
    np.testing.assert_array_equal(Params2D(*ident).to_array(), np.zeros((3, 4)))
    p = Params2D.from_array([[10.0, 1.0, 2.0, 1.0]])
    assert p.mirror.dtype == np.int64 and p.mirror[0] == 1


def test_bad_inputs():
    with pytest.raises(TypeError):
        compose(np.zeros((4, 4)), identity())
    with pytest.raises(ValueError):
        inverse((0.0, 0.0, 0.0, 2))
