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
