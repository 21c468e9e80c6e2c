"""Tests of isavar.synthetic: phantoms, maps from atomic models and the particle simulator.

The simulator is tested by recovering what it planted: image positions against
the true orientation and origin, the CTF against the true defocus, the noise
level against the requested SNR, state and view frequencies against the
requested weights.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from isavar.conventions import electron_wavelength_A, euler_to_matrix, viewing_direction
from isavar.errors import InputError
from isavar.synthetic import (
    clean_images,
    draw_particle_table,
    gaussian_blobs_volume,
    phantom_volume,
    plan_simulation,
    simulate_particles,
    uniform_rotations,
    volume_from_model,
)
from isavar.synthetic.phantoms import SWITCHABLE_DOMAIN, BlobModel, blob_model, symmetric_blob_model
from isavar.synthetic.simulate import masked_variance, particle_radius_px

DATA = Path(__file__).resolve().parent / "data"


def _corr(a, b) -> float:
    a = np.asarray(a, np.float64).ravel() - np.mean(a)
    b = np.asarray(b, np.float64).ravel() - np.mean(b)
    return float(a @ b / np.sqrt((a @ a) * (b @ b)))


def _rotation_angle_deg(mats) -> np.ndarray:
    return np.degrees(np.arccos(np.clip((np.trace(mats, axis1=-2, axis2=-1) - 1) / 2, -1, 1)))


# --------------------------------------------------------------------------------------
# Phantoms
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("box", [32, 33])
@pytest.mark.parametrize("name", ["blob", "c4", "d2"])
def test_phantom_shape_dtype_scale(name, box):
    vol = phantom_volume(name, box, 1.5)
    assert vol.shape == (box, box, box) and vol.dtype == np.float32
    assert vol.max() == pytest.approx(1.0) and vol.min() >= 0.0


def test_phantom_is_deterministic_and_rejects_unknown_names():
    np.testing.assert_array_equal(phantom_volume("blob", 24, 1.0), phantom_volume("blob", 24, 3.0))
    with pytest.raises(ValueError, match="unknown phantom"):
        phantom_volume("sphere", 24, 1.0)
    with pytest.raises(ValueError, match="box"):
        phantom_volume("blob", 4, 1.0)


def test_gaussian_blobs_volume_axis_order():
    # A blob at (x, y, z) = (5, -3, 2) must peak at array index [z, y, x] = c + (2, -3, 5).
    vol = gaussian_blobs_volume([[5.0, -3.0, 2.0]], [1.5], [2.0], 24)
    assert np.unravel_index(np.argmax(vol), vol.shape) == (14, 9, 17)
    assert vol.max() == pytest.approx(2.0, rel=1e-6)


def test_blob_phantom_is_centred_compact_and_band_limited():
    box = 64
    vol = phantom_volume("blob", box, 2.0).astype(np.float64)
    z, y, x = np.indices(vol.shape) - box // 2
    com = [(vol * c).sum() / vol.sum() for c in (x, y, z)]
    np.testing.assert_allclose(com, 0.0, atol=0.5)
    r = np.sqrt(x**2 + y**2 + z**2)
    assert vol[r > 0.42 * box].sum() < 1e-3 * vol.sum()  # inside a sphere of radius ~0.35-0.4 box
    assert particle_radius_px(vol) < 0.4 * box
    power = np.abs(np.fft.fftn(vol)) ** 2
    k = np.sqrt(sum(f**2 for f in np.meshgrid(*[np.fft.fftfreq(box)] * 3, indexing="ij")))
    assert power[k > 0.4].sum() < 1e-6 * power.sum()  # smooth: (almost) nothing near Nyquist


def test_blob_phantom_has_no_pseudo_symmetry(rng):
    # Any rotation by more than 30 degrees must make the phantom clearly different.
    model, box = blob_model(), 24
    reference = model.render(box)
    mats = uniform_rotations(400, rng)
    mats = mats[_rotation_angle_deg(mats) > 30][:150]
    correlations = [_corr(reference, BlobModel(model.centres @ m.T, model.sigmas, model.amplitudes,
                                                model.domains).render(box)) for m in mats]
    assert max(correlations) < 0.8
    # Control: a small rotation keeps it similar (the measure is not blind).
    small = euler_to_matrix(5.0, 0.0, 0.0)
    assert _corr(reference, BlobModel(model.centres @ small.T, model.sigmas, model.amplitudes,
                                      model.domains).render(box)) > 0.9


def test_two_state_differs_by_one_compact_domain():
    box = 48
    state_a, state_b = phantom_volume("two_state", box, 2.0)
    np.testing.assert_array_equal(state_a, phantom_volume("blob", box, 2.0))
    diff = (state_a - state_b).astype(np.float64)
    assert diff.min() >= 0.0
    assert 0.03 < diff.sum() / state_a.sum() < 0.25
    # The missing density is one compact domain: 95 % of it within 0.15 box of its centre of mass.
    z, y, x = np.indices(diff.shape)
    centre = [(diff * c).sum() / diff.sum() for c in (z, y, x)]
    r = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    assert diff[r < 0.15 * box].sum() > 0.95 * diff.sum()
    assert np.count_nonzero(blob_model().domains == SWITCHABLE_DOMAIN) >= 3


def test_c4_phantom_is_c4_symmetric_and_not_more():
    box = 40
    vol = phantom_volume("c4", box, 2.0)
    inner = vol[:, 1:, 1:]  # rows/columns 1..N-1 are centred on N // 2, so rot90 turns them about the axis
    for k in (1, 2, 3):
        np.testing.assert_allclose(np.rot90(inner, k, axes=(1, 2)), inner, atol=1e-6)
    # No 2-fold about x (which would make it d4): flip y and z.
    flipped = vol[::-1, ::-1, :][1:, 1:, :]
    assert _corr(flipped, vol[1:, 1:, :]) < 0.9


@pytest.mark.parametrize("sym", ["d3", "tet"])
def test_symmetric_phantom_invariant_under_its_group(sym):
    from isavar.core.geometry import symmetry_matrices

    model, box = symmetric_blob_model(sym), 24
    reference = model.render(box)
    for mat in symmetry_matrices(sym)[1:]:
        moved = BlobModel(model.centres @ mat.T, model.sigmas, model.amplitudes, model.domains).render(box)
        np.testing.assert_allclose(moved, reference, atol=1e-5)


# --------------------------------------------------------------------------------------
# Maps from atomic models
# --------------------------------------------------------------------------------------


def _write_pdb(path, atoms):
    lines = []
    for k, (element, x, y, z) in enumerate(atoms, start=1):
        lines.append(f"HETATM{k:5d}  {element:<3s} UNK A   1    {x:8.3f}{y:8.3f}{z:8.3f}  1.00 20.00"
                     f"          {element:>2s}")
    path.write_text("\n".join(lines + ["END", ""]))


def test_volume_from_model_puts_atoms_where_expected(tmp_path):
    # Three heavy atoms: centre of mass at the origin, one far along +x, one along +y, one along +z.
    pdb = tmp_path / "three.pdb"
    _write_pdb(pdb, [("S", 12.0, 0.0, 0.0), ("S", 0.0, -8.0, 0.0), ("S", -12.0, 8.0, 0.0)])
    box, apix = 32, 2.0
    vol = volume_from_model(pdb, box, apix, resolution_A=4.0)
    assert vol.shape == (box, box, box) and vol.dtype == np.float32
    c = box // 2
    for x, y, z in ((12.0, 0.0, 0.0), (0.0, -8.0, 0.0), (-12.0, 8.0, 0.0)):
        zi, yi, xi = c + int(z / apix), c + int(y / apix), c + int(x / apix)
        local = vol[zi - 1:zi + 2, yi - 1:yi + 2, xi - 1:xi + 2]
        assert vol[zi, yi, xi] == local.max() > 0.5 * vol.max()


def test_volume_from_model_matches_gaussian_atoms_for_ubiquitin():
    import gemmi

    box, apix, resolution = 40, 2.0, 8.0
    vol = volume_from_model(DATA / "1ubi.pdb", box, apix, resolution_A=resolution)
    st_ = gemmi.read_structure(str(DATA / "1ubi.pdb"))
    st_.remove_waters()
    st_.remove_hydrogens()
    atoms = [a for chain in st_[0] for res in chain for a in res]
    pos = np.array([[a.pos.x, a.pos.y, a.pos.z] for a in atoms])
    mass = np.array([a.element.weight for a in atoms])
    z_number = np.array([a.element.atomic_number for a in atoms], dtype=np.float64)
    com = (pos * mass[:, None]).sum(0) / mass.sum()
    # Independent model: one Gaussian per atom, weight Z, sigma = 0.225 d (molmap), centred at the mass centre.
    reference = gaussian_blobs_volume((pos - com) / apix, 0.225 * resolution / apix, z_number, box)
    assert _corr(vol, reference) > 0.99
    for wrong in (reference.transpose(2, 1, 0), reference[::-1], reference[:, ::-1, ::-1]):
        assert _corr(vol, wrong) < 0.95  # the comparison detects swapped or flipped axes


def test_volume_from_model_reads_mmcif_like_pdb(tmp_path):
    import gemmi

    structure = gemmi.read_structure(str(DATA / "1ubi.pdb"))
    structure.setup_entities()
    cif = tmp_path / "1ubi.cif"
    structure.make_mmcif_document().write_file(str(cif))
    np.testing.assert_allclose(volume_from_model(cif, 32, 2.5, resolution_A=7.0),
                               volume_from_model(DATA / "1ubi.pdb", 32, 2.5, resolution_A=7.0), atol=1e-5)


def test_volume_from_model_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        volume_from_model(tmp_path / "missing.pdb", 32, 2.0)
    with pytest.raises(InputError, match="does not fit"):
        volume_from_model(DATA / "1ubi.pdb", 16, 1.0)


# --------------------------------------------------------------------------------------
# Particle tables: orientations, shifts, defocus, states
# --------------------------------------------------------------------------------------


def test_uniform_rotations_are_haar_distributed(rng):
    mats = uniform_rotations(20000, rng)
    np.testing.assert_allclose(mats @ mats.transpose(0, 2, 1), np.broadcast_to(np.eye(3), mats.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(mats), 1.0, atol=1e-12)
    # Haar measure: the third row (viewing direction) is uniform on the sphere (its z uniform in [-1, 1]),
    # the rotation angle has density (1 - cos w) / pi on [0, pi].
    assert stats.kstest(mats[:, 2, 2], stats.uniform(loc=-1, scale=2).cdf).pvalue > 1e-3
    w = np.radians(_rotation_angle_deg(mats))
    assert stats.kstest(w, lambda t: (t - np.sin(t)) / np.pi).pvalue > 1e-3
    assert np.linalg.norm(mats[:, 2].mean(0)) < 0.03


def test_table_angles_reproduce_uniform_orientations():
    table = draw_particle_table(5000, box=32, pixel_size_A=1.0, rng=3)
    cos_tilt = np.cos(np.radians(table["true_angle_tilt_deg"]))
    assert stats.kstest(cos_tilt, stats.uniform(loc=-1, scale=2).cdf).pvalue > 1e-3
    assert stats.kstest(table["true_angle_psi_deg"], stats.uniform(loc=-180, scale=360).cdf).pvalue > 1e-3
    assert stats.kstest(table["true_angle_rot_deg"], stats.uniform(loc=-180, scale=360).cdf).pvalue > 1e-3
    for name in ("angle_rot_deg", "angle_tilt_deg", "angle_psi_deg", "origin_x_A", "origin_y_A",
                 "defocus_u_A", "defocus_v_A", "defocus_angle_deg"):
        np.testing.assert_array_equal(table[name], table["true_" + name])
    assert (table["optics_group"] == 1).all() and (table["image_index"] == np.arange(5000)).all()


def test_views_orientations_share_directions_and_are_balanced():
    n, k = 103, 10
    table = draw_particle_table(n, box=32, pixel_size_A=1.0, orientations="views:10", rng=5)
    counts = np.bincount(table["true_view"], minlength=k)
    assert counts.max() - counts.min() <= 1 and counts.sum() == n
    dirs = viewing_direction(table["true_angle_rot_deg"], table["true_angle_tilt_deg"])
    mats = euler_to_matrix(table["true_angle_rot_deg"], table["true_angle_tilt_deg"], table["true_angle_psi_deg"])
    np.testing.assert_allclose(mats[:, 2], dirs, atol=1e-12)
    for v in range(k):
        members = dirs[table["true_view"].to_numpy() == v]
        np.testing.assert_allclose(members, np.broadcast_to(members[0], members.shape), atol=1e-12)
        assert np.ptp(table["true_angle_psi_deg"][table["true_view"] == v]) > 10  # in-plane angles vary
    assert len({tuple(np.round(d, 6)) for d in dirs}) == k


def test_shifts_and_defocus_follow_the_requested_distributions():
    n = 20000
    table = draw_particle_table(n, box=32, pixel_size_A=1.5, shift_sd_A=3.0, defocus_range_A=(8000, 25000),
                                astigmatism_A=400.0, rng=11)
    origins = table[["true_origin_x_A", "true_origin_y_A"]].to_numpy()
    np.testing.assert_allclose(origins.std(0), 3.0, rtol=0.03)
    np.testing.assert_allclose(origins.mean(0), 0.0, atol=0.1)
    mean_df = (table["defocus_u_A"] + table["defocus_v_A"]) / 2
    assert mean_df.min() >= 8000 and mean_df.max() <= 25000
    assert stats.kstest(mean_df, stats.uniform(loc=8000, scale=17000).cdf).pvalue > 1e-3
    astig = table["defocus_u_A"] - table["defocus_v_A"]
    assert astig.min() >= 0 and astig.max() <= 400
    assert table["defocus_angle_deg"].between(0, 180).all()
    assert (table["voltage_kV"] == 300).all() and (table["cs_mm"] == 2.7).all()
    assert (table["amplitude_contrast"] == 0.1).all()


def test_no_ctf_table_has_no_ctf_columns():
    table = draw_particle_table(10, box=32, pixel_size_A=1.0, ctf=False, rng=0)
    assert not any("defocus" in c for c in table.columns) and "voltage_kV" not in table.columns


def test_mixture_weights_are_respected():
    n = 20000
    table = draw_particle_table(n, box=32, pixel_size_A=1.0, n_states=3, weights=[5, 3, 2], rng=8)
    counts = np.bincount(table["true_conformation"], minlength=3)
    expected = np.array([0.5, 0.3, 0.2])
    sd = np.sqrt(expected * (1 - expected) / n)
    assert np.all(np.abs(counts / n - expected) < 4 * sd)


def test_noise_fraction_is_exact_and_marked():
    table = draw_particle_table(200, box=32, pixel_size_A=1.0, n_states=2, noise_fraction=0.15,
                                orientations="views:4", rng=2)
    noise = table["true_is_noise"].to_numpy() == 1
    assert noise.sum() == 30
    assert (table["true_conformation"][noise] == -1).all() and (table["true_view"][noise] == -1).all()
    assert (table["true_conformation"][~noise] >= 0).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"orientations": "views:0"}, "orientations"),
    ({"orientations": "grid"}, "orientations"),
    ({"n_states": 2, "weights": [1.0, -1.0]}, "weights"),
    ({"n_states": 2, "weights": [1.0]}, "weights"),
    ({"noise_fraction": 1.5}, "noise_fraction"),
    ({"defocus_range_A": (20000, 10000)}, "defocus"),
])
def test_table_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        draw_particle_table(10, box=32, pixel_size_A=1.0, rng=0, **kwargs)


def test_simulate_rejects_bad_volumes_and_symmetry():
    vol = phantom_volume("blob", 16, 1.0)
    with pytest.raises(ValueError, match="shape"):
        simulate_particles([vol, np.zeros((12, 12, 12), np.float32)], 4, pixel_size_A=1.0, rng=0)
    with pytest.raises(ValueError, match="symmetry"):
        simulate_particles(vol, 4, pixel_size_A=1.0, symmetry="c4x", rng=0)
    with pytest.raises(ValueError, match="noise"):
        simulate_particles(vol, 4, pixel_size_A=1.0, snr=None, noise_fraction=0.5, rng=0)


# --------------------------------------------------------------------------------------
# Images: planted geometry, CTF and noise
# --------------------------------------------------------------------------------------


def test_noise_free_images_equal_projections_at_the_true_pose():
    from isavar.core.projection import project

    vol = phantom_volume("blob", 32, 2.0)
    images, table = simulate_particles(vol, 12, pixel_size_A=2.0, snr=None, ctf=False, shift_sd_A=4.0, rng=4)
    assert images.dtype == np.float32 and images.shape == (12, 32, 32)
    mats = euler_to_matrix(table["true_angle_rot_deg"], table["true_angle_tilt_deg"], table["true_angle_psi_deg"])
    origins = table[["true_origin_x_A", "true_origin_y_A"]].to_numpy() / 2.0
    np.testing.assert_allclose(images, project(vol, mats, origins_px=origins), atol=1e-5 * np.abs(images).max())


@pytest.mark.parametrize("box", [48, 47])
def test_image_of_a_point_lands_at_A_X_minus_origin(box):
    # One Gaussian blob at X0: its image is a 2D Gaussian centred at (A X0)[:2] - origin / pixel size
    # (relative to pixel N // 2); its centre is found by a least-squares Gaussian fit.
    from scipy.optimize import least_squares

    apix, sigma = 2.0, 1.5
    x0 = np.array([6.0, -4.0, 3.0])
    vol = gaussian_blobs_volume([x0], [sigma], [1.0], box)
    images, table = simulate_particles(vol, 20, pixel_size_A=apix, snr=None, ctf=False, shift_sd_A=4.0, rng=9)
    mats = euler_to_matrix(table["true_angle_rot_deg"], table["true_angle_tilt_deg"], table["true_angle_psi_deg"])
    expected = (mats @ x0)[:, :2] - table[["true_origin_x_A", "true_origin_y_A"]].to_numpy() / apix
    c = np.arange(box) - box // 2

    def model(p):
        return p[2] * np.exp(-((c[None, :] - p[0]) ** 2 + (c[:, None] - p[1]) ** 2) / (2 * sigma**2))

    for image, centre in zip(images, expected):
        peak = np.unravel_index(np.argmax(image), image.shape)
        start = [c[peak[1]], c[peak[0]], image.max()]
        fit = least_squares(lambda p: (model(p) - image).ravel(), start).x
        np.testing.assert_allclose(fit[:2], centre, atol=0.02)
    assert np.abs(table[["true_origin_x_A", "true_origin_y_A"]].to_numpy()).max() > 2.0  # shifts were exercised


def _independent_ctf(shape, apix, u, v, angle_deg, voltage_kV=300.0, cs_mm=2.7, w=0.1):
    """RELION's CTF written out here from the textbook formula (not from isavar.core.ctf)."""
    ky = np.fft.fftfreq(shape[0])[:, None] / apix
    kx = np.fft.rfftfreq(shape[1])[None, :] / apix
    k2 = kx**2 + ky**2
    theta = np.arctan2(ky, kx)
    defocus = 0.5 * (u + v) + 0.5 * (u - v) * np.cos(2 * (theta - np.radians(angle_deg)))
    lam = electron_wavelength_A(voltage_kV)
    chi = np.pi * lam * defocus * k2 - 0.5 * np.pi * cs_mm * 1e7 * lam**3 * k2**2
    return np.sin(chi + np.arcsin(w))


