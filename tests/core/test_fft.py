"""FFT helpers: Fourier shift, resampling, window/pad, frequency grids."""

from __future__ import annotations

import numpy as np
import pytest

from isavar.core.fft import fourier_shift, freq_grid_2d, pad, resample_fourier, window


def _blob(n, cx, cy, sigma):
    y, x = np.mgrid[:n, :n] - n // 2
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2)).astype(np.float32)


def test_freq_grid_layout():
    ky, kx = freq_grid_2d(4, 5)
    assert kx.shape == (4, 5)
    np.testing.assert_allclose(kx[0], np.fft.fftfreq(5))
    np.testing.assert_allclose(ky[:, 0], np.fft.fftfreq(4))
    ky, kx = freq_grid_2d(4, 6, rfft=True)
    assert kx.shape == (4, 4) and kx[0, -1] == 0.5


@pytest.mark.parametrize("n", [16, 17])
def test_integer_shift_equals_roll(rng, n):
    img = rng.normal(size=(3, n, n)).astype(np.float32)
    shifts = np.array([[2, -3], [0, 1], [-5, 4]])
    out = fourier_shift(img, shifts)
    for i, (dx, dy) in enumerate(shifts):
        np.testing.assert_allclose(out[i], np.roll(img[i], (dy, dx), axis=(0, 1)), atol=1e-5)


@pytest.mark.parametrize("n", [32, 33])
def test_subpixel_shift_moves_blob_by_plus_shift(n):
    img = _blob(n, 1.0, -2.0, 2.0)
    out = fourier_shift(img, (1.3, 0.6))
    np.testing.assert_allclose(out, _blob(n, 2.3, -1.4, 2.0), atol=1e-4)


@pytest.mark.parametrize("n", [32, 33])
def test_shift_round_trip_exact_for_bandlimited(rng, n):
    img = rng.normal(size=(2, n, n)).astype(np.float32)
    # Remove the Nyquist components (the only ones a fractional even-size shift does not preserve).
    spec = np.fft.fft2(img)
    if n % 2 == 0:
        spec[:, n // 2, :] = 0
        spec[:, :, n // 2] = 0
    img = np.fft.ifft2(spec).real.astype(np.float32)
    s = np.array([[0.37, -1.61], [2.5, 0.25]])
    back = fourier_shift(fourier_shift(img, s), -s)
    np.testing.assert_allclose(back, img, atol=1e-5)


def test_shift_keeps_output_real_and_single_image_shape(rng):
    img = rng.normal(size=(16, 16)).astype(np.float32)
    out = fourier_shift(img, (0.5, 0.5))
    assert out.shape == (16, 16) and out.dtype == np.float32


@pytest.mark.parametrize("n,m", [(16, 24), (16, 25), (17, 24), (17, 32)])
def test_pad_then_crop_spectrum_is_identity(rng, n, m):
    img = rng.normal(size=(2, n, n)).astype(np.float32)
    for preserve in ("values", "sum"):
        back = resample_fourier(resample_fourier(img, m, preserve=preserve), n, preserve=preserve)
        np.testing.assert_allclose(back, img, atol=1e-5)


def test_resample_scaling_conventions():
    img = np.full((12, 12), 2.0, np.float32)
    np.testing.assert_allclose(resample_fourier(img, 6), 2.0, atol=1e-6)
    down = resample_fourier(img, 6, preserve="sum")
    np.testing.assert_allclose(down.sum(), img.sum(), rtol=1e-6)


@pytest.mark.parametrize("n,m", [(64, 32), (64, 33), (65, 40)])
def test_downsample_bandlimited_blob_matches_analytic(n, m):
    sigma = 6.0
    img = _blob(n, 0, 0, sigma)
    out = resample_fourier(img, m)
    scale = m / n
    np.testing.assert_allclose(out, _blob(m, 0, 0, sigma * scale), atol=2e-4)


def test_window_and_pad_keep_centre(rng):
    for n, m in [(10, 6), (11, 6), (10, 7), (11, 7)]:
        img = rng.normal(size=(n, n)).astype(np.float32)
        w = window(img, m)
        assert w[m // 2, m // 2] == img[n // 2, n // 2]
        p = pad(w, n, value=3.0)
        assert p[n // 2, n // 2] == img[n // 2, n // 2]
        assert p[0, 0] == 3.0
        np.testing.assert_array_equal(window(p, m), w)


def test_pad_per_image_values(rng):
    img = rng.normal(size=(2, 4, 4)).astype(np.float32)
    p = pad(img, 8, value=[1.0, -1.0])
    assert p[0, 0, 0] == 1.0 and p[1, 0, 0] == -1.0


def test_window_rejects_bad_size():
    with pytest.raises(ValueError):
        window(np.zeros((4, 4)), 6)
    with pytest.raises(ValueError):
        pad(np.zeros((4, 4)), 2)


def test_chunked_fft_work_matches_unchunked(rng, monkeypatch):
    import isavar.core.fft as fft_module
    from isavar.core.ctf import ctf_2d, phase_flip, phase_flip_padded, wiener_filter
    from isavar.core.filters import tanh_lowpass

    img = rng.normal(size=(5, 16, 16)).astype(np.float32)
    shifts = rng.normal(size=(5, 2))
    p = dict(defocus_u_A=rng.uniform(1e4, 2e4, 5), defocus_v_A=1.5e4, defocus_angle_deg=10.0, voltage_kV=300.0,
             cs_mm=2.7, amplitude_contrast=0.1)
    c = ctf_2d(16, 1.5, **p)

    def run():
        return [fourier_shift(img, shifts), resample_fourier(img, 10), tanh_lowpass(img, 0.2, 0.1),
                phase_flip(img, c), phase_flip_padded(img, 1.5, **p), wiener_filter(img, c, 10.0)]

    whole = run()
    monkeypatch.setattr(fft_module, "CHUNK_PIXELS", 300)  # about one image per chunk
    assert len(fft_module.image_chunks(5, 256)) == 5
    for a, b in zip(whole, run()):
        np.testing.assert_allclose(a, b, atol=1e-5)
