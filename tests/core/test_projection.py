"""Fourier-slice projection: planted blob positions, ray-sum scale, origin sign, RELION parity."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from isavar.conventions import euler_to_matrix
from isavar.core.geometry import random_rotations
from isavar.core.projection import Projector, project


def _gauss_volume(n, centres, sigmas, amps):
    z, y, x = np.mgrid[:n, :n, :n] - n // 2
    vol = np.zeros((n, n, n), np.float64)
    for c, s, a in zip(centres, sigmas, amps):
        vol += a * np.exp(-((x - c[0]) ** 2 + (y - c[1]) ** 2 + (z - c[2]) ** 2) / (2 * s * s))
    return vol.astype(np.float32)


def _gauss_image(n, centre_xy, sigma, amp):
    """Exact ray sum of a 3D Gaussian: a 2D Gaussian of amplitude amp * sqrt(2 pi) sigma."""
    y, x = np.mgrid[:n, :n] - n // 2
    r2 = (x - centre_xy[0]) ** 2 + (y - centre_xy[1]) ** 2
    return amp * np.sqrt(2 * np.pi) * sigma * np.exp(-r2 / (2 * sigma * sigma))


@pytest.mark.parametrize("n", [32, 31])
def test_planted_blob_appears_at_A_X_minus_origin(rng, n):
    centre = np.array([5.0, -3.0, 2.5])
    sigma = 1.5
    vol = _gauss_volume(n, [centre], [sigma], [1.0])
    rots = random_rotations(12, rng)
    origins = rng.uniform(-3, 3, (12, 2))
    proj = project(vol, rots, origins_px=origins)
    assert proj.shape == (12, n, n) and proj.dtype == np.float32
    y, x = np.mgrid[:n, :n] - n // 2
    for p, a, o in zip(proj, rots, origins):
        expected = (a @ centre)[:2] - o
        # centroid in a disc centred on the expected position (unbiased if the blob is there)
        w = (x - expected[0]) ** 2 + (y - expected[1]) ** 2 < 25
        cx = (p * x)[w].sum() / p[w].sum()
        cy = (p * y)[w].sum() / p[w].sum()
        assert abs(cx - expected[0]) < 0.05 and abs(cy - expected[1]) < 0.05
        # pixel values are ray sums: matches the analytic projection to ~1% of the peak
        ref = _gauss_image(n, expected, sigma, 1.0)
        assert np.abs(p - ref).max() < 0.03 * ref.max()
        assert np.corrcoef(p.ravel(), ref.ravel())[0, 1] > 0.999


def test_wrong_sign_conventions_would_be_caught(rng):
    """Sanity of the planted-blob test: a transposed matrix puts the blob elsewhere."""
    n = 32
    centre = np.array([6.0, -2.0, 4.0])
    vol = _gauss_volume(n, [centre], [1.5], [1.0])
    a = euler_to_matrix(40.0, 70.0, -30.0)
    good = project(vol, a[None])[0]
    ref = _gauss_image(n, (a @ centre)[:2], 1.5, 1.0)
    wrong = _gauss_image(n, (a.T @ centre)[:2], 1.5, 1.0)
    assert np.corrcoef(good.ravel(), ref.ravel())[0, 1] > 0.999
    assert np.corrcoef(good.ravel(), wrong.ravel())[0, 1] < 0.5


def _sinc2_profile(n, m):
    s = np.sinc((np.arange(n) - n // 2) / m) ** 2
    return s[:, None, None] * s[None, :, None] * s[None, None, :]


def test_identity_projection_is_sum_along_z(rng):
    n = 32
    vol = _gauss_volume(n, rng.uniform(-6, 6, (5, 3)), rng.uniform(1.2, 2.0, 5), rng.uniform(0.5, 1.5, 5))
    p = project(vol, np.eye(3)[None])[0]
    # Identity samples fall exactly on the padded grid, so the result is exactly the z-sum of the
    # gridding-pre-corrected volume (vol / sinc^2), up to float32 round-off ...
    exact = (vol / _sinc2_profile(n, 2 * n)).sum(axis=0)
    np.testing.assert_allclose(p, exact, atol=2e-4 * exact.max())
    # ... which is the plain ray sum to within the pre-correction (< 5% for content within r = 8 px).
    plain = vol.sum(axis=0)
    assert np.abs(p - plain).max() < 0.05 * plain.max()


@pytest.mark.parametrize("n", [16, 17])
def test_integer_origin_is_a_roll_by_minus_origin(rng, n):
    vol = _gauss_volume(n, rng.uniform(-3, 3, (3, 3)), [1.2, 1.5, 1.0], [1.0, 0.7, 1.3])
    a = random_rotations(2, rng)
    p0 = project(vol, a)
    origins = np.array([[2.0, -3.0], [-1.0, 4.0]])
    p = project(vol, a, origins_px=origins)
    for i, (ox, oy) in enumerate(origins.astype(int)):
        # particle centre moves to N//2 - origin
        np.testing.assert_allclose(p[i], np.roll(p0[i], (-oy, -ox), axis=(0, 1)), atol=1e-4)


def test_chunking_and_projector_reuse_do_not_change_results(rng):
    vol = _gauss_volume(20, rng.uniform(-4, 4, (4, 3)), [1.3] * 4, [1.0] * 4)
    a = random_rotations(9, rng)
    o = rng.normal(size=(9, 2))
    ref = project(vol, a, origins_px=o)
    pr = Projector(vol)
    np.testing.assert_allclose(pr.project(a, origins_px=o, chunk_size=2), ref, atol=1e-5)
    np.testing.assert_allclose(pr.project(a[4:5], origins_px=o[4]), ref[4:5], atol=1e-5)


def test_projection_is_linear(rng):
    n = 20
    v1 = _gauss_volume(n, rng.uniform(-4, 4, (3, 3)), [1.3] * 3, [1.0] * 3)
    v2 = _gauss_volume(n, rng.uniform(-4, 4, (3, 3)), [1.1] * 3, [0.5] * 3)
    a = random_rotations(4, rng)
    np.testing.assert_allclose(
        project(2.0 * v1 - 0.5 * v2, a), 2.0 * project(v1, a) - 0.5 * project(v2, a), atol=1e-4
    )


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        project(np.zeros((8, 8, 9), np.float32), np.eye(3)[None])
    with pytest.raises(ValueError):
        project(np.zeros((8, 8, 8), np.float32), np.eye(4)[None])
    with pytest.raises(ValueError):
        project(np.zeros((8, 8, 8), np.float32), np.eye(3)[None], origins_px=np.zeros((2, 2)))
    vol = np.zeros((8, 8, 8), np.float32)
    vol[0, 0, 0] = np.nan
    with pytest.raises(ValueError):
        project(vol, np.eye(3)[None])


# --------------------------------------------------------------------------------------
# RELION parity (Debian's relion 3.1): pins the Euler and origin sign conventions
# --------------------------------------------------------------------------------------

_RELION_ANGLES = np.array(
    [
        # rot, tilt, psi, originX (px), originY (px)
        [30.0, 50.0, 70.0, 2.0, -3.0],
        [0.0, 0.0, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.0, 3.0, 0.0],
        [120.0, 100.0, -40.0, -1.5, 2.5],
        [10.0, 170.0, 200.0, 0.0, 0.0],
        [-75.0, 35.0, 15.0, 0.0, -2.0],
    ]
)


@pytest.mark.relion
@pytest.mark.skipif(shutil.which("relion_project") is None, reason="relion_project is not installed")
def test_projection_matches_relion_project(tmp_path, rng):
    mrcfile = pytest.importorskip("mrcfile")
    n = 32
    vol = _gauss_volume(n, rng.uniform(-7, 7, (6, 3)), rng.uniform(1.2, 2.2, 6), rng.uniform(0.5, 1.5, 6))
    with mrcfile.new(tmp_path / "vol.mrc") as m:
        m.set_data(vol)
        m.voxel_size = 1.0
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
        f"1 opticsGroup1 1.0 {n} 2 300 2.7 0.1",
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
    for i, (rot, tilt, psi, ox, oy) in enumerate(_RELION_ANGLES):
        lines.append(f"{rot} {tilt} {psi} {ox} {oy} 1 {i + 1:06d}@dummy.mrcs")
    (tmp_path / "ang.star").write_text("\n".join(lines) + "\n")
    subprocess.run(
        ["relion_project", "--i", "vol.mrc", "--o", "proj", "--ang", "ang.star", "--angpix", "1"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    relion = mrcfile.read(tmp_path / "proj.mrcs")
    ang = _RELION_ANGLES
    ours = project(vol, euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2]), origins_px=ang[:, 3:5])
    for p, r in zip(ours, relion):
        assert np.corrcoef(p.ravel(), r.ravel())[0, 1] > 0.999
        assert abs((p * r).sum() / (r * r).sum() - 1.0) < 0.01  # same ray-sum scale
    # The opposite origin sign is clearly rejected (particle centre is at N//2 - origin).
    flipped = project(vol, euler_to_matrix(ang[0, 0], ang[0, 1], ang[0, 2])[None], origins_px=-ang[:1, 3:5])[0]
    assert np.corrcoef(flipped.ravel(), relion[0].ravel())[0, 1] < 0.9