def test_ctf_of_each_image_is_the_true_defocus():
    from isavar.core.projection import project

    box, apix = 64, 2.0
    # Sharp blobs (sigma 1.25 px): their spectrum reaches close to Nyquist, so many CTF rings are checked.
    centres = np.random.default_rng(0).uniform(-10, 10, size=(6, 3))
    vol = gaussian_blobs_volume(centres, 1.25, 1.0, box)
    images, table = simulate_particles(vol, 4, pixel_size_A=apix, snr=None, ctf=True, astigmatism_A=2000.0,
                                       defocus_range_A=(10000, 20000), rng=21)
    mats = euler_to_matrix(table["true_angle_rot_deg"], table["true_angle_tilt_deg"], table["true_angle_psi_deg"])
    projections = project(vol, mats)
    k = np.sqrt(np.fft.fftfreq(box)[:, None] ** 2 + np.fft.rfftfreq(box)[None, :] ** 2)
    for i, row in enumerate(table.itertuples()):
        f_proj = np.fft.rfft2(projections[i].astype(np.float64))
        ratio = np.fft.rfft2(images[i].astype(np.float64))
        usable = (np.abs(f_proj) > 1e-3 * np.abs(f_proj).max()) & (k < 0.45)
        ratio = ratio[usable] / f_proj[usable]
        truth = _independent_ctf((box, box), apix, row.true_defocus_u_A, row.true_defocus_v_A,
                                 row.true_defocus_angle_deg)[usable]
        assert usable.sum() > 1000
        np.testing.assert_allclose(ratio.real, truth, atol=2e-3)
        np.testing.assert_allclose(ratio.imag, 0.0, atol=2e-3)
        # Sensitivity: the astigmatism axis rotated by 90 degrees would not match.
        wrong = _independent_ctf((box, box), apix, row.true_defocus_u_A, row.true_defocus_v_A,
                                 row.true_defocus_angle_deg + 90.0)[usable]
        assert np.abs(ratio.real - wrong).max() > 0.1


