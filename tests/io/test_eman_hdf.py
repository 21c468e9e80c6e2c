"""EMAN2/SPHIRE HDF: layout and attribute types EMAN2 expects, header <-> columns, transforms, round trips."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isavar.conventions import euler_to_matrix
from isavar.errors import InputError
from isavar.io import read_particles, read_volume, write_particles, write_volume
from isavar.io.eman_hdf import align2d_matrix, align2d_params, projection_matrix, transform_value, write_eman_attr

from _io_helpers import angle_diff, assert_tables_match, full_table, random_images


def test_round_trip_keeps_every_column(tmp_path, rng):
    images, table = random_images(rng, 6, 12), full_table(rng, 6)
    write_particles(tmp_path / "p.hdf", images, table, pixel_size_A=1.5)
    stack = read_particles(tmp_path / "p.hdf")
    assert stack.pixel_size_A == 1.5
    np.testing.assert_array_equal(stack.images[:], images)
    assert_tables_match(stack.table, table)
    stack.close()


def test_layout_and_attribute_types_match_hdfio2(tmp_path, rng):
    table = full_table(rng, 3)
    write_particles(tmp_path / "p.hdf", random_images(rng, 3, 8), table, pixel_size_A=2.0)
    with h5py.File(tmp_path / "p.hdf", "r") as fh:
        images = fh["MDF/images"]
        assert images.attrs["imageid_max"].dtype == np.int32 and int(images.attrs["imageid_max"][0]) == 2
        assert sorted(images.keys(), key=int) == ["0", "1", "2"]
        group = images["1"]
        data = group["image"]
        assert data.shape == (8, 8) and data.dtype == np.float32 and data.chunks is None
        attrs = group.attrs
        for key in ("nx", "ny", "nz"):
            assert attrs[f"EMAN.{key}"].dtype == np.int32 and attrs[f"EMAN.{key}"].shape == (1,)
        assert [int(attrs[f"EMAN.{k}"][0]) for k in ("nx", "ny", "nz")] == [8, 8, 1]
        assert attrs["EMAN.apix_x"].dtype == np.float32
        ctf = attrs.get_id("EMAN.ctf")
        assert ctf.get_type().get_class() == h5py.h5t.STRING and ctf.shape == ()
        assert attrs["EMAN.ctf"].decode().startswith("E")
        proj = attrs["EMAN.xform.projection"]
        assert proj.dtype.names == ("00", "01", "02", "03", "10", "11", "12", "13", "20", "21", "22", "23")
        assert all(proj.dtype[n] == np.float32 for n in proj.dtype.names) and proj.shape == (1,)
        assert attrs["EMAN.xform.align2d"].dtype == proj.dtype
        assert attrs["EMAN.ptcl_source_image"].decode() == table["micrograph_name"][1]


def test_bool_int_float_string_array_encodings(tmp_path):
    with h5py.File(tmp_path / "a.h5", "w") as fh:
        g = fh.create_group("g")
        write_eman_attr(g, "flag", True)
        write_eman_attr(g, "count", 7)
        write_eman_attr(g, "value", 0.5)
        write_eman_attr(g, "name", "abc")
        write_eman_attr(g, "members", np.array([3, 1, 2]))
        write_eman_attr(g, "curve", np.array([0.5, 0.25]))
        write_eman_attr(g, "xf", transform_value(np.arange(12.0).reshape(3, 4)))
        a = g.attrs
        assert a["EMAN.flag"].dtype == np.int8 and bytes(a["EMAN.flag"].tobytes()) == b"T"
        assert a["EMAN.count"].dtype == np.int32
        assert a["EMAN.value"].dtype == np.float32
        assert a.get_id("EMAN.name").get_type().get_size() == 4  # strlen + 1, as EMAN2 writes
        assert a["EMAN.members"].dtype == np.int32 and a["EMAN.members"].shape == (3,)
        assert a["EMAN.curve"].dtype == np.float32
        assert [float(a["EMAN.xf"][0][n]) for n in ("00", "13", "23")] == [0.0, 7.0, 11.0]


def _set_params_proj(phi, theta, psi, s2x, s2y):
    """The 3x4 matrix SPHIRE's ``sp_utilities.set_params_proj(ima, [phi, theta, psi, s2x, s2y])`` stores:
    ``Transform({"type": "spider", ...})`` (EMAN az = phi + 90, alt = theta, phi = psi - 90), then
    ``set_trans(Vec2f(-s2x, -s2y))``. Built here from EMAN2's definitions, not from isavar's writer."""
    m = np.zeros((3, 4))
    m[:, :3] = _eman_rotation(phi + 90.0, theta, psi - 90.0)
    m[0, 3], m[1, 3] = -s2x, -s2y
    return m


def _eman_style_file(path, rng):
    """An HDF file laid out the way EMAN2/SPHIRE write one, built directly with h5py."""
    n = 3
    images = random_images(rng, n, 10)
    params = [(10.0, 50.0, 120.0, 2.0, -1.0), (200.0, 80.0, -30.0, 0.0, 3.0), (0.0, 0.0, 0.0, -2.5, 0.5)]
    with h5py.File(path, "w") as fh:
        grp = fh.create_group("MDF").create_group("images")
        grp.attrs.create("imageid_max", np.array([n - 1], np.int32))
        for i in range(n):
            g = grp.create_group(str(i))
            g.create_dataset("image", data=images[i])
            write_eman_attr(g, "nx", 10)
            write_eman_attr(g, "ny", 10)
            write_eman_attr(g, "nz", 1)
            write_eman_attr(g, "apix_x", 1.25)
            write_eman_attr(g, "ctf", "E2.5 0.2 30 50 10 300 2.7 1.25 0.2 3,1,2,3 2,0.5,0.4")
            write_eman_attr(g, "ctf_applied", False)
            phi, theta, psi, s2x, s2y = params[i]
            write_eman_attr(g, "xform.projection", transform_value(_set_params_proj(phi, theta, psi, s2x, s2y)))
            write_eman_attr(g, "xform.align2d", transform_value(align2d_matrix(30.0 * i, 1.0, -2.0, i % 2)[0]))
            write_eman_attr(g, "members", np.array([4, 5, 6 + i]))
            write_eman_attr(g, "n_objects", 3)
            write_eman_attr(g, "ptcl_source_coord", np.array([100, 200 + i]))
            write_eman_attr(g, "ISAC_class_id", i)
    return images, params


def test_reads_an_eman2_style_file(tmp_path, rng):
    images, params = _eman_style_file(tmp_path / "e.hdf", rng)
    stack = read_particles(tmp_path / "e.hdf")
    t = stack.table
    np.testing.assert_array_equal(stack.images[:], images)
    assert stack.pixel_size_A == 1.25
    # CTF: defocus 2.5 um mean, dfdiff 0.2 um = V - U, dfang 30 -> RELION angle 45 - 30 = 15
    np.testing.assert_allclose(t["defocus_u_A"], 24000.0)
    np.testing.assert_allclose(t["defocus_v_A"], 26000.0)
    np.testing.assert_allclose(t["defocus_angle_deg"], 15.0)
    np.testing.assert_allclose(t["amplitude_contrast"], 0.1)
    np.testing.assert_allclose(t["ctf_bfactor_A2"], 50.0)
    for i, (phi, theta, psi, s2x, s2y) in enumerate(params):
        a = euler_to_matrix(t["angle_rot_deg"][i], t["angle_tilt_deg"][i], t["angle_psi_deg"][i])
        np.testing.assert_allclose(a, euler_to_matrix(phi, theta, psi), atol=1e-5)
        # sp_relion2sphire passes RELION's rlnOriginX as s2x: SPHIRE's s2x is RELION's origin, same sign
        assert t["origin_x_A"][i] == pytest.approx(s2x * 1.25, abs=1e-5)
        assert t["origin_y_A"][i] == pytest.approx(s2y * 1.25, abs=1e-5)
        assert angle_diff(t["align_alpha_deg"][i], 30.0 * i) < 1e-4
    assert t["align_mirror"].tolist() == [0, 1, 0]
    np.testing.assert_allclose(t["align_sx_px"], 1.0, atol=1e-6)
    assert t["ctf_applied"].tolist() == [False] * 3
    assert [list(m) for m in t["members"]] == [[4, 5, 6], [4, 5, 7], [4, 5, 8]]
    assert t["n_objects"].tolist() == [3, 3, 3]
    assert t["coordinate_y_px"].tolist() == [200.0, 201.0, 202.0]
    assert t["ISAC_class_id"].tolist() == [0, 1, 2]


def test_class_averages_with_members_round_trip(tmp_path, rng):
    table = pd.DataFrame({"members": [np.array([1, 2]), np.array([3, 4, 5])], "n_objects": [2, 3]})
    write_particles(tmp_path / "avg.hdf", random_images(rng, 2, 8), table, pixel_size_A=1.0)
    t = read_particles(tmp_path / "avg.hdf").table
    assert [list(m) for m in t["members"]] == [[1, 2], [3, 4, 5]]


def test_mirror_is_the_sign_of_the_determinant():
    m = align2d_matrix([20.0, 20.0], [1.0, 1.0], [2.0, 2.0], [0, 1])
    assert np.linalg.det(m[0, :2, :2]) > 0 > np.linalg.det(m[1, :2, :2])
    # EMAN2 get_trans un-mirrors x: stored tx is negated for the mirrored transform
    assert m[1, 0, 3] == -1.0 and m[1, 1, 3] == 2.0


@settings(max_examples=50, deadline=None)
@given(alpha=st.floats(-179.9, 179.9), sx=st.floats(-20, 20), sy=st.floats(-20, 20), mirror=st.integers(0, 1))
def test_align2d_matrix_round_trip(alpha, sx, sy, mirror):
    got = align2d_params(align2d_matrix(alpha, sx, sy, mirror)[0])
    assert angle_diff(got[0], alpha) < 1e-6
    assert got[1] == pytest.approx(sx, abs=1e-9) and got[2] == pytest.approx(sy, abs=1e-9)
    assert got[3] == mirror


def test_projection_matrix_is_what_set_params_proj_stores():
    # a RELION pose (rot, tilt, psi, origin) goes through sp_relion2sphire as s2x = origin
    m = projection_matrix(30.0, 40.0, 50.0, 1.5, -2.0)[0]
    np.testing.assert_allclose(m, _set_params_proj(30.0, 40.0, 50.0, 1.5, -2.0), atol=1e-12)
    np.testing.assert_allclose(m[:, 3], [-1.5, 2.0, 0.0])


def test_volume_round_trip(tmp_path, rng):
    volume = rng.normal(size=(6, 6, 6)).astype(np.float32)
    write_volume(tmp_path / "v.hdf", volume, 3.0)
    got, voxel = read_volume(tmp_path / "v.hdf")
    np.testing.assert_array_equal(got, volume)
    assert voxel == 3.0
    with h5py.File(tmp_path / "v.hdf", "r") as fh:
        assert int(fh["MDF/images/0"].attrs["EMAN.nz"][0]) == 6


def test_bad_files(tmp_path, rng):
    with h5py.File(tmp_path / "plain.hdf", "w") as fh:
        fh.create_dataset("x", data=np.zeros(3))
    with pytest.raises(InputError, match="plain.hdf: not an EMAN2/SPHIRE image file"):
        read_particles(tmp_path / "plain.hdf")
    with h5py.File(tmp_path / "mixed.hdf", "w") as fh:
        g = fh.create_group("MDF/images")
        g.create_group("0").create_dataset("image", data=np.zeros((8, 8), np.float32))
        g.create_group("1").create_dataset("image", data=np.zeros((9, 9), np.float32))
    with pytest.raises(InputError, match="mixed sizes"):
        read_particles(tmp_path / "mixed.hdf")
    (tmp_path / "text.hdf").write_text("not hdf")
    with pytest.raises(InputError, match="text.hdf: cannot open"):
        read_particles(tmp_path / "text.hdf")


def test_nan_in_hdf_image(tmp_path, rng):
    images = random_images(rng, 3, 8)
    write_particles(tmp_path / "p.hdf", images, pd.DataFrame(index=range(3)), pixel_size_A=1.0)
    with h5py.File(tmp_path / "p.hdf", "r+") as fh:
        fh["MDF/images/2/image"][0, 0] = np.nan
    stack = read_particles(tmp_path / "p.hdf")
    with pytest.raises(InputError, match=r"p.hdf: image 3 \(1-based\) contains NaN"):
        stack.images[2]
    stack.close()


def test_bit_reduced_images_are_rescaled(tmp_path):
    """EMAN2 'compressed' images: uint8 data with stored_renderbits/min/max, rescaled as hdfio2.cpp does."""
    raw = np.arange(64, dtype=np.uint8).reshape(8, 8)
    with h5py.File(tmp_path / "c.hdf", "w") as fh:
        grp = fh.create_group("MDF").create_group("images")
        grp.attrs.create("imageid_max", np.array([0], np.int32))
        g = grp.create_group("0")
        g.create_dataset("image", data=raw)
        for key, value in (("nx", 8), ("ny", 8), ("nz", 1), ("stored_renderbits", 8)):
            write_eman_attr(g, key, value)
        write_eman_attr(g, "stored_rendermin", -1.0)
        write_eman_attr(g, "stored_rendermax", 1.0)
    image = read_particles(tmp_path / "c.hdf").images[0]
    np.testing.assert_allclose(image, raw / 255.0 * 2.0 - 1.0, atol=1e-6)


def _eman_rotation(az, alt, phi):
    """EMAN2's Transform rotation for (az, alt, phi): Rz(phi) Rx(alt) Rz(az) (libEM/transform.cpp set_rotation)."""
    def rz(a):
        c, s = np.cos(np.deg2rad(a)), np.sin(np.deg2rad(a))
        return np.array([[c, s, 0], [-s, c, 0], [0, 0, 1]])

    c, s = np.cos(np.deg2rad(alt)), np.sin(np.deg2rad(alt))
    rx = np.array([[1, 0, 0], [0, c, s], [0, -s, c]])
    return rz(phi) @ rx @ rz(az)


@settings(max_examples=30, deadline=None)
@given(phi=st.floats(-180, 180), theta=st.floats(0, 180), psi=st.floats(-180, 180))
def test_spider_transform_matrix_is_a(phi, theta, psi):
    # Transform({"type": "spider", ...}) sets az = phi + 90, alt = theta, phi_eman = psi - 90
    expected = _eman_rotation(phi + 90.0, theta, psi - 90.0)
    np.testing.assert_allclose(projection_matrix(phi, theta, psi, 0.0, 0.0)[0, :, :3], expected, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(alpha=st.floats(-180, 180))
def test_2d_transform_rotation_matches_eman2(alpha):
    # the 2D type is the EMAN rotation with az = alt = 0, phi = alpha
    np.testing.assert_allclose(align2d_matrix(alpha, 0.0, 0.0, 0)[0, :, :3], _eman_rotation(0.0, 0.0, alpha),
                               atol=1e-12)
