"""Masks (circle, soft circle, rotated rectangle) and mask-based normalisation."""

from __future__ import annotations

import numpy as np
import pytest

from isavar.core.masks import circular_mask, radius_grid, rectangle_mask
from isavar.core.normalize import ZeroStdWarning, normalize_images, region_stats


@pytest.mark.parametrize("n", [10, 11])
def test_circular_mask_model_circle_semantics(n):
    r = 3.0
    m = circular_mask(n, r)
    c = n // 2
    for iy in range(n):
        for ix in range(n):
            assert m[iy, ix] == float((ix - c) ** 2 + (iy - c) ** 2 <= r * r)
    assert m.dtype == np.float32


def test_soft_mask_raised_cosine():
    m = circular_mask(41, 10.0, soft_edge=6.0)
    d = radius_grid(41)
    np.testing.assert_array_equal(m[d <= 10], 1.0)
    np.testing.assert_array_equal(m[d >= 16], 0.0)
    ring = (d > 10) & (d < 16)
    np.testing.assert_allclose(m[ring], 0.5 * (1 + np.cos(np.pi * (d[ring] - 10) / 6.0)), atol=1e-6)
    assert m[20, 20 + 13] == pytest.approx(0.5, abs=1e-6)


def test_rectangle_mask_orientation():
    n = 41
    m = rectangle_mask(n, 2, 10, 0.0)
    assert m[20, 30] == 1 and m[20, 31] == 0 and m[22, 20] == 1 and m[23, 20] == 0
    # 90 degrees: long axis along (cos 90, -sin 90) = -y, i.e. vertical.
    m90 = rectangle_mask(n, 2, 10, 90.0)
    np.testing.assert_array_equal(m90, m.T)
    # 45 degrees: the point (x, row) = (+5, -5) lies on the long axis, (+5, +5) does not.
    m45 = rectangle_mask(n, 1.5, 10, 45.0)
    assert m45[20 - 5, 20 + 5] == 1 and m45[20 + 5, 20 + 5] == 0


def test_normalize_outside_mean_inside_std(rng):
    n = 32
    mask = circular_mask(n, 10)
    img = (rng.normal(3.0, 2.0, size=(4, n, n))).astype(np.float32)
    img[:, mask > 0.5] *= 5.0
    out = normalize_images(img, mask)
    inside = mask > 0.5
    for i in range(4):
        assert out[i][~inside].mean() == pytest.approx(0.0, abs=1e-5)
        assert out[i][inside].std(ddof=1) == pytest.approx(1.0, rel=1e-5)


def test_normalize_inside_mean_no_std(rng):
    mask = circular_mask(16, 5)
    img = rng.normal(size=(16, 16)).astype(np.float32) + 7
    out = normalize_images(img, mask, mean_region="inside", std_region=None)
    assert out[mask > 0.5].mean() == pytest.approx(0.0, abs=1e-5)
    np.testing.assert_allclose(img - out, (img - out)[0, 0], atol=1e-5)


def test_region_stats_matches_numpy(rng):
    mask = circular_mask(20, 6)
    img = rng.normal(size=(2, 20, 20)).astype(np.float32)
    mean, std = region_stats(img, mask, "outside")
    sel = mask <= 0.5
    np.testing.assert_allclose(mean, [img[0][sel].mean(), img[1][sel].mean()], rtol=1e-6)
    np.testing.assert_allclose(std, [img[0][sel].std(ddof=1), img[1][sel].std(ddof=1)], rtol=1e-6)


def test_zero_std_is_guarded(rng):
    mask = circular_mask(16, 5)
    img = np.zeros((2, 16, 16), np.float32)
    img[0] = rng.normal(size=(16, 16))
    img[1, mask > 0.5] = 1.0  # constant outside the mask
    with pytest.warns(ZeroStdWarning):
        out = normalize_images(img, mask, std_region="outside")
    assert np.isfinite(out).all()
    out2, scaled = normalize_images(img, mask, std_region="outside", return_flags=True)
    assert scaled.tolist() == [True, False]
    np.testing.assert_array_equal(out, out2)
    np.testing.assert_array_equal(out2[1], img[1])


def test_bad_region():
    with pytest.raises(ValueError):
        normalize_images(np.zeros((4, 4)), np.ones((4, 4)), mean_region="middle")


def test_per_image_masks_match_shared_mask(rng):
    img = rng.normal(2.0, 3.0, size=(3, 16, 16)).astype(np.float32)
    shared = circular_mask(16, 5)
    per_image = np.repeat(shared[None], 3, axis=0)
    a = normalize_images(img, shared)
    b = normalize_images(img, per_image)
    np.testing.assert_allclose(a, b, atol=1e-5)
    different = np.stack([circular_mask(16, r) for r in (3, 5, 7)])
    mean, std = region_stats(img, different, "inside")
    for i in range(3):
        sel = different[i] > 0.5
        assert mean[i] == pytest.approx(img[i][sel].mean(), rel=1e-5)
        assert std[i] == pytest.approx(img[i][sel].std(ddof=1), rel=1e-5)


def test_soft_mask_outside_sphere_keeps_inside_and_flattens_corners():
    from isavar.core.masks import soft_mask_outside_sphere

    rng = np.random.default_rng(3)
    n = 24
    vol = rng.normal(size=(n, n, n)).astype(np.float32)
    out = soft_mask_outside_sphere(vol, radius=8.0, width=3.0)
    z, y, x = np.mgrid[:n, :n, :n] - n // 2
    r = np.sqrt(x * x + y * y + z * z)
    np.testing.assert_array_equal(out[r <= 8.0], vol[r <= 8.0])
    far = out[r >= 11.0]
    assert np.ptp(far) < 1e-6                                   # one background level beyond the edge
    # a map already flat outside the sphere is unchanged
    flat = np.where(r <= 8.0, vol, np.float32(0.7))
    np.testing.assert_allclose(soft_mask_outside_sphere(flat, radius=8.0, width=3.0), flat, atol=1e-6)
