"""Numerics of the covariance EM: projection/back-projection operators, E-step, M-step algebra, splitting.

The gather operator must equal isavar's Fourier-slice projector (the same trilinear kernel on
the same padded grid), and scatter must be its exact adjoint; the E-step must match the
textbook PPCA posterior; orthogonalisation must keep the covariance V V^T.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isavar.core.ctf import ctf_2d
from isavar.core.geometry import random_rotations
from isavar.core.projection import Projector
from isavar.covariance import em
from isavar.covariance.sampling import SliceSampler
from isavar.covariance.volumes import auto_mask, band_limit
from isavar.workflows.covariance import split_labels


def _smooth_volume(rng, n):
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(rng.standard_normal((n, n, n)), 1.5).astype(np.float32)


@pytest.mark.parametrize("n", [24, 25])
def test_gather_equals_fourier_slice_projection(rng, n):
    vol = _smooth_volume(rng, n)
    rots = random_rotations(5, rng)
    origins = rng.uniform(-2, 2, (5, 2))
    images = Projector(vol).project(rots, origins_px=origins)
    s = SliceSampler(n, n / 2 - 1)
    from_images = s.image_samples(images, origins)  # origin removed: the centred projection's samples
    gathered = s.gather(s.volumes_to_storage(vol[None]), s.geometry(rots))[:, :, 0]
    scale = np.abs(from_images).max()
    assert np.abs(from_images - gathered).max() < 1e-4 * scale


def test_scatter_is_the_adjoint_of_gather(rng):
    n = 16
    s = SliceSampler(n, n / 2)
    geo = s.geometry(random_rotations(7, rng))
    u = (rng.standard_normal((s.n_band, 1)) + 1j * rng.standard_normal((s.n_band, 1))).astype(np.complex64)
    y = (rng.standard_normal(geo.shape) + 1j * rng.standard_normal(geo.shape)).astype(np.complex64)
    lhs = np.vdot(y.astype(np.complex128), s.gather(u, geo)[:, :, 0].astype(np.complex128)).real
    rhs = np.vdot(s.scatter(y[None], geo)[0], u[:, 0].astype(np.complex128)).real
    assert lhs == pytest.approx(rhs, rel=1e-5)


@pytest.mark.parametrize("n, r_max", [(16, 8.0), (21, 6.5)])
def test_compiled_gather_and_scatter_equal_the_numpy_operators(rng, n, r_max):
    """The numba kernels (geometry on the fly, M-step values formed on the fly) equal gather/scatter."""
    s = SliceSampler(n, r_max)
    rots = random_rotations(9, rng)
    geo = s.geometry(rots)
    stores = (rng.standard_normal((s.n_band, 3)) + 1j * rng.standard_normal((s.n_band, 3))).astype(np.complex64)
    ref = s.gather(stores, geo)
    fast = s.gather_at(stores, rots)
    assert np.abs(fast - ref).max() <= 1e-5 * np.abs(ref).max()
    c, n_s = geo.shape
    x = (rng.standard_normal((c, n_s)) + 1j * rng.standard_normal((c, n_s))).astype(np.complex64)
    ctf = rng.uniform(-1, 1, (c, n_s)).astype(np.float32)
    sigma2 = rng.uniform(0.5, 2.0, n_s)
    ez, hv, bv, _ = em.batch_moments(x, ctf, ref, sigma2, s.multiplicity, mean_free=True)
    _, u, zz, g, zhat, _ = em.batch_factors(x, ctf, ref, sigma2, s.multiplicity, mean_free=True)
    h = np.zeros((s.n_band, zz.shape[1]))
    b = np.zeros((s.n_band, zhat.shape[1]), np.complex128)
    s.scatter_moments(u, zz, g, zhat, rots, h, b)
    h_ref, b_ref = s.scatter(hv, geo), s.scatter(bv, geo)       # float32 values: agree to float32 rounding
    assert np.abs(h.T - h_ref).max() <= 1e-5 * np.abs(h_ref).max()
    assert np.abs(b.T - b_ref).max() <= 1e-5 * np.abs(b_ref).max()
    s.scatter_moments(u, zz, g, zhat, rots, h, b)                 # accumulates in place
    assert np.abs(h.T - 2 * h_ref).max() <= 2e-5 * np.abs(h_ref).max()


def test_ctf_samples_match_the_ctf_image(rng):
    n, apix = 32, 2.0
    params = dict(defocus_u_A=np.array([12000.0, 20000.0]), defocus_v_A=np.array([11000.0, 19500.0]),
                  defocus_angle_deg=np.array([30.0, 110.0]), voltage_kV=np.array([300.0, 300.0]),
                  cs_mm=np.array([2.7, 2.7]), amplitude_contrast=np.array([0.1, 0.1]),
                  phase_shift_deg=np.zeros(2), bfactor_A2=np.zeros(2))
    s = SliceSampler(n, n / 2)
    grid = ctf_2d(n, apix, rfft=True, **params).reshape(2, -1)
    assert np.allclose(s.ctf_samples(apix, params), grid[:, s.flat], atol=1e-5)


def test_band_limit():
    assert band_limit(64, 0.0, 0.0) == 32.0
    r = band_limit(64, 0.1, 0.1)
    assert 6.4 < r < 32.0  # beyond fl * box, well inside Nyquist


def test_posterior_matches_textbook_ppca(rng):
    c, s, k = 3, 40, 2
    a = (rng.standard_normal((c, s, k)) + 1j * rng.standard_normal((c, s, k))).astype(np.complex64)
    r = (rng.standard_normal((c, s)) + 1j * rng.standard_normal((c, s))).astype(np.complex64)
    w = rng.uniform(0.5, 2.0, s).astype(np.float32)
    ez, cov = em.posterior(a, r, w)
    for i in range(c):
        # real-valued model: stack real and imaginary parts with weights w
        ar = np.concatenate([a[i].real, a[i].imag]).astype(np.float64)
        rr = np.concatenate([r[i].real, r[i].imag]).astype(np.float64)
        ww = np.concatenate([w, w]).astype(np.float64)
        m = np.eye(k) + ar.T @ (ww[:, None] * ar)
        assert np.allclose(cov[i], np.linalg.inv(m), rtol=1e-4, atol=1e-6)
        assert np.allclose(ez[i], np.linalg.solve(m, ar.T @ (ww * rr)), rtol=1e-4, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4))
def test_orthogonalise_keeps_the_covariance(seed, k):
    rng = np.random.default_rng(seed)
    v = rng.standard_normal((k, 6, 6, 6)).astype(np.float32)
    w, lam, q = em.orthogonalise(v)
    flat_v, flat_w = v.reshape(k, -1).astype(np.float64), w.reshape(k, -1).astype(np.float64)
    assert np.allclose(flat_v.T @ flat_v, flat_w.T @ flat_w, atol=1e-3)
    gram = flat_w @ flat_w.T
    assert np.allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-3)
    assert np.all(np.diff(lam) <= 1e-9) and np.allclose(np.diag(gram), lam, rtol=1e-4)
    assert em.covariance_change(v, w) < 1e-4


def test_procrustes_recovers_a_rotation(rng):
    va = rng.standard_normal((3, 200)) + 1j * rng.standard_normal((3, 200))
    q, _ = np.linalg.qr(rng.standard_normal((3, 3)))
    vb = q @ va  # half B in a rotated gauge
    r = em.procrustes(va, vb)
    assert np.allclose(r @ vb, va, atol=1e-8)


def test_sign_by_skew():
    rng = np.random.default_rng(1)
    z = np.stack([-rng.exponential(1.0, 500), rng.exponential(1.0, 500)], axis=1)
    v = np.ones((2, 4, 4, 4))
    assert list(em.sign_by_skew(z, v)) == [-1.0, 1.0]


def test_auto_mask_covers_the_object():
    n = 32
    z, y, x = np.mgrid[:n, :n, :n] - n // 2
    vol = np.exp(-((x - 4) ** 2 + y**2 + z**2) / 18.0).astype(np.float32)
    m = auto_mask(vol)
    assert m.min() >= 0 and m.max() == pytest.approx(1.0)
    assert m[n // 2, n // 2, n // 2 + 4] == 1.0 and m[0, 0, 0] == 0.0


def test_split_labels_thresholds_and_kmeans(rng):
    z = np.concatenate([rng.normal(-2, 0.3, (100, 2)), rng.normal(2, 0.3, (60, 2))])
    truth = np.r_[np.zeros(100, int), np.ones(60, int)]
    assert np.array_equal(split_labels(z, component=1, thresholds=[0.0]), truth)
    assert np.array_equal(split_labels(z, kmeans=2, seed=3), truth)  # ordered by latent 1
    assert set(split_labels(z, component=2, thresholds=[-1.0, 1.0])) == {0, 2}


def test_fourier_band_splits_a_volume(rng):
    from isavar.covariance.run import fourier_band

    v = rng.standard_normal((16, 16, 16)).astype(np.float32)
    low = fourier_band(v, 3.0)
    assert np.allclose(fourier_band(v, 100.0), v, atol=1e-5)
    assert abs(float((low.astype(np.float64) * (v - low)).sum())) < 1e-3  # orthogonal parts


def test_symmetric_mean_with_an_automatic_band():
    """With --sym the first-pass (symmetry-expanded) mean is kept and has the phantom's amplitude."""
    from isavar.covariance import CovarianceParams, covariance
    from isavar.synthetic import phantom_volume, simulate_particles
    from isavar.variability.run import particle_geometry

    vol = phantom_volume("c2", 20, 9.6)
    images, table = simulate_particles(vol, 300, pixel_size_A=9.6, snr=0.3, ctf=False, rng=3)
    geo = particle_geometry(table, 9.6, need_ctf=False)
    prm = CovarianceParams(n_components=1, iterations=1, symmetry="c2", normalize=False)
    res = covariance(table, images, prm, geometry=geo, pixel_size_A=9.6)
    assert res.timings_s["band_radius_px"] < 10  # the automatic band is narrower than Nyquist
    from isavar.report.validation import masked_correlation, sphere_mask

    inside = sphere_mask(20, 8)
    assert masked_correlation(res.mean, vol, inside) > 0.97
    # the amplitude is the phantom's: least-squares slope near 1 (Wiener shrinkage at high frequency)
    slope = float((res.mean[inside] * vol[inside]).sum() / (vol[inside] ** 2).sum())
    assert 0.85 < slope < 1.15


@pytest.mark.parametrize("j", [1, 3, 5])
def test_voxel_solves_equal_lapack_and_fall_back_when_not_positive_definite(rng, j):
    a = rng.standard_normal((200, j, j))
    mat = a @ a.transpose(0, 2, 1) + 0.1 * np.eye(j)
    mat[:5] = -np.eye(j)                                  # not positive definite: LU fallback
    rhs = rng.standard_normal((200, j)) + 1j * rng.standard_normal((200, j))
    ref = np.linalg.solve(mat.astype(np.complex128), rhs[:, :, None])[:, :, 0]
    got = em._solve_many(mat, rhs).T
    assert np.allclose(got, ref, rtol=1e-9, atol=1e-12)
