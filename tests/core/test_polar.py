"""Ring geometry, polar resampling and the rotational correlation (spec isac2 §3, §4.1-§4.6; T3)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import map_coordinates

from isavar.core.polar import (
    normalize_rings,
    polar_grid,
    polar_to_image,
    polar_transform,
    ring_spectra,
    ring_statistics,
    rings_from_spectra,
    rotational_correlation,
)

GRID = polar_grid(1, 29)


def test_default_ring_geometry_matches_numrinit():
    expected = [8, 16, 32, 32, 32] + [64] * 5 + [128] * 10 + [256] * 9
    assert GRID.n_samples.tolist() == expected
    assert GRID.lcirc == 4024 and GRID.maxrin == 256
    assert GRID.offsets[0] == 0 and GRID.offsets[-1] == 4024
    r, n = GRID.radii, GRID.n_samples
    np.testing.assert_allclose(GRID.weights, r * (2 * np.pi / n) * (256 / n))
    # n_r is the smallest power of two strictly greater than round(2 pi r)
    jp = np.floor(2 * np.pi * r + 0.5)
    assert np.all(n > jp) and np.all(n // 2 <= jp)


def test_half_mode_and_ring_step():
    g = polar_grid(2, 10, 2, mode="H")
    assert g.radii.tolist() == [2, 4, 6, 8, 10]
    jp = np.floor(np.pi * g.radii + 0.5)
    assert np.all(g.n_samples > jp) and np.all(g.n_samples // 2 <= jp)
    with pytest.raises(ValueError):
        polar_grid(0, 5)
    with pytest.raises(ValueError):
        polar_grid(1, 5, mode="X")


def test_polar_transform_is_bilinear_at_the_documented_points(rng):
    images = rng.standard_normal((3, 64, 64)).astype(np.float32)
    grid = polar_grid(1, 25)
    shifts = np.array([[0.0, 0.0], [0.37, -1.62], [2.0, 1.0]])
    polar = polar_transform(images, grid, shifts=shifts)
    assert polar.shape == (3, 3, grid.lcirc) and polar.dtype == np.float32
    for i in range(3):
        for k, (dx, dy) in enumerate(shifts):
            # x = cx + r sin(phi), y = cy + r cos(phi): column = x, row = y
            want = map_coordinates(images[i].astype(np.float64),
                                   [32 + dy + grid.sample_dy, 32 + dx + grid.sample_dx], order=1)
            np.testing.assert_allclose(polar[i, k], want, atol=2e-5)
    # per-image shifts and the unshifted form agree with the common-shift form
    per_image = polar_transform(images, grid, shifts=np.broadcast_to(shifts, (3, 3, 2)))
    np.testing.assert_array_equal(per_image, polar)
    np.testing.assert_array_equal(polar_transform(images, grid), polar[:, 0])
    np.testing.assert_array_equal(polar_transform(images[1], grid), polar[1, 0])


def test_polar_samples_of_a_linear_ramp_are_exact():
    # bilinear interpolation reproduces a linear function exactly: planted analytic truth
    n = 48
    y, x = np.mgrid[:n, :n].astype(np.float64)
    image = (0.5 * x - 0.25 * y + 3.0).astype(np.float32)
    grid = polar_grid(1, 20)
    polar = polar_transform(image, grid, shifts=[[1.3, -0.6]])[0]
    cx, cy = n // 2 + 1.3, n // 2 - 0.6
    want = 0.5 * (cx + grid.sample_dx) - 0.25 * (cy + grid.sample_dy) + 3.0
    np.testing.assert_allclose(polar, want, atol=1e-4)
    # ring r, sample j lies at angle 2 pi j / n_r from +y towards +x
    i = 7
    r, n_r, o = grid.radii[i], grid.n_samples[i], grid.offsets[i]
    j = n_r // 4                                              # phi = 90 deg: the point (cx + r, cy)
    np.testing.assert_allclose(polar[o + j], 0.5 * (cx + r) - 0.25 * cy + 3.0, atol=1e-4)


def test_ring_too_large_for_the_image_is_rejected():
    with pytest.raises(ValueError, match="does not fit"):
        polar_transform(np.zeros((40, 40), np.float32), polar_grid(1, 20))
    with pytest.raises(ValueError, match="square"):
        polar_transform(np.zeros((40, 42), np.float32), polar_grid(1, 10))


def test_autocorrelation_normalisation_T3(rng):
    """T3: for image = reference the peak is at 0 and equals sum_r r (2 pi / n_r) sum_j a_r(phi_j)^2."""
    image = rng.standard_normal((76, 76)).astype(np.float32)
    a = polar_transform(image, GRID).astype(np.float64)
    c, c_m = rotational_correlation(a, a, GRID)
    expected = np.sum(GRID.sample_weights * a * a)
    assert np.argmax(c) == 0
    np.testing.assert_allclose(c[0], expected, rtol=1e-5)
    assert c_m.max() < c[0]


def _direct_curves(a, b, grid, k):
    """Straight and mirrored correlation at alpha_k straight from the definition (spec §4.4)."""
    cs = cm = 0.0
    for i in range(grid.n_rings):
        n_r, o, r = grid.n_samples[i], grid.offsets[i], grid.radii[i]
        step = k * n_r / grid.maxrin                          # alpha_k in samples of this ring
        assert float(step).is_integer()
        step = int(step)
        ar, br = a[o:o + n_r], b[o:o + n_r]
        j = np.arange(n_r)
        cs += r * 2 * np.pi / n_r * np.sum(ar * br[(j - step) % n_r])
        cm += r * 2 * np.pi / n_r * np.sum(ar * br[(-j - step) % n_r])
    return cs, cm


def test_rotational_correlation_matches_the_definition(rng):
    grid = polar_grid(1, 12)                                   # n_r = 8 .. 128, maxrin 128
    a = rng.standard_normal(grid.lcirc)
    b = rng.standard_normal(grid.lcirc)
    c, c_m = rotational_correlation(b, a, grid)
    assert c.shape == (grid.maxrin,)
    # at angles that are whole samples of every ring the trigonometric interpolation is exact
    for k in range(0, grid.maxrin, grid.maxrin // 8):
        cs, cm = _direct_curves(a, b, grid, k)
        np.testing.assert_allclose(c[k], cs, atol=1e-5 * np.abs(c).max())
        np.testing.assert_allclose(c_m[k], cm, atol=1e-5 * np.abs(c_m).max())
    # a single ring of length maxrin is exact at every k
    one = polar_grid(21, 21)
    a1 = rng.standard_normal(one.lcirc)
    b1 = rng.standard_normal(one.lcirc)
    c1, cm1 = rotational_correlation(b1, a1, one)
    tol = 1e-5 * np.abs(c1).max()                             # float32 spectra
    for k in range(one.maxrin):
        cs, cm = _direct_curves(a1, b1, one, k)
        assert c1[k] == pytest.approx(cs, abs=tol)
        assert cm1[k] == pytest.approx(cm, abs=tol)


@settings(max_examples=25, deadline=None)
@given(k8=st.integers(0, 7), mirror=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_rotating_the_rings_moves_the_peak(k8, mirror, seed):
    """Equivariance: rotating the image by alpha (content at phi -> phi + alpha) puts the peak at alpha."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(GRID.lcirc)
    b = np.empty_like(a)
    for i in range(GRID.n_rings):
        n_r, o = GRID.n_samples[i], GRID.offsets[i]
        j = np.arange(n_r)
        shift = k8 * n_r // 8                                  # alpha = 45 deg * k8
        # image b with b(phi) = a(phi + alpha) (straight) or a(-phi - alpha) (mirrored)
        src = (j + shift) % n_r if not mirror else (-j - shift) % n_r
        b[o:o + n_r] = a[o:o + n_r][src]
    c, c_m = rotational_correlation(b, a, GRID)
    curve, other = (c_m, c) if mirror else (c, c_m)
    assert np.argmax(curve) == k8 * GRID.maxrin // 8
    assert curve.max() >= other.max()