def test_snr_matches_request_against_the_clean_signal():
    vol = phantom_volume("blob", 40, 2.0)
    plan = plan_simulation(vol, 600, pixel_size_A=2.0, snr=0.3, shift_sd_A=2.0, rng=13)
    images = plan.images(chunk_size=200)
    clean = clean_images(plan.volumes, plan.table)
    noise = images - clean
    measured = masked_variance(clean, plan.mask_radius_px).mean() / noise.var()
    assert measured == pytest.approx(0.3, rel=0.1)
    assert noise.mean() == pytest.approx(0.0, abs=0.01 * float(noise.std()))
    # White: the noise spectrum is flat (first vs. last quarter of the frequencies within 10 %).
    power = np.abs(np.fft.rfft2(noise[:100])) ** 2
    radial = np.sqrt(np.fft.fftfreq(40)[:, None] ** 2 + np.fft.rfftfreq(40)[None, :] ** 2)
    assert power[..., radial < 0.2].mean() == pytest.approx(power[..., (radial > 0.3) & (radial < 0.5)].mean(),
                                                            rel=0.1)


def test_snr_measured_from_the_images_alone():
    # No CTF and no shifts: pixels outside the particle hold only noise, so the images themselves tell
    # the SNR. 1500 images, of which only the first 512 set the noise level.
    box = 40
    vol = phantom_volume("blob", box, 2.0)
    images, table = simulate_particles(vol, 1500, pixel_size_A=2.0, snr=0.5, ctf=False, rng=17,
                                       mask_radius_px=particle_radius_px(vol))
    radius = particle_radius_px(vol)
    c = np.arange(box) - box // 2
    r = np.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    noise_var = images[:, r > radius + 4].var()
    signal_var = masked_variance(images, radius).mean() - noise_var
    assert signal_var / noise_var == pytest.approx(0.5, rel=0.1)


