"""Fourier filters: tanh low-pass (spec isac2.md §5.1), Gaussian, radial tables."""

from __future__ import annotations

import numpy as np
import pytest

from isavar.core.filters import (
    apply_radial_filter,
    frequency_radius,
    gaussian_lowpass,
    radial_filter_values,
    tanh_lowpass,
    tanh_profile,
)


def test_tanh_profile_formula():
    s = np.linspace(0, 0.5, 101)
    fl, ff = 0.2, 0.2
    expected = 0.5 * (np.tanh(np.pi * (s + fl) / (2 * ff * fl)) - np.tanh(np.pi * (s - fl) / (2 * ff * fl)))
    np.testing.assert_allclose(tanh_profile(s, fl, ff), expected)
    assert tanh_profile(0.0, fl, ff) == pytest.approx(1.0, abs=1e-6)
    assert tanh_profile(fl, fl, ff) == pytest.approx(0.5, abs=1e-3)
    assert tanh_profile(0.45, fl, ff) < 1e-6
    with pytest.raises(ValueError):
        tanh_profile(s, 0.0, 0.1)


def _plane_wave(n, fx, fy):
    y, x = np.mgrid[:n, :n]
    return np.cos(2 * np.pi * (fx * x + fy * y)).astype(np.float32)


@pytest.mark.parametrize("n", [32, 33])
def test_tanh_lowpass_scales_plane_waves(n):
    fl, ff = 0.2, 0.1
    for kx, ky in [(2, 0), (3, 4), (9, 0), (12, 5)]:
        wave = _plane_wave(n, kx / n, ky / n)
        out = tanh_lowpass(wave, fl, ff)
        gain = tanh_profile(np.hypot(kx, ky) / n, fl, ff)
        np.testing.assert_allclose(out, gain * wave, atol=1e-5)


def test_gaussian_lowpass_gain():
    n = 32
    wave = _plane_wave(n, 5 / n, 0)
    sigma = 0.1
    out = gaussian_lowpass(wave, sigma)
    np.testing.assert_allclose(out, np.exp(-((5 / n) ** 2) / (2 * sigma**2)) * wave, atol=1e-5)


def test_radial_table_interpolation_and_cutoff():
    n = 16
    table = np.array([1.0, 0.8, 0.6, 0.4, 0.2])
    values = radial_filter_values((n, n), table)
    r = frequency_radius(n, n) * n
    np.testing.assert_allclose(values[r <= 4], np.interp(r[r <= 4], np.arange(5), table))
    assert (values[r > 4] == 0).all()
    # A wave at radius 1.5 (on the diagonal-free axis: kx = 1.5 impossible) -> use radius 2: gain 0.6.
    wave = _plane_wave(n, 2 / n, 0)
    np.testing.assert_allclose(apply_radial_filter(wave, table), 0.6 * wave, atol=1e-5)
    high = _plane_wave(n, 6 / n, 0)
    np.testing.assert_allclose(apply_radial_filter(high, table), 0.0, atol=1e-5)


def test_filters_batched_and_float32(rng):
    img = rng.normal(size=(3, 24, 24)).astype(np.float32)
    out = tanh_lowpass(img, 0.25, 0.2)
    assert out.shape == img.shape and out.dtype == np.float32
    np.testing.assert_allclose(out[1], tanh_lowpass(img[1], 0.25, 0.2), atol=1e-6)
