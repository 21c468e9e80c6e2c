"""Hypothesis properties of the core 2-D maths: group laws, round trips, equivariance, invariances."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from isavar.core.ctf import ctf_2d, phase_flip
from isavar.core.fft import fourier_shift, pad, resample_fourier, window
from isavar.core.params2d import apply_to_points, compose, from_matrix, inverse, to_matrix
from isavar.core.stats import RunningMeanVariance, frc, rotational_average
from isavar.core.transform2d import transform_images

angle = st.floats(-180.0, 180.0, allow_nan=False)
shift = st.floats(-20.0, 20.0, allow_nan=False)
mirror = st.integers(0, 1)
params = st.tuples(angle, shift, shift, mirror)
seeds = st.integers(0, 2**32 - 1)
FAST = settings(max_examples=40, deadline=None)


def _angle_close(a, b, tol=1e-8):
    return abs((a - b + 180.0) % 360.0 - 180.0) < tol


def _homog(p):
    m = np.eye(3)
    m[:2] = to_matrix(p)
    return m


@FAST
@given(params, params)
def test_compose_is_matrix_product(p1, p2):
    np.testing.assert_allclose(_homog(compose(p1, p2)), _homog(p2) @ _homog(p1), atol=1e-9)


@FAST
@given(params, params)
def test_compose_closed_forms(p1, p2):
    """Spec isac2.md §0.1: m1 = 0 -> (a1 + a2, R(a2) t1 + t2, m2); m1 = 1 -> (a1 - a2, R(-a2) t1 + M t2, 1 - m2)."""
    a1, x1, y1, m1 = p1
    a2, x2, y2, m2 = p2
    c = compose(p1, p2)
    r = np.deg2rad(a2)
    if m1 == 0:
        alpha, t, m = a1 + a2, np.array([[np.cos(r), np.sin(r)], [-np.sin(r), np.cos(r)]]) @ [x1, y1] + [x2, y2], m2
    else:
        alpha, t, m = a1 - a2, np.array([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]]) @ [x1, y1] + [-x2, y2], 1 - m2
    assert _angle_close(c.alpha, alpha)
    np.testing.assert_allclose([c.sx, c.sy], t, atol=1e-9)
    assert c.mirror == m
    assert -180.0 < c.alpha <= 180.0


@FAST
@given(params, params, params)
def test_compose_is_associative(p1, p2, p3):
    left = compose(compose(p1, p2), p3)
    right = compose(p1, compose(p2, p3))
    assert _angle_close(left.alpha, right.alpha)
    np.testing.assert_allclose([left.sx, left.sy], [right.sx, right.sy], atol=1e-9)
    assert left.mirror == right.mirror


@FAST
@given(params)
def test_inverse_is_two_sided(p):
    for c in (compose(p, inverse(p)), compose(inverse(p), p)):
        assert _angle_close(c.alpha, 0.0)
        np.testing.assert_allclose([c.sx, c.sy], 0.0, atol=1e-9)
        assert c.mirror == 0
    back = inverse(inverse(p))
    assert _angle_close(back.alpha, p[0]) and back.mirror == p[3]


@FAST
@given(params, st.tuples(shift, shift))
def test_matrix_round_trip_and_point_map(p, q):
    r = from_matrix(to_matrix(p))
    assert _angle_close(r.alpha, p[0])
    np.testing.assert_allclose(apply_to_points(r, q), apply_to_points(p, q), atol=1e-9)


@FAST
@given(seeds, st.sampled_from([15, 16]), st.tuples(shift, shift), st.tuples(shift, shift))
def test_fourier_shift_is_additive_on_bandlimited_images(seed, n, s1, s2):
    rng = np.random.default_rng(seed)
    spec = np.fft.fft2(rng.normal(size=(n, n)))
    if n % 2 == 0:
        spec[n // 2, :] = 0
        spec[:, n // 2] = 0
    img = np.fft.ifft2(spec).real.astype(np.float32)
    twice = fourier_shift(fourier_shift(img, s1), s2)
    once = fourier_shift(img, np.add(s1, s2))
    np.testing.assert_allclose(twice, once, atol=1e-4)


@FAST
@given(seeds, st.integers(6, 17), st.integers(0, 9))
def test_resample_pad_then_crop_is_identity(seed, n, extra):
    img = np.random.default_rng(seed).normal(size=(n, n)).astype(np.float32)
    back = resample_fourier(resample_fourier(img, n + extra), n)
    np.testing.assert_allclose(back, img, atol=1e-4)


@FAST
@given(seeds, st.integers(4, 17), st.integers(0, 8))
def test_pad_then_window_is_identity(seed, n, extra):
    img = np.random.default_rng(seed).normal(size=(n, n)).astype(np.float32)
    np.testing.assert_array_equal(window(pad(img, n + extra, value=1.5), n), img)


@FAST
@given(seeds, st.sampled_from([16, 17]), st.floats(5000, 40000), st.floats(5000, 40000), angle)
def test_phase_flip_is_an_involution(seed, n, u, v, ang):
    img = np.random.default_rng(seed).normal(size=(n, n)).astype(np.float32)
    c = ctf_2d(n, 1.2, defocus_u_A=u, defocus_v_A=v, defocus_angle_deg=ang, voltage_kV=300, cs_mm=2.7,
               amplitude_contrast=0.1)
    np.testing.assert_allclose(phase_flip(phase_flip(img, c), c), img, atol=1e-4)


@FAST
@given(seeds, st.sampled_from([15, 16]), st.integers(-3, 3), st.integers(-3, 3), st.integers(-3, 3), mirror)
def test_integer_transforms_are_permutations(seed, n, quarter, dx, dy, m):
    """Quarter-turn rotations with integer shifts are exact for every interpolation (periodic border)."""
    img = np.random.default_rng(seed).normal(size=(n, n)).astype(np.float32)
    outs = [transform_images(img, 90.0 * quarter, dx, dy, m, interpolation=i, border="wrap")
            for i in ("linear", "quadratic", "cubic", "fourier")]
    for out in outs[1:]:
        np.testing.assert_allclose(out, outs[0], atol=2e-4)
    np.testing.assert_allclose(np.sort(outs[0].ravel()), np.sort(img.ravel()), atol=2e-4)


@FAST
@given(seeds, angle)
def test_rotational_average_is_rotation_invariant(seed, a):
    """A rotationally symmetric image is unchanged (inside the box) by rotation: same rotational average."""
    n = 33
    y, x = np.mgrid[:n, :n] - n // 2
    r2 = x**2 + y**2
    img = np.exp(-r2 / 30.0).astype(np.float32)
    rot = transform_images(img, a, 0.0, 0.0, 0, interpolation="cubic", border="zero")
    np.testing.assert_allclose(rotational_average(rot)[:12], rotational_average(img)[:12], atol=2e-3)


@FAST
@given(seeds)
def test_frc_is_symmetric_and_bounded(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(2, 16, 16))
    np.testing.assert_allclose(frc(a, b), frc(b, a), atol=1e-12)
    assert np.all(np.abs(frc(a, b)) <= 1 + 1e-12)


@FAST
@given(seeds, st.lists(st.integers(1, 12), min_size=1, max_size=5))
def test_running_variance_merge_is_order_independent(seed, sizes):
    rng = np.random.default_rng(seed)
    chunks = [rng.normal(3.0, 2.0, size=(k, 2)) for k in sizes]
    forward = RunningMeanVariance((2,))
    for c in chunks:
        forward.update(c)
    backward = RunningMeanVariance((2,))
    for c in reversed(chunks):
        part = RunningMeanVariance((2,))
        part.update(c)
        backward.merge(part)
    data = np.concatenate(chunks)
    np.testing.assert_allclose(forward.mean, data.mean(axis=0), atol=1e-10)
    np.testing.assert_allclose(backward.m2, forward.m2, rtol=1e-9, atol=1e-9)


@FAST
@given(seeds)
def test_constant_stack_has_zero_variance(seed):
    value = np.random.default_rng(seed).normal()
    acc = RunningMeanVariance((3, 3))
    acc.update(np.full((7, 3, 3), value))
    np.testing.assert_allclose(acc.variance(), 0.0, atol=1e-20)
