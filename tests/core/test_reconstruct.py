"""Direct Fourier inversion: planted-volume round trips (c1, symmetry, CTF, origins), merging, chunking."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from isavar.conventions import matrix_to_euler
from isavar.core.geometry import random_rotations, symmetry_matrices
from isavar.core.projection import project
from isavar.core.reconstruct import FourierAccumulator, nn4_level_and_mask, reconstruct

N = 32
#: Shells (image-grid index) up to 0.8 Nyquist must have FSC > 0.9 (spec §8 T0).
GOOD_SHELLS = slice(1, int(0.8 * N / 2) + 1)


def _gauss_volume(n, centres, sigmas, amps):
    z, y, x = np.mgrid[:n, :n, :n] - n // 2
    vol = np.zeros((n, n, n), np.float64)
    for c, s, a in zip(centres, sigmas, amps):
        vol += a * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    return vol.astype(np.float32)


def _asymmetric_volume(rng, n=N, count=12):
    """Smooth asymmetric phantom with signal up to Nyquist (blobs of sigma ~1 px within r = 8 px)."""
    return _gauss_volume(n, rng.uniform(-6, 6, (count, 3)), rng.uniform(0.9, 1.4, count), rng.uniform(0.5, 1.5, count))


def _symmetric_volume(rng, sym, n=N, count=3):
    s = symmetry_matrices(sym)
    centres, sigmas, amps = [], [], []
    for _ in range(count):
        c, sg, a = rng.uniform(-6, 6, 3), rng.uniform(0.9, 1.4), rng.uniform(0.5, 1.5)
        for g in s:
            centres.append(g @ c)
            sigmas.append(sg)
            amps.append(a)
    return _gauss_volume(n, centres, sigmas, amps)


def fsc(a, b):
    """Fourier shell correlation per integer shell 0 .. N/2 - 1."""
    n = a.shape[0]
    fa, fb = np.fft.fftn(a), np.fft.fftn(b)
    k = np.fft.fftfreq(n) * n
    shell = np.rint(np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)).astype(int)
    num = np.bincount(shell.ravel(), (fa * fb.conj()).real.ravel())
    d1 = np.bincount(shell.ravel(), (np.abs(fa) ** 2).ravel())
    d2 = np.bincount(shell.ravel(), (np.abs(fb) ** 2).ravel())
    return (num / np.sqrt(d1 * d2))[: n // 2]


def _scale(recon, truth):
    """Least-squares slope of recon against truth."""
    return float((recon * truth).sum() / (truth * truth).sum())


def _assert_recovers(recon, truth, *, scale_tol=0.03, shells=GOOD_SHELLS):
    f = fsc(recon, truth)
    assert np.all(f[shells] > 0.9), np.round(f, 3)
    assert abs(_scale(recon, truth) - 1.0) < scale_tol


@pytest.fixture(scope="module")
def c1_data():
    rng = np.random.default_rng(2024)
    vol = _asymmetric_volume(rng)
    rots = random_rotations(4000, rng)
    origins = rng.uniform(-3, 3, (4000, 2))
    return vol, rots, origins, project(vol, rots, origins_px=origins)


@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
def test_round_trip_recovers_planted_volume(c1_data, interpolation):
    vol, rots, origins, images = c1_data
    recon = reconstruct(images, rots, origins_px=origins, interpolation=interpolation)
    assert recon.shape == vol.shape and recon.dtype == np.float32
    _assert_recovers(recon, vol)


@pytest.mark.parametrize("n, npad", [(31, 2), (33, 3), (32, 3)])
def test_round_trip_odd_boxes_and_padding(n, npad):
    rng = np.random.default_rng(1)
    vol = _asymmetric_volume(rng, n=n)
    rots = random_rotations(2000, rng)
    origins = rng.uniform(-2, 2, (2000, 2))
    images = project(vol, rots, origins_px=origins, npad=npad)
    for interpolation in ("linear", "nearest"):
        recon = reconstruct(images, rots, origins_px=origins, npad=npad, interpolation=interpolation)
        _assert_recovers(recon, vol, shells=slice(1, int(0.8 * n / 2) + 1))


def test_origins_are_needed_and_used_with_the_right_sign(c1_data):
    vol, rots, origins, images = c1_data
    for wrong in (None, -origins[:1000]):
        recon = reconstruct(images[:1000], rots[:1000], origins_px=wrong)
        assert fsc(recon, vol)[GOOD_SHELLS].min() < 0.5


def test_reprojection_matches_projection(c1_data, rng):
    """Contract: project(reconstruct(project(V))) ~ project(V) (same ray-sum scale)."""
    vol, rots, origins, images = c1_data
    recon = reconstruct(images, rots, origins_px=origins)
    new = random_rotations(5, rng)
    p_true, p_rec = project(vol, new), project(recon, new)
    rel = np.sqrt(((p_rec - p_true) ** 2).mean() / (p_true**2).mean())
    assert rel < 0.03


@pytest.mark.parametrize("sym, n_views", [("c4", 1000), ("d3", 700), ("icos", 80)])
def test_symmetric_round_trip(sym, n_views):
    rng = np.random.default_rng(7)
    vol = _symmetric_volume(rng, sym)
    rots = random_rotations(n_views, rng)
    images = project(vol, rots)
    recon = reconstruct(images, rots, symmetry=sym)
    _assert_recovers(recon, vol)


def test_wrong_symmetry_fails():
    """Control for the symmetric round trips: imposing c5 on c4 data destroys the map."""
    rng = np.random.default_rng(7)
    vol = _symmetric_volume(rng, "c4")
    rots = random_rotations(500, rng)
    recon = reconstruct(project(vol, rots), rots, symmetry="c5")
    assert fsc(recon, vol)[GOOD_SHELLS].min() < 0.5


def _simple_ctf(n, apix, defocus_A, wavelength_A=0.0197, amp=0.1):
    """-sin(pi lambda df k^2 - asin(amp)) on an FFT-layout grid (Cs = 0), one per defocus."""
    k = np.fft.fftfreq(n) / apix
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    gamma = np.pi * wavelength_A * defocus_A[:, None, None] * k2 - np.arcsin(amp)
    return (-np.sin(gamma)).astype(np.float32)


@pytest.mark.parametrize("interpolation, padded_ctf", [("linear", False), ("nearest", True), ("nearest", False)])
def test_ctf_weighted_reconstruction_recovers_volume(c1_data, interpolation, padded_ctf):
    vol, rots, origins, images = c1_data
    rng = np.random.default_rng(3)
    defocus = rng.uniform(5000, 15000, len(rots))  # 0.5-1.5 um at 5 A/px: zeros vary between images
    ctf = _simple_ctf(N, 5.0, defocus)
    ctf_images = np.fft.ifft2(np.fft.fft2(images) * ctf).real.astype(np.float32)
    given = _simple_ctf(2 * N, 5.0, defocus) if padded_ctf else ctf
    recon = reconstruct(ctf_images, rots, origins_px=origins, ctf=given, interpolation=interpolation)
    _assert_recovers(recon, vol, scale_tol=0.05)
    # control: ignoring the CTF gives a poor map
    plain = reconstruct(ctf_images[:1000], rots[:1000], origins_px=origins[:1000])
    assert fsc(plain, vol)[GOOD_SHELLS].min() < 0.9


@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
def test_merged_accumulators_equal_one_accumulator(c1_data, interpolation):
    vol, rots, origins, images = c1_data
    n = 600
    ctf = _simple_ctf(N, 5.0, np.linspace(5000, 15000, n))
    whole = FourierAccumulator(N, interpolation=interpolation, symmetry="c2")
    whole.insert(images[:n], rots[:n], origins[:n], ctf)
    a = FourierAccumulator(N, interpolation=interpolation, symmetry="c2")
    b = FourierAccumulator(N, interpolation=interpolation, symmetry="c2")
    a.insert(images[:250], rots[:250], origins[:250], ctf[:250])
    b.insert(images[250:n], rots[250:n], origins[250:n], ctf[250:n])
    a.merge(b)
    assert a.n_inserted == whole.n_inserted == n
    np.testing.assert_allclose(a.weights, whole.weights, rtol=1e-4, atol=1e-4 * whole.weights.max())
    np.testing.assert_allclose(a.data, whole.data, rtol=1e-4, atol=1e-4 * np.abs(whole.data).max())
    np.testing.assert_allclose(a.finish(), whole.finish(), atol=1e-4 * np.abs(vol).max())


def test_allreduce_style_sum_of_arrays_equals_merge(c1_data):
    """What an MPI executor does: sum .data and .weights element-wise, then finish."""
    vol, rots, origins, images = c1_data
    parts = []
    for sl in (slice(0, 300), slice(300, 500)):
        acc = FourierAccumulator(N)
        acc.insert(images[sl], rots[sl], origins[sl])
        parts.append(acc)
    total = FourierAccumulator(N)
    total.data = parts[0].data + parts[1].data
    total.weights = parts[0].weights + parts[1].weights
    merged = parts[0].merge(parts[1])
    np.testing.assert_array_equal(total.finish(), merged.finish())


def test_chunked_reading_is_bounded_and_invariant(c1_data):
    vol, rots, origins, images = c1_data

    class Lazy:
        """Minimal LazyImages stand-in that records the largest slice read."""

        def __init__(self, arr):
            self.arr, self.largest = arr, 0
            self.shape = arr.shape

        def __len__(self):
            return len(self.arr)

        def __getitem__(self, sl):
            out = self.arr[sl]
            self.largest = max(self.largest, len(out))
            return out

    lazy = Lazy(images[:200])
    small = reconstruct(lazy, rots[:200], origins_px=origins[:200], chunk_size=7)
    assert lazy.largest == 7
    ref = reconstruct(images[:200], rots[:200], origins_px=origins[:200])
    np.testing.assert_allclose(small, ref, atol=1e-4 * np.abs(ref).max())


def test_absolute_snr_regulariser_damps(c1_data):
    vol, rots, origins, images = c1_data
    acc = FourierAccumulator(N, interpolation="nearest")
    acc.insert(images[:500], rots[:500], origins[:500])
    exact = acc.finish(regularisation=0.0)
    np.testing.assert_allclose(acc.finish(snr=1e9), exact, atol=1e-5 * np.abs(exact).max())
    damped = acc.finish(snr=1e-3)  # W + 1000 shrinks every voxel estimate
    assert np.abs(damped).sum() < np.abs(exact).sum()


@pytest.mark.parametrize("n", [16, 15])
def test_nn4_level_and_mask(n):
    z, y, x = np.mgrid[:n, :n, :n] - n // 2
    r2 = x**2 + y**2 + z**2
    blob = np.exp(-r2 / 4.0).astype(np.float32)
    out = nn4_level_and_mask(blob + 3.0)
    inside = r2 <= (n // 2) ** 2
    assert np.all(out[~inside] == 0)
    shell = inside & (r2 >= (n // 2 - 1) ** 2)
    np.testing.assert_allclose(out[shell].mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(out[inside], blob[inside] - blob[shell].mean(), atol=1e-5)


def test_bad_inputs_raise(c1_data):
    vol, rots, origins, images = c1_data
    with pytest.raises(ValueError):
        FourierAccumulator(N, interpolation="cubic")
    with pytest.raises(ValueError):
        FourierAccumulator(N, symmetry="q7")
    acc = FourierAccumulator(N)
    with pytest.raises(ValueError):
        acc.insert(images[:3], rots[:2])
    with pytest.raises(ValueError):
        acc.insert(images[:2], 2.0 * rots[:2])  # not orthonormal
    with pytest.raises(ValueError):
        acc.insert(images[:2], rots[:2], ctf=np.ones((2, 5, 5), np.float32))
    with pytest.raises(ValueError):
        acc.merge(FourierAccumulator(N, symmetry="c2"))
    with pytest.raises(ValueError):
        reconstruct(images[:2, :, :-1], rots[:2])


# --------------------------------------------------------------------------------------
# RELION parity (Debian's relion 3.1): same images, same star metadata -> same map
# --------------------------------------------------------------------------------------


@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_reconstruct") is None, reason="relion_reconstruct is not installed")
def test_reconstruction_matches_relion_reconstruct(tmp_path, c1_data):
    mrcfile = pytest.importorskip("mrcfile")
    vol, rots, origins, images = c1_data
    n = 1500
    with mrcfile.new(tmp_path / "parts.mrcs") as m:
        m.set_data(images[:n])
        m.voxel_size = 1.0
    rot, tilt, psi = matrix_to_euler(rots[:n])
    lines = [
        "data_optics",
        "loop_",
        "_rlnOpticsGroup #1",
        "_rlnOpticsGroupName #2",
        "_rlnImagePixelSize #3",
        "_rlnImageSize #4",
        "_rlnImageDimensionality #5",
        "_rlnVoltage #6",
        "_rlnSphericalAberration #7",
        "_rlnAmplitudeContrast #8",
        f"1 opticsGroup1 1.0 {N} 2 300 2.7 0.1",
        "",
        "data_particles",
        "loop_",
        "_rlnAngleRot #1",
        "_rlnAngleTilt #2",
        "_rlnAnglePsi #3",
        "_rlnOriginXAngst #4",
        "_rlnOriginYAngst #5",
        "_rlnOpticsGroup #6",
        "_rlnImageName #7",
    ]
    for i in range(n):
        lines.append(
            f"{rot[i]:.6f} {tilt[i]:.6f} {psi[i]:.6f} {origins[i, 0]:.6f} {origins[i, 1]:.6f} 1 {i + 1:06d}@parts.mrcs"
        )
    (tmp_path / "parts.star").write_text("\n".join(lines) + "\n")
    subprocess.run(
        ["relion_reconstruct", "--i", "parts.star", "--o", "relion.mrc", "--angpix", "1"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    relion = mrcfile.read(tmp_path / "relion.mrc").astype(np.float32)
    ours = reconstruct(images[:n], rots[:n], origins_px=origins[:n])
    assert np.corrcoef(ours.ravel(), relion.ravel())[0, 1] > 0.995
    assert np.corrcoef(relion.ravel(), vol.ravel())[0, 1] > 0.995  # RELION reads our metadata as meant
    assert abs(_scale(ours, relion) - 1.0) < 0.05
