"""3D variability workflow: output directory layout, headers, input-order 2D stacks, input errors."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest

from isavar.errors import InputError
from isavar.io import read_particles, write_particles
from isavar.synthetic import phantom_volume, simulate_particles
from isavar.variability.params import VariabilityParams
from isavar.workflows.variability import run_reconstruct, run_variability

BOX, PIX, P = 32, 2.5, 0.3


@pytest.fixture(scope="module")
def star(tmp_path_factory):
    d = tmp_path_factory.mktemp("var_in")
    a, b = phantom_volume("two_state", BOX, PIX)
    imgs, table = simulate_particles([a, b], 240, pixel_size_A=PIX, snr=2.0, ctf=True, shift_sd_A=2.0,
                                     weights=[P, 1 - P], rng=9)
    path = d / "particles.star"
    write_particles(path, imgs, table, pixel_size_A=PIX)
    return path


def test_outputs_layout_headers_and_order(star, tmp_path):
    out = tmp_path / "run"
    prm = VariabilityParams(img_per_grp=12, ctf=True, lowpass_fl=0.25, lowpass_aa=0.2, chunk_size=100)
    res = run_variability(star, out, prm)
    for name in ("var3D.mrc", "ave3D.mrc", "var2D.star", "var2D.mrcs", "ave2D.star", "ave2D.mrcs",
                 "var3D_slices.png", "summary.json", "provenance.json", "log.txt"):
        assert (out / name).is_file(), name
    assert not list(out.glob(".*scratch*"))
    for name in ("var3D.mrc", "ave3D.mrc"):
        with mrcfile.open(out / name) as m:
            assert m.data.shape == (BOX,) * 3
            assert float(m.voxel_size.x) == pytest.approx(PIX)
    np.testing.assert_allclose(mrcfile.read(out / "var3D.mrc"), res.var3d)
    src = read_particles(star).table
    v2 = read_particles(out / "var2D.star")
    assert len(v2.table) == len(src) and v2.images.shape == (len(src), BOX, BOX)
    assert v2.pixel_size_A == pytest.approx(PIX)
    np.testing.assert_array_equal(v2.table["source_index"], np.arange(len(src)))
    np.testing.assert_allclose(v2.table["angle_tilt_deg"], src["angle_tilt_deg"], atol=1e-6)
    np.testing.assert_allclose(v2.table["angle_psi_deg"], 0.0)
    assert np.all(v2.images[:] >= -1e-3)  # standard deviations (Fourier up-sampling ringing aside)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_particles"] == len(src) and summary["box"] == BOX
    assert summary["working_box"] < BOX  # the low-pass let the analysis run on a smaller grid
    assert json.loads((out / "provenance.json").read_text())["command"] == "3dvariability"


def test_var_mode_on_written_var2d_reproduces_var3d(star, tmp_path):
    first = run_variability(star, tmp_path / "a", VariabilityParams(img_per_grp=12, save_ave2d=False))
    again = run_variability(tmp_path / "a" / "var2D.star", tmp_path / "b", VariabilityParams(var_input=True))
    inside = np.abs(first.var3d) > 0
    assert np.corrcoef(first.var3d[inside], again.var3d[inside])[0, 1] > 0.99
    assert not (tmp_path / "a" / "ave2D.star").exists()


def test_symmetrized_metadata_is_written(star, tmp_path):
    out = tmp_path / "c4"
    run_variability(star, out, VariabilityParams(img_per_grp=12, symmetry="c4", force_symmetrize=True,
                                                 save_ave2d=False, save_var2d=False), symmetrize_only=True)
    sym = read_particles(out / "symmetrized_particles.star")
    src = read_particles(star)
    assert len(sym.table) == 4 * len(src.table)
    np.testing.assert_array_equal(sym.table["symmetry_element"], np.repeat(np.arange(4), len(src.table)))
    # identity block first; every copy references the original image
    np.testing.assert_allclose(sym.table["angle_tilt_deg"][:len(src.table)], src.table["angle_tilt_deg"], atol=1e-6)
    np.testing.assert_allclose(sym.images[len(src.table) + 5], src.images[5])
    assert not (out / "var3D.mrc").exists()


def test_existing_output_directory_is_refused_untouched(star, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(InputError, match="already exists"):
        run_variability(star, out, VariabilityParams(img_per_grp=12))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_inputs_without_orientations_or_ctf_are_refused_before_writing(star, tmp_path):
    bare = tmp_path / "bare.mrcs"
    write_particles(bare, read_particles(star).images, read_particles(star).table)
    with pytest.raises(InputError, match="orientation"):
        run_variability(bare, tmp_path / "o1", VariabilityParams(img_per_grp=12))
    assert not (tmp_path / "o1").exists()
    table = read_particles(star).table.drop(columns=["defocus_u_A"])
    nctf = tmp_path / "nctf.star"
    write_particles(nctf, read_particles(star).images, table)
    with pytest.raises(InputError, match="CTF"):
        run_variability(nctf, tmp_path / "o2", VariabilityParams(img_per_grp=12, ctf=True))
    assert not (tmp_path / "o2").exists()


def test_reconstruct_noise_free_projections(tmp_path):
    vol = phantom_volume("blob", BOX, PIX)
    imgs, table = simulate_particles(vol, 1500, pixel_size_A=PIX, snr=None, ctf=False, shift_sd_A=2.0, rng=4)
    star = tmp_path / "clean.star"
    write_particles(star, imgs, table, pixel_size_A=PIX)
    out = run_reconstruct(star, tmp_path / "map.mrc", interpolation="nearest")
    with mrcfile.open(tmp_path / "map.mrc") as m:
        assert float(m.voxel_size.x) == pytest.approx(PIX)
    inside = vol > 0.05
    slope = np.polyfit(vol[inside], out[inside], 1)[0]
    assert np.corrcoef(vol.ravel(), out.ravel())[0, 1] > 0.97
    assert 0.85 < slope < 1.15
    with pytest.raises(InputError, match="exists"):
        run_reconstruct(star, tmp_path / "map.mrc")


@pytest.mark.parametrize("ext", ["hdf", "cs"])
def test_same_result_from_every_input_format(star, tmp_path, ext):
    """Orientations, origins and CTF read from SPHIRE HDF (xform.projection) and cryoSPARC .cs
    (alignments3D) give the same var3D as the STAR file."""
    stack = read_particles(star)
    other = tmp_path / f"p.{ext}"
    write_particles(other, stack.images, stack.table, pixel_size_A=PIX)
    prm = VariabilityParams(img_per_grp=10, ctf=True, save_ave2d=False, save_var2d=False)
    ref = run_variability(star, tmp_path / "ref", prm)
    got = run_variability(other, tmp_path / "got", prm)
    # float32 storage of angles/defocus in these formats: agreement to ~1e-3 (a convention error is O(1))
    np.testing.assert_allclose(got.var3d, ref.var3d, atol=2e-3 * np.abs(ref.var3d).max())


def _spider_matrix(phi, theta, psi):
    """EMAN2 ``Transform({"type": "spider", "phi", "theta", "psi"})`` rotation: EMAN az = phi + 90,
    alt = theta, phi_eman = psi - 90, matrix Rz(phi_eman) Rx(alt) Rz(az) (EMAN2 transform.cpp)."""
    def rz(a):
        c, s = np.cos(np.deg2rad(a)), np.sin(np.deg2rad(a))
        return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])

    c, s = np.cos(np.deg2rad(theta)), np.sin(np.deg2rad(theta))
    return rz(psi - 90.0) @ np.array([[1, 0, 0], [0, c, s], [0, -s, c]]) @ rz(phi + 90.0)


def _write_like_sp_relion2sphire(star_path, out_path, *, apix=True, ctf=True):
    """Write the STAR's particles as an HDF stack the way SPHIRE's ``sp_relion2sphire`` does, with no isavar
    pose or CTF writer involved: ``s2x = rlnOriginX`` (px), ``set_params_proj`` stores ``set_trans(-s2x, -s2y)``;
    CTF ``defocus = (U + V) / 20000`` µm, ``dfdiff = (V - U) / 10000`` µm, ``dfang = 45 - angle`` (mod 180),
    ``ampcont`` in percent, as ``generate_ctf`` serialises an EMAN2Ctf."""
    import h5py

    from isavar.io.eman_hdf import transform_value, write_eman_attr

    src = read_particles(star_path)
    t = src.table
    images = src.images[:]
    with h5py.File(out_path, "w") as fh:
        grp = fh.create_group("MDF").create_group("images")
        grp.attrs.create("imageid_max", np.array([len(t) - 1], np.int32))
        for i in range(len(t)):
            g = grp.create_group(str(i))
            g.create_dataset("image", data=images[i])
            for key, value in (("nx", BOX), ("ny", BOX), ("nz", 1), ("ctf_applied", False)):
                write_eman_attr(g, key, value)
            if apix:
                write_eman_attr(g, "apix_x", PIX)
            m = np.zeros((3, 4))
            m[:, :3] = _spider_matrix(t["angle_rot_deg"][i], t["angle_tilt_deg"][i], t["angle_psi_deg"][i])
            m[0, 3], m[1, 3] = -t["origin_x_A"][i] / PIX, -t["origin_y_A"][i] / PIX
            write_eman_attr(g, "xform.projection", transform_value(m))
            if not ctf:
                continue
            u, v, ang = t["defocus_u_A"][i], t["defocus_v_A"][i], t["defocus_angle_deg"][i]
            fields = ((u + v) / 20000, (v - u) / 10000, np.mod(45.0 - ang, 180.0), 0.0,
                      100 * t["amplitude_contrast"][i], t["voltage_kV"][i], t["cs_mm"][i], PIX)
            write_eman_attr(g, "ctf", "E" + " ".join(f"{x:.8g}" for x in fields) + " -1 0 0")


def test_sphire_stack_written_like_sp_relion2sphire_reconstructs_like_the_star(star, tmp_path):
    """A SPHIRE stack made from a RELION STAR (sp_relion2sphire's path) gives the STAR's reconstruction:
    a wrong shift sign moves every particle by twice its origin (shift_sd 2 Å at 2.5 Å/px)."""
    hdf = tmp_path / "sphire.hdf"
    _write_like_sp_relion2sphire(star, hdf)
    ref = run_reconstruct(star, tmp_path / "ref.mrc", ctf=True)
    got = run_reconstruct(hdf, tmp_path / "got.mrc", ctf=True)
    np.testing.assert_allclose(got, ref, atol=2e-3 * np.abs(ref).max())


def test_hdf_without_pixel_size_refuses_unknown_origins_and_apix_sets_them(star, tmp_path):
    """SPHIRE shifts are in pixels: without a pixel size the origins in Å are unknown, and 3D reconstruction
    says so instead of using 0; with --apix they are converted and the map equals the STAR's."""
    hdf = tmp_path / "noapix.hdf"
    _write_like_sp_relion2sphire(star, hdf, apix=False, ctf=False)
    with pytest.raises(InputError, match="--apix"):
        run_reconstruct(hdf, tmp_path / "a.mrc")
    assert not (tmp_path / "a.mrc").exists()
    ref = run_reconstruct(star, tmp_path / "ref.mrc")
    got = run_reconstruct(hdf, tmp_path / "b.mrc", pixel_size_A=PIX)
    np.testing.assert_allclose(got, ref, atol=2e-3 * np.abs(ref).max())
