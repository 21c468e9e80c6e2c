"""transform_images: planted rotations/shifts/mirrors, border modes, interpolation accuracy."""

from __future__ import annotations

import numpy as np
import pytest

from isavar.core.params2d import Params2D, apply_to_points, compose, inverse
from isavar.core.transform2d import mirror_images, transform_images

INTERPOLATIONS = ["linear", "quadratic", "cubic", "fourier"]
# Max error of one transform of a Gaussian blob (sigma >= 2 px), bounded by each method's order:
# bilinear ~ h^2 f''/8, quadratic ~ h^3 f''', cubic spline ~ h^4, Fourier exact for band-limited input.
ONE_PASS_TOL = {"linear": 0.08, "quadratic": 0.04, "cubic": 0.005, "fourier": 1e-4}


def _blob(n, cx, cy, sigma):
    y, x = np.mgrid[:n, :n] - n // 2
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2)).astype(np.float32)


def _phantom(n):
    return _blob(n, 5, -3, 3.0) + 0.7 * _blob(n, -8, 6, 4.0) + 0.5 * _blob(n, 0, 12, 2.5)


def test_planted_direction_single_pixel():
    img = np.zeros((5, 5), np.float32)
    img[2, 3] = 1.0  # content at q = (1, 0)
    out = transform_images(img, 90.0, 0.0, 0.0, 0)
    assert np.argwhere(out > 0.5).tolist() == [[1, 2]]  # R(90) (1, 0) = (0, -1)
    out = transform_images(img, 0.0, 1.0, 1.0, 0)
    assert np.argwhere(out > 0.5).tolist() == [[3, 4]]
    out = transform_images(img, 0.0, 0.0, 0.0, 1)
    assert np.argwhere(out > 0.5).tolist() == [[2, 1]]


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
@pytest.mark.parametrize("n", [48, 49])
def test_content_moves_to_T_of_q(interpolation, n):
    params = Params2D(np.array([37.0, -120.0, 200.0]), np.array([2.5, -1.0, 0.3]), np.array([-1.5, 3.2, 0.0]),
                      np.array([1, 0, 1]))
    centre = np.array([6.0, -4.0])
    img = np.repeat(_blob(n, *centre, 2.5)[None], 3, axis=0)
    out = transform_images(img, *params, interpolation=interpolation)
    for i in range(3):
        q = apply_to_points(Params2D(*(f[i] for f in params)), centre)
        np.testing.assert_allclose(out[i], _blob(n, q[0], q[1], 2.5), atol=ONE_PASS_TOL[interpolation])


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_round_trip_inside_particle_circle(rng, interpolation):
    n = 64
    img = _phantom(n)
    params = Params2D(rng.uniform(-180, 180, 6), rng.uniform(-3, 3, 6), rng.uniform(-3, 3, 6), rng.integers(0, 2, 6))
    stack = np.repeat(img[None], 6, axis=0)
    there = transform_images(stack, *params, interpolation=interpolation)
    back = transform_images(there, *inverse(params), interpolation=interpolation)
    y, x = np.mgrid[:n, :n] - n // 2
    inside = x**2 + y**2 <= 20**2
    assert np.abs(back - img)[:, inside].max() < 2 * ONE_PASS_TOL[interpolation]


def test_composition_matches_sequential_application():
    n = 64
    img = _phantom(n)
    p1, p2 = (25.0, 1.5, -2.0, 1), (-70.0, -0.5, 1.0, 0)
    seq = transform_images(transform_images(img, *p1, interpolation="fourier"), *p2, interpolation="fourier")
    once = transform_images(img, *compose(p1, p2), interpolation="fourier")
    y, x = np.mgrid[:n, :n] - n // 2
    inside = x**2 + y**2 <= 22**2
    assert np.abs(seq - once)[inside].max() < 1e-3


def test_background_border_keeps_input_pixel(rng):
    img = rng.normal(size=(32, 32)).astype(np.float32)
    out = transform_images(img, 0.0, 5.0, 0.0, 0, border="background")
    np.testing.assert_array_equal(out[:, :5], img[:, :5])  # sources x < 0
    np.testing.assert_allclose(out[:, 5:], img[:, :-5], atol=1e-6)
    out0 = transform_images(img, 0.0, 5.0, 0.0, 0, border="zero")
    assert not out0[:, :5].any()
    wrapped = transform_images(img, 0.0, 5.0, 0.0, 0, border="wrap")
    np.testing.assert_allclose(wrapped, np.roll(img, 5, axis=1), atol=1e-6)