def test_pure_noise_images_hold_only_noise():
    vol = phantom_volume("blob", 32, 2.0)
    plan = plan_simulation(vol, 100, pixel_size_A=2.0, snr=1.0, noise_fraction=0.2, rng=6)
    images = plan.images()
    noise = plan.table["true_is_noise"].to_numpy() == 1
    assert noise.sum() == 20
    assert np.all(clean_images(plan.volumes, plan.table, np.flatnonzero(noise)) == 0)
    assert images[noise].var() == pytest.approx(plan.noise_sigma**2, rel=0.05)
    in_disc = masked_variance(images, plan.mask_radius_px)
    assert in_disc[~noise].mean() == pytest.approx(2.0 * plan.noise_sigma**2, rel=0.1)  # SNR 1: signal + noise


def test_states_use_their_own_volume():
    state_a, state_b = phantom_volume("two_state", 32, 2.0)
    images, table = simulate_particles([state_a, state_b], 40, pixel_size_A=2.0, snr=None, ctf=False,
                                       weights=[0.5, 0.5], rng=12)
    from isavar.core.projection import project

    mats = euler_to_matrix(table["true_angle_rot_deg"], table["true_angle_tilt_deg"], table["true_angle_psi_deg"])
    for i, state in enumerate(table["true_conformation"]):
        right = project([state_a, state_b][state], mats[i:i + 1])[0]
        wrong = project([state_a, state_b][1 - state], mats[i:i + 1])[0]
        assert np.abs(images[i] - right).max() < 1e-5 * np.abs(right).max() < np.abs(images[i] - wrong).max()
    assert set(table["true_conformation"]) == {0, 1}


