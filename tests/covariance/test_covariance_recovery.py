"""Planted truth: two states, a continuous motion, a homogeneous control, K above the truth, workers.

Data: the ``two_state`` phantom (a compact domain present in 30 % of the particles), random
orientations and origins, CTF (defocus 0.8-2.5 µm), white noise at SNR 0.1, as the issue asks.
Truth for var3D: ``sqrt(p (1 - p)) |A - B|`` (Pearson r inside the particle sphere). The first
latent must separate the states (ROC AUC). The homogeneous control (B only, same orientations,
defocus and noise) must give no component above the noise level and eigenvalues orders of
magnitude below the heterogeneous one's. The full-size runs (box 64, thousands of particles) are in
``bench/covariance_bench.py`` / ``bench/variability.md``.
"""

from __future__ import annotations

import numpy as np
import pytest

from isavar.covariance import CovarianceParams, covariance
from isavar.report.validation import masked_correlation, mixture_std_map, sphere_mask
from isavar.synthetic import phantom_volume, simulate_particles
from isavar.synthetic.phantoms import SWITCHABLE_DOMAIN, blob_model
from isavar.synthetic.simulate import particle_radius_px
from isavar.variability.run import particle_geometry

P = 0.3


def _auc(scores, labels):
    """ROC AUC of ``scores`` for label 1 vs 0, orientation-free (max(AUC, 1 - AUC))."""
    from scipy.stats import rankdata

    r = rankdata(scores)
    n1, n0 = int((labels == 1).sum()), int((labels == 0).sum())
    auc = (r[labels == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
    return max(auc, 1 - auc)


def _fit(volumes, weights, n, box, k, *, seed=5, snr=0.1, executor=None, iterations=20):
    pix = 3.0 * 64 / box
    images, table = simulate_particles(volumes, n, pixel_size_A=pix, snr=snr, ctf=True, weights=weights,
                                       shift_sd_A=3.0, rng=seed)
    geo = particle_geometry(table, pix, need_ctf=True)
    prm = CovarianceParams(n_components=k, ctf=True, iterations=iterations)
    return covariance(table, images, prm, geometry=geo, pixel_size_A=pix, executor=executor), table


def test_two_states_var3d_latent_and_extra_component():
    box = 32
    a, b = phantom_volume("two_state", box, 6.0)
    res, table = _fit([a, b], [P, 1 - P], 1500, box, 2)
    truth = mixture_std_map([a, b], [P, 1 - P])
    inside = sphere_mask(box, particle_radius_px(a))
    assert masked_correlation(res.var3d, truth, inside) >= 0.9
    labels = (table["true_conformation"].to_numpy() == 0).astype(int)
    assert _auc(res.latents[:, 0], labels) >= 0.95
    # K = 2 > truth (rank 1): the second component is at the noise level
    assert list(res.above_noise()) == [True, False]
    assert res.eigenvalues[1] < 1e-2 * res.eigenvalues[0]
    # the first component is the difference of the states
    assert abs(masked_correlation(res.components[0], a - b, res.mask > 0.5)) >= 0.8


@pytest.mark.slow
def test_homogeneous_control_has_no_component_above_noise():
    box = 32
    a, b = phantom_volume("two_state", box, 6.0)
    het, _ = _fit([a, b], [P, 1 - P], 1500, box, 2)
    hom, _ = _fit([b, b], [P, 1 - P], 1500, box, 2)
    assert not hom.above_noise().any()
    # eigenvalue as a fraction of the mean's energy: orders of magnitude below the heterogeneous one
    frac = lambda r: r.eigenvalues / float((r.mean.astype(np.float64) ** 2).sum())  # noqa: E731
    assert frac(hom).max() < 1e-2 * frac(het)[0]
    # no localised peak: var3D of the control does not pick out the domain
    truth = mixture_std_map([a, b], [P, 1 - P])
    inside = sphere_mask(box, particle_radius_px(a))
    assert masked_correlation(hom.var3d, truth, inside) < 0.5


def _rotating_domain(box, angles_deg):
    """Volumes of the blob phantom whose switchable domain turns by each angle about the z axis
    through the domain's contact point with the body."""
    model = blob_model()
    dom = model.domains == SWITCHABLE_DOMAIN
    body_centre = model.centres[~dom].mean(axis=0)
    dom_centre = model.centres[dom].mean(axis=0)
    pivot = body_centre + 0.6 * (dom_centre - body_centre)
    vols = []
    for t in np.deg2rad(angles_deg):
        c, s = np.cos(t), np.sin(t)
        rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        centres = model.centres.copy()
        centres[dom] = (centres[dom] - pivot) @ rot.T + pivot
        m = type(model)(centres, model.sigmas, model.amplitudes, model.domains)
        vols.append(m.render(box))
    peak = max(v.max() for v in vols)
    return [(v / peak).astype(np.float32) for v in vols]


@pytest.mark.slow
def test_continuous_motion_first_latent_follows_the_angle():
    """A domain turning by a uniform angle: latent 1 orders the particles by angle.

    A particle's latent is only as precise as its image is informative: at box 32 and SNR 0.1
    the rank correlation is limited to about 0.8 by per-image noise (measured 0.79, also with
    K = 1), so this small test uses SNR 0.3 (measured 0.90); the issue's criterion at box 64 and
    SNR 0.1 is checked in ``bench/covariance_bench.py`` (``bench/variability.md``).
    """
    from scipy.stats import spearmanr

    box = 32
    angles = np.linspace(-30.0, 30.0, 13)  # uniform angle, 13 steps of 5 degrees
    vols = _rotating_domain(box, angles)
    res, table = _fit(vols, np.ones(len(vols)), 2000, box, 2, snr=0.3)
    angle = angles[table["true_conformation"].to_numpy()]
    rho = spearmanr(res.latents[:, 0], angle).statistic
    assert abs(rho) >= 0.85
    assert res.above_noise()[0]


def test_same_result_for_any_number_of_workers():
    from isavar.parallel.pool import PoolExecutor

    box = 20
    a, b = phantom_volume("two_state", box, 9.6)
    pix = 9.6
    images, table = simulate_particles([a, b], 300, pixel_size_A=pix, snr=0.5, ctf=True, weights=[P, 1 - P],
                                       rng=2)
    geo = particle_geometry(table, pix, need_ctf=True)
    prm = CovarianceParams(n_components=2, ctf=True, iterations=3, chunk_size=64)
    one = covariance(table, images, prm, geometry=geo, pixel_size_A=pix)
    pool = PoolExecutor(2)
    try:
        two = covariance(table, images, prm, geometry=geo, pixel_size_A=pix, executor=pool)
    finally:
        pool.close()
    assert np.array_equal(one.components, two.components)
    assert np.array_equal(one.latents, two.latents)
    assert np.array_equal(one.mean, two.mean)


@pytest.mark.mpi
def test_3dva_under_mpi_equals_serial(tmp_path):
    """2 and 3 MPI ranks give the same maps and latents, bit for bit, as one process.

    300 particles in chunks of 64 make 5 chunks: 3 ranks get unequal blocks (2, 2, 1), so the
    accumulators are summed in another grouping than the serial run's; the exact (fixed-point)
    reduction makes that irrelevant.
    """
    import os
    import shutil
    import subprocess
    import sys

    from isavar.cli import main
    from isavar.io import read_particles, read_volume

    launcher = shutil.which("mpirun")
    if launcher is None:
        pytest.skip("no mpirun on this machine")
    pytest.importorskip("mpi4py")
    data = tmp_path / "data"
    assert main(["simulate", str(data), "--phantom", "two_state", "--n", "300", "--box", "24", "--apix", "8",
                 "--snr", "1", "--seed", "4", "-q"]) == 0
    opts = ["--components", "2", "--CTF", "--iterations", "3", "--chunk-size", "64", "-q"]
    assert main(["3dva", str(data / "particles.star"), str(tmp_path / "s"), *opts, "--executor", "serial"]) == 0
    serial_latents = read_particles(tmp_path / "s" / "particles.star").table[["latent_1", "latent_2"]].to_numpy()
    assert np.ptp(serial_latents[:, 0]) > 0
    for ranks in (2, 3):
        out = tmp_path / f"m{ranks}"
        args = [launcher, "-np", str(ranks), "--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
        res = subprocess.run(args + [sys.executable, "-m", "isavar", "3dva", str(data / "particles.star"), str(out),
                                     *opts, "--executor", "mpi"], capture_output=True, text=True, timeout=600,
                             check=False)
        assert res.returncode == 0, res.stderr
        for name in ("var3D.mrc", "component_01.mrc", "component_02.mrc", "mean.mrc"):
            assert np.array_equal(read_volume(tmp_path / "s" / name)[0], read_volume(out / name)[0]), (ranks, name)
        latents = read_particles(out / "particles.star").table[["latent_1", "latent_2"]].to_numpy()
        assert np.array_equal(serial_latents, latents), ranks
