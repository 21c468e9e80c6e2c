"""End-to-end 3D variability on simulated data with known answers (spec §8 T1, T5, --VAR, --SND).

Targets: the true 3D standard deviation of a two-state mixture is ``sqrt(p (1 - p)) |V1 - V2|``
(spec §7.3: exact for sign-consistent heterogeneity, which the two_state phantom is). Comparisons
are made inside the particle sphere after a least-squares fit ``a + b * truth`` (the reconstruction
has no absolute zero): b is the slope, r the Pearson correlation.

Tolerances: in the discrete-direction design (T1) each group holds copies of one view only, so the
2D std is ``sqrt(p_hat (1 - p_hat) G / (G - 1)) |P D|`` with p_hat the group's fraction; its mean over
groups is a few per cent below ``sqrt(p (1 - p))`` for G = 20 (Jensen), and bilinear rotation plus
Fourier gridding cost a few more per cent: slope in [0.85, 1.05]. Without heterogeneity the maps are
interpolation residue only.
"""

from __future__ import annotations

import numpy as np
import pytest

from isavar.synthetic import gaussian_blobs_volume, phantom_volume, simulate_particles
from isavar.variability.params import VariabilityParams
from isavar.variability.run import variability

BOX, PIX, P = 32, 3.0, 0.3


def _sphere(box, radius):
    c = box // 2
    z, y, x = np.ogrid[:box, :box, :box]
    return (z - c) ** 2 + (y - c) ** 2 + (x - c) ** 2 <= radius * radius


def _fit(var3d, truth, mask):
    x, y = truth[mask].astype(np.float64), var3d[mask].astype(np.float64)
    slope, offset = np.polyfit(x, y, 1)
    return slope, np.corrcoef(x, y)[0, 1]


@pytest.fixture(scope="module")
def states():
    a, b = phantom_volume("two_state", BOX, PIX)
    return a, b, np.sqrt(P * (1 - P)) * np.abs(a - b)


def _discrete(vols, weights, *, ctf, k=20, views=100, seed=3, shift=3.0):
    return simulate_particles(vols, k * views, pixel_size_A=PIX, snr=None, ctf=ctf, shift_sd_A=shift,
                              orientations=f"views:{views}", weights=weights, astigmatism_A=800.0, rng=seed)


@pytest.mark.parametrize("ctf", [False, True])
def test_t1_two_state_recovers_true_std_map(states, ctf):
    a, b, truth = states
    imgs, table = _discrete([a, b], [P, 1 - P], ctf=ctf)
    res = variability(table, imgs, VariabilityParams(img_per_grp=20, normalize=False, ctf=ctf), pixel_size_A=PIX)
    slope, r = _fit(res.var3d, truth, _sphere(BOX, BOX / 2 - 3))
    assert r > 0.98
    assert 0.82 < slope < 1.05
    assert res.var3d.shape == (BOX,) * 3 and res.ave3d.shape == (BOX,) * 3
    mean = P * a + (1 - P) * b
    assert np.corrcoef(res.ave3d[_sphere(BOX, 12)], mean[_sphere(BOX, 12)])[0, 1] > 0.99


@pytest.mark.parametrize("ctf", [False, True])
def test_t1_homogeneous_var3d_is_interpolation_residue(states, ctf):
    a, b, truth = states
    imgs, table = _discrete([b], None, ctf=ctf)
    res = variability(table, imgs, VariabilityParams(img_per_grp=20, normalize=False, ctf=ctf), pixel_size_A=PIX)
    assert np.abs(res.var3d).max() < 0.1 * truth.max()


def test_2d_maps_are_delivered_in_input_order(states):
    a, b, _ = states
    imgs, table = _discrete([a, b], [P, 1 - P], ctf=False, k=10, views=30)
    got = {}

    def sink(rows, ave, stat):
        for i, r in enumerate(rows):
            got[int(r)] = (ave[i], stat[i])

    variability(table, imgs, VariabilityParams(img_per_grp=10, normalize=False, chunk_size=64),
                pixel_size_A=PIX, map_sink=sink)
    assert sorted(got) == list(range(len(table)))
    # all members of a discrete view are the same image up to psi/shift: their group means agree
    view = table["true_view"].to_numpy()
    same = np.flatnonzero(view == view[0])
    spread = max(np.abs(got[int(i)][0] - got[int(same[0])][0]).max() for i in same)
    assert spread < 1e-4 * max(1.0, np.abs(got[int(same[0])][0]).max())


def test_results_do_not_depend_on_chunking_or_workers(states):
    from isavar.parallel.pool import PoolExecutor

    a, b, _ = states
    imgs, table = simulate_particles([a, b], 300, pixel_size_A=PIX, snr=2.0, ctf=False, weights=[P, 1 - P], rng=5)
    prm = VariabilityParams(img_per_grp=12, chunk_size=50)
    ref = variability(table, imgs, prm, pixel_size_A=PIX)
    pool = PoolExecutor(2)
    try:
        par = variability(table, imgs, prm, pixel_size_A=PIX, executor=pool)
    finally:
        pool.close()
    np.testing.assert_array_equal(par.var3d, ref.var3d)  # same tasks, summed in task order
    other = variability(table, imgs, prm.replace(chunk_size=77), pixel_size_A=PIX)
    np.testing.assert_allclose(other.var3d, ref.var3d, atol=1e-5 * np.abs(ref.var3d).max())