def test_same_seed_same_output_whatever_the_chunk_size():
    vol = phantom_volume("blob", 24, 2.0)
    kwargs = dict(pixel_size_A=2.0, snr=0.2, shift_sd_A=2.0, noise_fraction=0.1)
    images_a, table_a = simulate_particles(vol, 30, rng=99, chunk_size=7, **kwargs)
    images_b, table_b = simulate_particles(vol, 30, rng=99, chunk_size=30, **kwargs)
    np.testing.assert_array_equal(images_a, images_b)
    assert table_a.equals(table_b)
    images_c, table_c = simulate_particles(vol, 30, rng=100, **kwargs)
    assert not np.array_equal(images_a, images_c)
    assert not table_a["true_angle_rot_deg"].equals(table_c["true_angle_rot_deg"])


def test_plan_records_symmetry_and_summary():
    vol = phantom_volume("c4", 24, 2.0)
    plan = plan_simulation(vol, 20, pixel_size_A=2.0, snr=0.5, symmetry="C4", rng=1)
    summary = plan.summary()
    assert plan.symmetry == "c4" and summary["symmetry"] == "c4"
    assert summary["n_images"] == 20 and summary["state_counts"] == {"0": 20}
    assert summary["noise_sigma"] == pytest.approx(np.sqrt(plan.signal_variance / 0.5))