def test_ring_normalisation_uses_arc_length_weights(rng):
    polar = (rng.standard_normal((4, GRID.lcirc)) * 3 + 2).astype(np.float32)
    normed = normalize_rings(polar, GRID)
    w = GRID.sample_weights / GRID.sample_weights.sum()
    np.testing.assert_allclose(normed @ w, 0.0, atol=1e-5)
    np.testing.assert_allclose((normed.astype(np.float64) ** 2) @ w, 1.0, rtol=1e-5)
    mean, std = ring_statistics(polar, GRID)
    np.testing.assert_allclose(mean, polar.astype(np.float64) @ w, rtol=1e-6)
    assert std.shape == (4,) and np.all(std > 2.5)
    const = np.full((1, GRID.lcirc), 5.0, np.float32)
    np.testing.assert_allclose(normalize_rings(const, GRID), 0.0)


def test_rings_from_spectra_inverts_ring_spectra(rng):
    grid = polar_grid(1, 20)
    polar = rng.normal(size=(3, grid.lcirc)).astype(np.float32)
    back = rings_from_spectra(ring_spectra(polar, grid), grid)
    assert np.allclose(back, polar, atol=1e-5)


def test_polar_to_image_reproduces_a_smooth_image_inside_the_last_ring():
    # a smooth image is sampled on the rings and interpolated back (linear in radius and angle):
    # the error is second order in the sample spacing (<= 1 px), small for features ~4 px wide
    n = 48
    y, x = np.mgrid[:n, :n] - n // 2
    img = (np.exp(-((x - 5) ** 2 + (y + 3) ** 2) / 32.0) + 0.5 * np.exp(-((x + 7) ** 2 + y ** 2) / 18.0))
    grid = polar_grid(1, 20)
    back = polar_to_image(polar_transform(img.astype(np.float32), grid), grid, n)
    r = np.hypot(x, y)
    assert np.abs(back - img)[r <= 20].max() < 0.03 * img.max()
    assert np.all(back[r >= 21] == 0)                       # supported on the disc of radius last_ring + 1
    two = polar_to_image(np.stack([polar_transform(img.astype(np.float32), grid)] * 2), grid, n)
    assert two.shape == (2, n, n) and np.array_equal(two[0], back)