def test_symmetry_c4_with_heterogeneity_in_every_subunit():
    """T5: a c4 object whose four symmetric sites are occupied together with probability p; the c4
    analysis (neighbours from all symmetry copies, c4 reconstruction) recovers sqrt(p(1-p)) |D|."""
    r = np.random.default_rng(11)
    core_pts = r.uniform(-6, 6, (4, 3))
    quarter = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    rots = [np.linalg.matrix_power(quarter, k) for k in range(4)]
    base = gaussian_blobs_volume(np.concatenate([core_pts @ m.T for m in rots]), np.full(16, 2.5),
                                 np.full(16, 1.0), BOX)
    site = np.array([[8.0, 3.0, 4.0]])
    domain = gaussian_blobs_volume(np.concatenate([site @ m.T for m in rots]), np.full(4, 2.0), np.full(4, 1.2),
                                   BOX)
    truth = np.sqrt(P * (1 - P)) * domain
    imgs, table = simulate_particles([base + domain, base], 1000, pixel_size_A=PIX, snr=None, ctf=False,
                                     weights=[P, 1 - P], symmetry="c4", rng=2)
    res = variability(table, imgs, VariabilityParams(img_per_grp=40, normalize=False, symmetry="c4"),
                      pixel_size_A=PIX)
    slope, rr = _fit(res.var3d, truth, _sphere(BOX, BOX / 2 - 3))
    assert rr > 0.9
    assert 0.6 < slope < 1.1
    # the map itself is c4-symmetric (imposed by the reconstruction): compare with its 90-degree rotation
    c = BOX // 2  # 90 degrees about z through the centre N // 2: V'[z, y, x] = V[z, 2c - x, y]
    rotated = np.transpose(res.var3d, (0, 2, 1))[:, :, (2 * c - np.arange(BOX)) % BOX]
    assert np.corrcoef(rotated.ravel(), res.var3d.ravel())[0, 1] > 0.97


def _centred_projections(states):
    """The positive truth volume, a random 1,500-view table (origins 0) and its noise-free projections."""
    from isavar.conventions import euler_to_matrix
    from isavar.core.projection import project
    from isavar.synthetic.simulate import draw_particle_table

    _, _, truth = states
    table = draw_particle_table(1500, box=BOX, pixel_size_A=PIX, ctf=False, rng=4)
    table["origin_x_A"] = 0.0
    table["origin_y_A"] = 0.0
    rot = euler_to_matrix(table["angle_rot_deg"], table["angle_tilt_deg"], table["angle_psi_deg"])
    maps = project(truth.astype(np.float32), rot)
    return truth, table, maps


def test_var_mode_reconstructs_given_maps(states):
    """--VAR: maps inserted as given. Feeding the projections of a known positive volume returns it."""
    truth, table, maps = _centred_projections(states)
    res = variability(table, maps, VariabilityParams(var_input=True), pixel_size_A=PIX)
    assert res.ave3d is None
    slope, r = _fit(res.var3d, truth, _sphere(BOX, BOX / 2 - 3))
    assert r > 0.98 and 0.9 < slope < 1.1


def test_var_mode_decimated_scale_is_exact(states):
    """Q9 fix: reconstructing on a decimated grid and returning to the input grid keeps voxel values."""
    from isavar.variability.volume import resample_volume

    truth, table, maps = _centred_projections(states)
    res = variability(table, maps, VariabilityParams(var_input=True, decimate=0.5), pixel_size_A=PIX)
    assert res.working_box == BOX // 2 and res.var3d.shape == (BOX,) * 3
    band_limited = resample_volume(resample_volume(truth, res.working_box), BOX)
    slope, r = _fit(res.var3d, band_limited, _sphere(BOX, BOX / 2 - 3))
    assert r > 0.99 and 0.95 < slope < 1.05


def test_snd_mode_localises_heterogeneity(states):
    a, b, truth = states
    imgs, table = simulate_particles([a, b], 1500, pixel_size_A=PIX, snr=None, ctf=False, weights=[P, 1 - P], rng=3)
    res = variability(table, imgs, VariabilityParams(snd=True, normalize=False), pixel_size_A=PIX)
    # squared differences to the reprojection of the mean reconstruct a variance-like map (~ truth^2)
    _, r = _fit(res.var3d, truth ** 2, _sphere(BOX, BOX / 2 - 3))
    assert r > 0.9