# --------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 40))
def test_property_uniform_rotations_are_rotations(seed, n):
    mats = uniform_rotations(n, np.random.default_rng(seed))
    np.testing.assert_allclose(mats @ mats.transpose(0, 2, 1), np.broadcast_to(np.eye(3), mats.shape), atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(mats), 1.0, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 30), views=st.integers(1, 6))
def test_property_table_angles_are_valid_euler_angles(seed, n, views):
    for spec in ("random", f"views:{views}"):
        table = draw_particle_table(n, box=16, pixel_size_A=1.0, orientations=spec, rng=seed)
        assert table["true_angle_tilt_deg"].between(0, 180).all()
        assert table["true_angle_rot_deg"].between(-180, 180).all()
        assert table["true_angle_psi_deg"].between(-180, 180).all()
        assert len(table) == n


@functools.cache
def _small_plan():
    return plan_simulation(phantom_volume("blob", 16, 2.0), 9, pixel_size_A=2.0, snr=0.5, shift_sd_A=2.0,
                           noise_fraction=0.2, rng=7)


@settings(max_examples=10, deadline=None)
@given(chunk=st.integers(1, 10))
def test_property_chunking_never_changes_images(chunk):
    plan = _small_plan()
    reference = plan.images(chunk_size=9)
    pieces = list(plan.chunks(chunk))
    assert [p[0] for p in pieces] == list(range(0, 9, chunk))
    np.testing.assert_array_equal(np.concatenate([p[2] for p in pieces]), reference)
