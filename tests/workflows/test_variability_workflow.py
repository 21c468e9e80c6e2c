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