def test_var3d_stat_var_reconstructs_variances(states):
    a, b, truth = states
    imgs, table = _discrete([a, b], [P, 1 - P], ctf=False, k=20, views=60)
    res = variability(table, imgs, VariabilityParams(img_per_grp=20, normalize=False, var3d_stat="var"),
                      pixel_size_A=PIX)
    mask = _sphere(BOX, BOX / 2 - 3)
    _, r_std = _fit(res.var3d, truth, mask)
    _, r_sq = _fit(res.var3d, truth ** 2, mask)
    assert r_std > 0.8  # still localised ...
    assert np.abs(res.var3d).max() > 0.3 * truth.max() ** 2  # ... on the variance scale


def test_missing_orientations_and_ctf_are_input_errors(states):
    from isavar.errors import InputError

    a, b, _ = states
    imgs, table = simulate_particles([a], 30, pixel_size_A=PIX, snr=None, ctf=False, rng=1)
    with pytest.raises(InputError, match="CTF"):
        variability(table, imgs, VariabilityParams(img_per_grp=5, ctf=True), pixel_size_A=PIX)
    with pytest.raises(InputError, match="orientation"):
        variability(table.drop(columns=["angle_tilt_deg"]), imgs, VariabilityParams(img_per_grp=5),
                    pixel_size_A=PIX)
    with pytest.raises(InputError, match="img_per_grp"):
        variability(table, imgs, VariabilityParams(img_per_grp=31), pixel_size_A=PIX)


@pytest.mark.parametrize("change", [{"decimate": 0.5}, {"window": 28}])
def test_reduced_working_grid_keeps_geometry_and_scale(states, change):
    """Decimation and windowing return volumes on the input grid with voxel values on the input scale
    (SPHIRE left them 1/decimate too large and magnified windows)."""
    a, b, truth = states
    imgs, table = _discrete([a, b], [P, 1 - P], ctf=False)
    full = variability(table, imgs, VariabilityParams(img_per_grp=20, normalize=False), pixel_size_A=PIX)
    small = variability(table, imgs, VariabilityParams(img_per_grp=20, normalize=False, **change), pixel_size_A=PIX)
    assert small.var3d.shape == (BOX,) * 3 and small.working_box < BOX
    mask = _sphere(BOX, BOX / 2 - 3)
    from isavar.variability.volume import resample_volume

    s_full, _ = _fit(full.var3d, truth, mask)
    band_limited = truth  # the truth as the coarser working grid can represent it
    if small.working_box < 28:
        band_limited = resample_volume(resample_volume(truth, small.working_box), BOX)
    s_small, r_small = _fit(small.var3d, band_limited, mask)
    assert r_small > 0.93
    # bilinear rotation blurs more on the coarse grid (the domain is 2-3 working pixels wide), so
    # peaks drop somewhat; the value scale itself is exact (test_var_mode_decimated_scale_is_exact)
    assert 0.75 * s_full < s_small < 1.15 * s_full
    mean = P * a + (1 - P) * b
    assert np.corrcoef(small.ave3d[mask], mean[mask])[0, 1] > 0.97


def test_filter_driven_working_box_is_exact(states):
    """With a low-pass, the reduced working box gives the same var3D as the full box with the same filter."""
    a, b, _ = states
    imgs, table = _discrete([a, b], [P, 1 - P], ctf=True)
    prm = VariabilityParams(img_per_grp=20, normalize=False, ctf=True, lowpass_fl=0.15, lowpass_aa=0.2)
    auto = variability(table, imgs, prm, pixel_size_A=PIX)
    full = variability(table, imgs, prm.replace(auto_decimate=False), pixel_size_A=PIX)
    assert auto.working_box < full.working_box == BOX
    mask = _sphere(BOX, BOX / 2 - 3)
    slope = np.polyfit(full.var3d[mask], auto.var3d[mask], 1)[0]
    assert np.corrcoef(full.var3d[mask], auto.var3d[mask])[0, 1] > 0.98
    assert 0.9 < slope < 1.1


def test_constant_noise_floor_does_not_reconstruct_into_a_shell():
    """A constant offset in every 2D map (the noise floor of std maps) gives ~0 after the per-map edge
    level is removed; without it the offset reconstructs into an edge-peaked 3D background."""
    from isavar.synthetic.simulate import draw_particle_table

    table = draw_particle_table(800, box=BOX, pixel_size_A=PIX, ctf=False, rng=6)
    maps = np.full((800, BOX, BOX), 0.7, np.float32)
    on = variability(table, maps, VariabilityParams(var_input=True), pixel_size_A=PIX).var3d
    off = variability(table, maps, VariabilityParams(var_input=True, subtract_edge_level=False),
                      pixel_size_A=PIX).var3d
    inside = _sphere(BOX, BOX / 2 - 3)
    assert np.abs(on[inside]).max() < 0.02 * np.abs(off[inside]).max()
    centre, edge = off[BOX // 2, BOX // 2, BOX // 2], off[BOX // 2, BOX // 2, BOX // 2 + 12]
    assert edge > centre > 0  # rises towards the edge
