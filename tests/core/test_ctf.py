"""CTF: RELION/EMAN2 parity, sign, astigmatism direction, phase flip, Wiener, aligned CTFs."""

from __future__ import annotations

import numpy as np
import pytest

from isavar.conventions import electron_wavelength_A, relion_to_eman_defocus
from isavar.core.ctf import (
    aligned_defocus_angle,
    ctf_2d,
    ctf_2d_eman,
    ctf_at,
    ctf_params_from_table,
    phase_flip,
    phase_flip_padded,
    wiener_filter,
)
from isavar.core.fft import freq_grid_2d
from isavar.core.params2d import rotation_matrix
from isavar.core.transform2d import transform_images

BASE = dict(voltage_kV=300.0, cs_mm=2.7, amplitude_contrast=0.1)


def _params(rng, n):
    return dict(
        defocus_u_A=rng.uniform(8000, 30000, n),
        defocus_v_A=rng.uniform(8000, 30000, n),
        defocus_angle_deg=rng.uniform(-180, 180, n),
        **BASE,
    )


@pytest.mark.parametrize("n", [48, 49])
def test_relion_and_eman_parametrisations_agree_in_value_and_sign(rng, n):
    p = _params(rng, 5)
    p["bfactor_A2"] = rng.uniform(0, 100, 5)
    relion = ctf_2d(n, 1.1, **p)
    d, dd, da = relion_to_eman_defocus(p["defocus_u_A"], p["defocus_v_A"], p["defocus_angle_deg"])
    eman = ctf_2d_eman(n, 1.1, defocus_um=d, dfdiff_um=dd, dfang_deg=da, voltage_kV=300.0, cs_mm=2.7,
                       ampcont_percent=10.0, bfactor_A2=p["bfactor_A2"])
    # Documented global sign between the two conventions: +1 (RELION's ctf.h negates the defocus internally).
    np.testing.assert_allclose(eman, relion, atol=2e-6)
    sphire_lambda = ctf_2d_eman(n, 1.1, defocus_um=d, dfdiff_um=dd, dfang_deg=da, voltage_kV=300.0, cs_mm=2.7,
                                ampcont_percent=10.0, bfactor_A2=p["bfactor_A2"], wavelength="eman")
    assert np.mean(np.sign(sphire_lambda) == np.sign(relion)) > 0.99


def test_relion_ctf_h_expression():
    """Re-derive RELION's getCTF (negated defocus, -sin(K1 df u^2 + K2 u^4 - K5 - K3)) at one point."""
    u, v, ang, kv, cs, q0, ps = 20000.0, 16000.0, 25.0, 200.0, 2.0, 0.07, 30.0
    x, y = 0.05, -0.08
    lam = 12.2642598 / np.sqrt(kv * 1e3 * (1 + kv * 1e3 * 0.978466e-6))
    df_avg, df_dev = -(u + v) / 2, -(u - v) / 2
    deltaf = df_avg + df_dev * np.cos(2 * (np.arctan2(y, x) - np.deg2rad(ang)))
    u2 = x * x + y * y
    arg = np.pi * lam * deltaf * u2 + np.pi / 2 * cs * 1e7 * lam**3 * u2 * u2 - np.deg2rad(ps) - np.arctan(
        q0 / np.sqrt(1 - q0 * q0))
    expected = -np.sin(arg)
    got = ctf_at(x, y, defocus_u_A=u, defocus_v_A=v, defocus_angle_deg=ang, voltage_kV=kv, cs_mm=cs,
                 amplitude_contrast=q0, phase_shift_deg=ps)
    assert got == pytest.approx(expected, abs=1e-12)