@pytest.mark.parametrize("n", [6, 7])
def test_mirror_about_centre_column(n):
    img = np.arange(n * n, dtype=np.float32).reshape(n, n)
    out = mirror_images(img)
    c = n // 2
    for ix in range(n):
        np.testing.assert_array_equal(out[:, ix], img[:, (2 * c - ix) % n])
    np.testing.assert_array_equal(mirror_images(out), img)
    np.testing.assert_array_equal(transform_images(img, 0.0, 0.0, 0.0, 1), out)


def test_quadratic_matches_spider_formula_pointwise(rng):
    """Half-pixel shift: quadri = bilinear + second-difference corrections (spec §0.2)."""
    img = rng.normal(size=(9, 9)).astype(np.float32)
    out = transform_images(img, 0.0, 0.5, 0.0, 0, interpolation="quadratic", border="wrap")
    # output (iy, ix) samples source x = ix - 0.5: base i = ix - 1, dx = 0.5
    i = (np.arange(9) - 1) % 9
    f0, fp, fm = img[:, i], img[:, (i + 1) % 9], img[:, (i - 1) % 9]
    expected = f0 + 0.5 * (fp - f0) + 0.5 * (0.5 - 1) * (fp - 2 * f0 + fm) / 2
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_fourier_rotation_by_quarter_turns_is_exact(rng):
    img = rng.normal(size=(16, 16)).astype(np.float32)
    out = transform_images(img, -90.0, 0.0, 0.0, 0, interpolation="fourier", border="wrap")
    lin = transform_images(img, -90.0, 0.0, 0.0, 0, interpolation="linear", border="wrap")
    np.testing.assert_allclose(out, lin, atol=1e-5)


def test_validation_errors():
    img = np.zeros((2, 8, 8), np.float32)
    with pytest.raises(ValueError):
        transform_images(img, 0, 0, 0, 0, interpolation="nearest")
    with pytest.raises(ValueError):
        transform_images(img, [0, 1, 2], 0, 0, 0)
    with pytest.raises(ValueError):
        transform_images(img, 0, 0, 0, 2)
    with pytest.raises(ValueError):
        transform_images(np.zeros((8, 9)), 10, 0, 0, 0, interpolation="fourier")


def test_chunking_does_not_change_result(rng):
    img = rng.normal(size=(5, 16, 16)).astype(np.float32)
    a = rng.uniform(-180, 180, 5)
    full = transform_images(img, a, 0.5, -0.5, [0, 1, 0, 1, 0], interpolation="quadratic")
    chunked = transform_images(img, a, 0.5, -0.5, [0, 1, 0, 1, 0], interpolation="quadratic", chunk_size=2)
    np.testing.assert_array_equal(full, chunked)
    assert full.dtype == np.float32


@pytest.mark.parametrize("interpolation", ["linear", "quadratic"])
@pytest.mark.parametrize("border", ["background", "zero", "wrap"])
@pytest.mark.parametrize("shape", [(7, 16, 16), (5, 15, 15), (3, 12, 17)])
def test_compiled_transform_equals_the_numpy_formulation(rng, monkeypatch, interpolation, border, shape):
    """The compiled linear and quadratic transforms give the NumPy formulations' numbers bit for bit."""
    import isavar.core.transform2d as t2d

    n, ny, nx = shape
    img = rng.normal(size=shape)                         # float64 input: converted as the NumPy path does
    alpha = np.r_[0.0, 90.0, -180.0, rng.uniform(-720, 720, n - 3)]
    sx = np.r_[0.0, 0.5, rng.uniform(-1.5 * nx, 1.5 * nx, n - 2)]  # beyond the box: wrapped, borders hit
    sy = np.r_[0.0, -3.25, rng.normal(0, 2, n - 2)]
    mirror = rng.integers(0, 2, n)
    compiled = transform_images(img, alpha, sx, sy, mirror, interpolation=interpolation, border=border)
    monkeypatch.setattr(t2d, "USE_KERNELS", False)
    reference = transform_images(img, alpha, sx, sy, mirror, interpolation=interpolation, border=border)
    assert compiled.dtype == np.float32 and compiled.shape == shape
    np.testing.assert_array_equal(compiled, reference)
    one = transform_images(img[0], 33.0, 1.25, -0.75, 1, interpolation=interpolation, border=border)
    monkeypatch.setattr(t2d, "USE_KERNELS", True)
    np.testing.assert_array_equal(transform_images(img[0], 33.0, 1.25, -0.75, 1, interpolation=interpolation,
                                                  border=border), one)
