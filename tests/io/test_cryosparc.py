"""cryoSPARC .cs: field mapping (pyem conventions), blob paths, write-back keeping uid and unknown fields."""

from __future__ import annotations

import numpy as np
import pytest

from isavar.conventions import axis_angle_to_matrix, euler_to_matrix, relion_to_align2d
from isavar.errors import InputError
from isavar.io import read_particles, write_image_stack, write_particles

from _io_helpers import angle_diff, assert_tables_match, full_table, random_images


def _cs_file(tmp_path, rng, n=5):
    """A .cs file in J2/ naming its stack relative to the project folder, as cryoSPARC does."""
    project = tmp_path / "P1"
    (project / "J1" / "extract").mkdir(parents=True)
    (project / "J2").mkdir()
    images = random_images(rng, n, 12)
    write_image_stack(project / "J1" / "extract" / "stack.mrcs", images, 1.1)
    dtype = [("uid", "<u8"), ("blob/path", "S40"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
             ("blob/psize_A", "<f4"), ("blob/sign", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"),
             ("ctf/df_angle_rad", "<f4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"),
             ("ctf/amp_contrast", "<f4"), ("ctf/phase_shift_rad", "<f4"), ("ctf/exp_group_id", "<u4"),
             ("ctf/anisomag", "<f4", (4,)), ("alignments3D/pose", "<f4", (3,)), ("alignments3D/shift", "<f4", (2,)),
             ("alignments3D/psize_A", "<f4"), ("alignments3D/error", "<f4"), ("alignments2D/pose", "<f4"),
             ("alignments2D/shift", "<f4", (2,)), ("alignments2D/class", "<u4"), ("location/micrograph_path", "S20")]
    cs = np.zeros(n, dtype=dtype)
    cs["uid"] = rng.integers(1, 2**62, n).astype(np.uint64)
    cs["blob/path"] = b"J1/extract/stack.mrcs"
    cs["blob/idx"] = np.arange(n)[::-1]
    cs["blob/shape"] = 12
    cs["blob/psize_A"] = 1.1
    cs["blob/sign"] = -1.0
    cs["ctf/df1_A"] = rng.uniform(1e4, 2e4, n)
    cs["ctf/df2_A"] = rng.uniform(1e4, 2e4, n)
    cs["ctf/df_angle_rad"] = rng.uniform(0, np.pi, n)
    cs["ctf/accel_kv"] = 300
    cs["ctf/cs_mm"] = 2.7
    cs["ctf/amp_contrast"] = 0.07
    cs["ctf/phase_shift_rad"] = 0.1
    cs["ctf/exp_group_id"] = [0, 1, 0, 1, 0][:n]
    cs["ctf/anisomag"] = rng.normal(size=(n, 4))
    cs["alignments3D/pose"] = rng.normal(size=(n, 3))
    cs["alignments3D/shift"] = rng.normal(0, 2, size=(n, 2))
    cs["alignments3D/psize_A"] = 1.1
    cs["alignments3D/error"] = rng.uniform(size=n)
    cs["alignments2D/pose"] = rng.uniform(-np.pi, np.pi, n)
    cs["alignments2D/shift"] = rng.normal(0, 2, size=(n, 2))
    cs["alignments2D/class"] = rng.integers(0, 4, n)
    cs["location/micrograph_path"] = b"mic.mrc"
    path = project / "J2" / "particles.cs"
    with open(path, "wb") as fh:
        np.save(fh, cs)
    return path, cs, images


def test_field_mapping(tmp_path, rng):
    path, cs, images = _cs_file(tmp_path, rng)
    stack = read_particles(path)
    t = stack.table
    np.testing.assert_array_equal(stack.images[:], images[::-1])
    assert stack.pixel_size_A == 1.1
    assert t["uid"].tolist() == cs["uid"].tolist()
    np.testing.assert_allclose(t["defocus_u_A"], cs["ctf/df1_A"])
    np.testing.assert_allclose(t["defocus_angle_deg"], np.rad2deg(cs["ctf/df_angle_rad"].astype(float)))
    np.testing.assert_allclose(t["phase_shift_deg"], np.rad2deg(np.float32(0.1)))
    assert t["optics_group"].tolist() == [1, 2, 1, 2, 1]
    assert t["micrograph_name"].tolist() == ["mic.mrc"] * 5
    a = euler_to_matrix(t["angle_rot_deg"], t["angle_tilt_deg"], t["angle_psi_deg"])
    np.testing.assert_allclose(a, axis_angle_to_matrix(cs["alignments3D/pose"].astype(float)), atol=1e-6)
    # pyem csparc2star: alignments3D/shift (px) -> rlnOriginX/Y unchanged in sign
    np.testing.assert_allclose(t["origin_x_A"], cs["alignments3D/shift"][:, 0].astype(float) * np.float32(1.1))
    np.testing.assert_allclose(t["origin_y_A"], cs["alignments3D/shift"][:, 1].astype(float) * np.float32(1.1))
    alpha, sx, sy, mirror = relion_to_align2d(np.rad2deg(cs["alignments2D/pose"].astype(float)), 0.0,
                                              cs["alignments2D/shift"][:, 0], cs["alignments2D/shift"][:, 1])
    assert angle_diff(t["align_alpha_deg"], alpha).max() < 1e-9
    np.testing.assert_allclose(t["align_sx_px"], sx)
    assert t["align_mirror"].tolist() == [0] * 5
    assert t["class_number"].tolist() == (cs["alignments2D/class"] + 1).tolist()
    assert [f"ctf/anisomag/{k}" in t.columns for k in range(4)] == [True] * 4
    assert t["blob/sign"].tolist() == [-1.0] * 5
    assert t["alignments3D/error"].tolist() == cs["alignments3D/error"].tolist()


def test_write_back_filtered_copy_keeps_uid_and_unknown_fields(tmp_path, rng):
    path, cs, images = _cs_file(tmp_path, rng)
    stack = read_particles(path)
    keep = np.array([0, 2, 3])
    table = stack.table.iloc[keep].reset_index(drop=True)
    table["isavar_score"] = [0.5, 0.25, 0.125]
    write_particles(tmp_path / "out" / "sel.cs", stack.images.subset(keep), table)
    with open(tmp_path / "out" / "sel.cs", "rb") as fh:
        out = np.load(fh)
    assert out["uid"].tolist() == cs["uid"][keep].tolist()
    np.testing.assert_array_equal(out["ctf/anisomag"], cs["ctf/anisomag"][keep])
    np.testing.assert_array_equal(out["alignments3D/error"], cs["alignments3D/error"][keep])
    np.testing.assert_array_equal(out["blob/sign"], cs["blob/sign"][keep])
    np.testing.assert_array_equal(out["ctf/exp_group_id"], cs["ctf/exp_group_id"][keep])
    np.testing.assert_allclose(out["alignments3D/shift"], cs["alignments3D/shift"][keep], atol=1e-5)
    np.testing.assert_allclose(out["ctf/df_angle_rad"], cs["ctf/df_angle_rad"][keep], atol=1e-6)
    assert out["isavar_score"].tolist() == [0.5, 0.25, 0.125]
    assert out["blob/path"].tolist() == [b"sel.mrcs"] * 3
    assert out["blob/idx"].tolist() == [0, 1, 2]
    m_in = axis_angle_to_matrix(cs["alignments3D/pose"][keep].astype(float))
    m_out = axis_angle_to_matrix(out["alignments3D/pose"].astype(float))
    np.testing.assert_allclose(m_out, m_in, atol=1e-5)
    again = read_particles(tmp_path / "out" / "sel.cs")
    np.testing.assert_array_equal(again.images[:], images[::-1][keep])


def test_round_trip_from_a_canonical_table(tmp_path, rng):
    images, table = random_images(rng, 6, 12), full_table(rng, 6)
    write_particles(tmp_path / "p.cs", images, table, pixel_size_A=1.5)
    stack = read_particles(tmp_path / "p.cs")
    np.testing.assert_array_equal(stack.images[:], images)
    assert stack.pixel_size_A == 1.5
    assert_tables_match(stack.table, table)


def test_object_arrays_and_bad_files(tmp_path):
    with open(tmp_path / "obj.cs", "wb") as fh:
        np.save(fh, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="obj.cs: cannot read"):
        read_particles(tmp_path / "obj.cs")
    with open(tmp_path / "plain.cs", "wb") as fh:
        np.save(fh, np.zeros(3))
    with pytest.raises(InputError, match="plain.cs: not a cryoSPARC"):
        read_particles(tmp_path / "plain.cs")
    cs = np.zeros(1, dtype=[("uid", "<u8"), ("blob/path", "S10"), ("blob/idx", "<u4")])
    cs["blob/path"] = b"none.mrcs"
    with open(tmp_path / "missing.cs", "wb") as fh:
        np.save(fh, cs)
    with pytest.raises(InputError, match="missing.cs: image stack none.mrcs referenced by blob/path not found"):
        read_particles(tmp_path / "missing.cs")


# ------------------------------------------------------------------------------ issue 15

#: The particle fields of a file written by cryoSPARC v2 itself (dtype of a cryoSPARC particles .cs, as printed
#: in a cryoSPARC user's merge script): the slots cryoSPARC's importers expect whole.
CRYOSPARC_PARTICLE_DTYPE = [
    ("alignments3D/alpha", "<f4"), ("alignments3D/alpha_min", "<f4"), ("alignments3D/class_ess", "<f4"),
    ("alignments3D/class_posterior", "<f4"), ("alignments3D/class", "<u4"), ("alignments3D/cross_cor", "<f4"),
    ("alignments3D/error", "<f4"), ("alignments3D/error_min", "<f4"), ("alignments3D/image_pow", "<f4"),
    ("alignments3D/pose_ess", "<f4"), ("alignments3D/pose", "<f4", (3,)), ("alignments3D/psize_A", "<f4"),
    ("alignments3D/resid_pow", "<f4"), ("alignments3D/shift_ess", "<f4"), ("alignments3D/shift", "<f4", (2,)),
    ("alignments3D/slice_pow", "<f4"), ("alignments3D/split", "<u4"), ("alignments3D/weight", "<f4"),
    ("blob/idx", "<u4"), ("blob/import_sig", "<u8"), ("blob/path", "S60"), ("blob/psize_A", "<f4"),
    ("blob/shape", "<u4", (2,)), ("blob/sign", "<f4"), ("ctf/accel_kv", "<f4"), ("ctf/amp_contrast", "<f4"),
    ("ctf/anisomag", "<f4", (4,)), ("ctf/bfactor", "<f4"), ("ctf/cs_mm", "<f4"), ("ctf/df1_A", "<f4"),
    ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"), ("ctf/exp_group_id", "<u4"), ("ctf/phase_shift_rad", "<f4"),
    ("ctf/scale_const", "<f4"), ("ctf/scale", "<f4"), ("ctf/shift_A", "<f4", (2,)), ("ctf/tetra_A", "<f4", (4,)),
    ("ctf/tilt_A", "<f4", (2,)), ("ctf/trefoil_A", "<f4", (2,)), ("ctf/type", "S9"), ("uid", "<u8"),
]


def test_written_cs_has_every_field_of_cryosparcs_own_particle_slots(tmp_path, rng):
    table = full_table(rng, 6)
    write_particles(tmp_path / "out.cs", random_images(rng, 6, 10), table, pixel_size_A=1.3)
    cs = np.load(tmp_path / "out.cs")
    for entry in CRYOSPARC_PARTICLE_DTYPE:
        name, dtype = entry[0], np.dtype(entry[1])
        shape = entry[2] if len(entry) > 2 else ()
        assert name in cs.dtype.names, name
        assert cs.dtype[name].base.kind == dtype.kind and cs.dtype[name].shape == shape, name
    # values isavar knows: half-sets from rlnRandomSubset, unit scale, unit-weight alignments
    np.testing.assert_array_equal(cs["alignments3D/split"], table["rlnRandomSubset"] - 1)
    assert (cs["ctf/scale"] == 1).all() and (cs["alignments3D/weight"] == 1).all()
    assert (cs["ctf/type"] == b"imported").all() and (cs["blob/sign"] == 1).all()
    np.testing.assert_array_equal(cs["ctf/anisomag"], np.tile([1, 0, 0, 1], (6, 1)))


def test_written_cs_loads_in_cryosparc_tools(tmp_path, rng):
    dataset = pytest.importorskip("cryosparc.dataset")
    write_particles(tmp_path / "out.cs", random_images(rng, 4, 10), full_table(rng, 4), pixel_size_A=1.3)
    d = dataset.Dataset.load(str(tmp_path / "out.cs"))
    assert len(d) == 4 and {"ctf", "blob", "alignments3D", "alignments2D"} <= set(d.prefixes())


def test_compressed_cs_format_is_read_through_cryosparc_tools(tmp_path, rng):
    dataset = pytest.importorskip("cryosparc.dataset")
    path, _, _ = _cs_file(tmp_path, rng)
    plain = read_particles(path)
    packed = path.with_name("packed.cs")
    dataset.Dataset.load(str(path)).save(str(packed), format=dataset.CSDAT_FORMAT)
    assert packed.read_bytes()[:6] == b"\x95CSDAT"
    got = read_particles(packed)
    np.testing.assert_array_equal(got.images[:], plain.images[:])
    for col in ("defocus_u_A", "angle_rot_deg", "origin_x_A", "class_number", "uid"):
        np.testing.assert_array_equal(got.table[col], plain.table[col])


def test_compressed_cs_without_cryosparc_tools_names_the_fix(tmp_path, monkeypatch):
    import sys

    path = tmp_path / "packed.cs"
    path.write_bytes(b"\x95CSDAT" + b"\0" * 64)
    monkeypatch.setitem(sys.modules, "cryosparc.dataset", None)
    with pytest.raises(InputError, match=r"isavar\[cryosparc\]"):
        read_particles(path)


def test_2d_alignments_become_relion_pose_columns_as_isac2_writes_them(tmp_path, rng):
    """A cryoSPARC 2D classification (alignments2D only, no isavar fields) reads as RELION psi/origin columns
    equal to what ``isavar isac2`` writes for the same alignment."""
    from isavar.workflows.isac2 import _accounted_columns

    path, cs, _ = _cs_file(tmp_path, rng)
    names = [n for n in cs.dtype.names if not n.startswith("alignments3D")]
    only2d = tmp_path / "P1" / "J2" / "class2d.cs"
    with open(only2d, "wb") as fh:
        np.save(fh, cs[names])
    t = read_particles(only2d).table
    assert "angle_rot_deg" not in t.columns                            # not a 3D pose
    np.testing.assert_allclose(np.deg2rad(t["angle_psi_deg"]), np.arctan2(np.sin(cs["alignments2D/pose"]),
                                                                          np.cos(cs["alignments2D/pose"])),
                               atol=1e-5)
    np.testing.assert_allclose(t["origin_x_A"], cs["alignments2D/shift"][:, 0] * 1.1, rtol=1e-5)
    full = t[["align_alpha_deg", "align_sx_px", "align_sy_px", "align_mirror"]].to_numpy(np.float64)
    isac2 = _accounted_columns(t.drop(columns=["angle_psi_deg", "angle_tilt_deg", "origin_x_A", "origin_y_A"]),
                               full, t["class_number"].to_numpy(), 1.1)
    for col in ("angle_psi_deg", "angle_tilt_deg", "origin_x_A", "origin_y_A"):
        np.testing.assert_allclose(t[col], isac2[col], atol=1e-6)
    write_particles(tmp_path / "c2d.star", read_particles(only2d).images, t, pixel_size_A=1.1)
    text = (tmp_path / "c2d.star").read_text()
    assert "_rlnAnglePsi" in text and "_rlnOriginXAngst" in text