def test_low_frequency_sign_and_first_zero():
    """Underfocus: CTF starts at the amplitude contrast and rises; first zero where pi lambda dz k^2 = pi - asin(w)."""
    dz = 20000.0
    k = np.linspace(0, 0.05, 2001)
    c = ctf_at(k, 0.0, defocus_u_A=dz, defocus_v_A=dz, defocus_angle_deg=0.0, voltage_kV=300.0, cs_mm=0.0,
               amplitude_contrast=0.1)
    assert c[0] == pytest.approx(0.1)
    assert c[10] > c[0]
    lam = electron_wavelength_A(300.0)
    k0 = np.sqrt((np.pi - np.arcsin(0.1)) / (np.pi * lam * dz))
    first_zero = k[np.argmax(c < 0)]
    assert first_zero == pytest.approx(k0, abs=k[1] - k[0])


@pytest.mark.parametrize("angle", [0.0, 30.0, 110.0])
def test_astigmatism_angle_direction(angle):
    """Along the U axis (angle from +x towards +y rows) the CTF equals an isotropic CTF of defocus U."""
    u, v = 12000.0, 26000.0
    k = np.linspace(0.01, 0.2, 50)
    for axis_angle, defocus in ((angle, u), (angle + 90.0, v)):
        a = np.deg2rad(axis_angle)
        astig = ctf_at(k * np.cos(a), k * np.sin(a), defocus_u_A=u, defocus_v_A=v, defocus_angle_deg=angle, **BASE)
        iso = ctf_at(k, 0.0, defocus_u_A=defocus, defocus_v_A=defocus, defocus_angle_deg=0.0, **BASE)
        np.testing.assert_allclose(astig, iso, atol=1e-9)


def test_astigmatism_direction_on_the_fft_grid():
    """Planted: U at 90 degrees (along rows = +y). The FFT column kx = 0 must follow defocus U."""
    n, apix = 64, 2.0
    c = ctf_2d(n, apix, defocus_u_A=10000.0, defocus_v_A=30000.0, defocus_angle_deg=90.0, **BASE)[0]
    ky = np.fft.fftfreq(n)[1 : n // 2] / apix
    along_y = ctf_at(0.0, ky, defocus_u_A=10000.0, defocus_v_A=10000.0, defocus_angle_deg=0.0, **BASE)
    along_x = ctf_at(ky, 0.0, defocus_u_A=30000.0, defocus_v_A=30000.0, defocus_angle_deg=0.0, **BASE)
    np.testing.assert_allclose(c[1 : n // 2, 0], along_y, atol=1e-6)
    np.testing.assert_allclose(c[0, 1 : n // 2], along_x, atol=1e-6)


def test_vectorised_over_particles_and_rfft_layout(rng):
    p = _params(rng, 4)
    full = ctf_2d((32, 32), 1.5, **p)
    half = ctf_2d((32, 32), 1.5, rfft=True, **p)
    assert full.shape == (4, 32, 32) and half.shape == (4, 32, 17) and full.dtype == np.float32
    np.testing.assert_allclose(half[..., :16], full[..., :16], atol=1e-7)
    single = ctf_2d(32, 1.5, **{k: (v[2] if np.ndim(v) else v) for k, v in p.items()})
    np.testing.assert_allclose(single[0], full[2], atol=1e-7)


def test_ctf_grid_is_hermitian(rng):
    p = _params(rng, 2)
    c = ctf_2d(16, 1.0, **p)
    flipped = c[:, (-np.arange(16)) % 16][:, :, (-np.arange(16)) % 16]
    np.testing.assert_allclose(c, flipped, atol=1e-7)


@pytest.mark.parametrize("n", [32, 33])
def test_phase_flip_twice_is_identity(rng, n):
    img = rng.normal(size=(3, n, n)).astype(np.float32)
    c = ctf_2d(n, 1.3, **_params(rng, 3))
    np.testing.assert_allclose(phase_flip(phase_flip(img, c), c), img, atol=1e-5)
    np.testing.assert_allclose(phase_flip(phase_flip(img, c), c[..., : n // 2 + 1]), img, atol=1e-5)


def test_phase_flipped_image_has_positive_effective_ctf(rng):
    n = 48
    x = rng.normal(size=(2, n, n))
    c = ctf_2d(n, 1.2, **_params(rng, 2))
    recorded = np.fft.ifft2(np.fft.fft2(x) * c).real.astype(np.float32)
    flipped = phase_flip(recorded, c)
    effective = np.fft.fft2(flipped) / np.fft.fft2(x)
    assert np.abs(effective.imag).max() < 1e-3
    significant = np.abs(c) > 1e-3
    assert (effective.real[significant] > 0).all()
    np.testing.assert_allclose(effective.real, np.abs(c), atol=1e-3)


def test_phase_flip_padded_without_padding_equals_phase_flip(rng):
    img = rng.normal(size=(2, 32, 32)).astype(np.float32)
    p = _params(rng, 2)
    a = phase_flip_padded(img, 1.3, pad_factor=1, **p)
    b = phase_flip(img, ctf_2d(32, 1.3, **p))
    np.testing.assert_allclose(a, b, atol=1e-5)
    padded = phase_flip_padded(img, 1.3, **p)
    assert padded.shape == img.shape


def test_phase_flip_padded_reduces_wraparound():
    """A point object near the edge: padding keeps its flipped image closer to the unwrapped truth."""
    n, apix = 64, 2.0
    p = dict(defocus_u_A=30000.0, defocus_v_A=30000.0, defocus_angle_deg=0.0, **BASE)
    big = np.zeros((4 * n, 4 * n), np.float32)
    big[2 * n, 2 * n - n // 2 + 4] = 1.0
    truth_big = phase_flip(np.fft.ifft2(np.fft.fft2(big) * ctf_2d(4 * n, apix, **p)[0]).real, ctf_2d(4 * n, apix, **p))
    sl = slice(2 * n - n // 2, 2 * n + n // 2)
    recorded = np.fft.ifft2(np.fft.fft2(big) * ctf_2d(4 * n, apix, **p)[0]).real[sl, sl].astype(np.float32)
    truth = truth_big[sl, sl]
    err_plain = np.abs(phase_flip(recorded, ctf_2d(n, apix, **p)) - truth).mean()
    err_pad = np.abs(phase_flip_padded(recorded, apix, **p) - truth).mean()
    assert err_pad < err_plain


def test_wiener_recovers_signal(rng):
    n, k = 48, 40
    y, x = np.mgrid[:n, :n] - n // 2
    signal = np.exp(-(x**2 + y**2) / 50.0) - 0.5 * np.exp(-((x - 6) ** 2 + (y + 4) ** 2) / 8.0)
    p = _params(rng, k)
    c = ctf_2d(n, 1.5, **p)
    images = np.fft.ifft2(np.fft.fft2(signal)[None] * c).real.astype(np.float32)
    avg = wiener_filter(images, c, snr=1e4)
    assert np.abs(avg - signal).max() < 0.02 * np.abs(signal).max()
    single = wiener_filter(images[0], c[0], snr=1e4)
    assert single.shape == (n, n)


@pytest.mark.parametrize("mirror", [0, 1])
def test_aligned_defocus_angle_equals_ctf_at_rotated_frequency(rng, mirror):
    alpha, angle = 37.0, 20.0
    p = dict(defocus_u_A=12000.0, defocus_v_A=25000.0, **BASE)
    ky, kx = freq_grid_2d(32, 32)
    k = np.stack([kx, ky], -1) / 1.4
    lin = rotation_matrix(alpha).T @ np.diag([-1.0 if mirror else 1.0, 1.0])
    src = k @ lin.T
    expected = ctf_at(src[..., 0], src[..., 1], defocus_angle_deg=angle, **p)
    got = ctf_at(k[..., 0], k[..., 1], defocus_angle_deg=aligned_defocus_angle(angle, alpha, mirror), **p)
    np.testing.assert_allclose(got, expected, atol=1e-9)


@pytest.mark.parametrize("alpha,mirror", [(30.0, 0), (30.0, 1), (-115.0, 0), (-115.0, 1)])
def test_ctf_of_transformed_image(alpha, mirror):
    """transform(CTF * x) == CTF_aligned * transform(x) for a compact object (sinc-accurate transforms)."""
    n = 64
    y, x = np.mgrid[:n, :n] - n // 2
    obj = (np.exp(-((x - 3) ** 2 + (y + 2) ** 2) / 8.0) + 0.6 * np.exp(-((x + 4) ** 2 + (y - 5) ** 2) / 5.0)).astype(
        np.float32)
    # A strong envelope keeps the delocalised signal well inside the box (no wrap-around).
    p = dict(defocus_u_A=4000.0, defocus_v_A=12000.0, defocus_angle_deg=20.0, bfactor_A2=400.0, **BASE)
    recorded = np.fft.ifft2(np.fft.fft2(obj) * ctf_2d(n, 2.0, **p)[0]).real.astype(np.float32)
    moved = transform_images(recorded, alpha, 1.5, -2.0, mirror, interpolation="fourier", border="wrap")
    moved_obj = transform_images(obj, alpha, 1.5, -2.0, mirror, interpolation="fourier", border="wrap")
    inside = x**2 + y**2 <= 24**2
    errors = {}
    for name, angle in (("aligned", aligned_defocus_angle(20.0, alpha, mirror)),
                        ("wrong sign", aligned_defocus_angle(20.0, -alpha, mirror))):
        p["defocus_angle_deg"] = angle
        expected = np.fft.ifft2(np.fft.fft2(moved_obj) * ctf_2d(n, 2.0, **p)[0]).real
        errors[name] = np.abs(moved - expected)[inside].max()
    assert errors["aligned"] < 1e-3
    assert errors["wrong sign"] > 0.05


def test_ctf_params_from_table():
    table = {"defocus_u_A": [1.0, 2.0], "defocus_v_A": [1.0, 2.0], "defocus_angle_deg": [0.0, 0.0],
             "voltage_kV": [300.0, 300.0], "cs_mm": [2.7, 2.7], "amplitude_contrast": [0.1, 0.1]}
    kw = ctf_params_from_table(table, rows=[1])
    assert kw["defocus_u_A"].tolist() == [2.0] and kw["bfactor_A2"].tolist() == [0.0]
    with pytest.raises(ValueError):
        ctf_params_from_table({"defocus_u_A": [1.0]})


def test_bad_ctf_shape_rejected(rng):
    with pytest.raises(ValueError):
        phase_flip(np.zeros((8, 8), np.float32), np.ones((8, 7)))


@pytest.mark.parametrize("shape", [(16, 16), (15, 15), (12, 17)])
@pytest.mark.parametrize("rfft", [False, True])
def test_ctf_2d_is_ctf_at_on_the_grid_bit_for_bit(rng, shape, rfft):
    """The compiled grid evaluation gives ctf_at's values rounded to float32 exactly, B-factors and phase
    shifts included, away from the Nyquist row and column (which average the +-1/2 frequencies)."""
    n = 6
    p = dict(defocus_u_A=rng.uniform(5e3, 3e4, n), defocus_v_A=rng.uniform(5e3, 3e4, n),
             defocus_angle_deg=rng.uniform(-180, 180, n), voltage_kV=rng.choice([200.0, 300.0], n),
             cs_mm=rng.uniform(0, 3, n), amplitude_contrast=rng.uniform(0, 0.3, n),
             phase_shift_deg=rng.uniform(0, 90, n), bfactor_A2=np.r_[0.0, 0.0, rng.uniform(-50, 200, n - 2)])
    grid = ctf_2d(shape, 1.3, rfft=rfft, **p)
    ky, kx = freq_grid_2d(*shape, rfft=rfft)
    ref = ctf_at(kx[None] / 1.3, ky[None] / 1.3, **{k: v[:, None, None] for k, v in p.items()}).astype(np.float32)
    inner = (np.abs(ky) < 0.5)[None] & (np.abs(kx) < 0.5)[None] & np.ones((n, 1, 1), bool)
    assert grid.shape == ref.shape and grid.dtype == np.float32
    np.testing.assert_array_equal(grid[inner], ref[inner])
