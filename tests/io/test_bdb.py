"""EMAN2/SPHIRE BDB stacks: the fixture written by real EMAN2 2.91 + SPHIRE 1.4.2 (tests/data/bdb) read back
against its planted truth, the name forms, virtual stacks, Python-2-era pickles and the errors users hit."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from isavar.conventions import ampcont_percent_to_fraction, eman_to_relion_defocus
from isavar.errors import InputError
from isavar.io import particle_format, read_particles

HAVE_BINDING = any(importlib.util.find_spec(m) is not None for m in ("berkeleydb", "bsddb3"))
pytestmark = pytest.mark.skipif(not HAVE_BINDING, reason="no Berkeley DB binding (pip install 'isavar[bdb]')")

DATA = Path(__file__).resolve().parents[1] / "data" / "bdb"
TRUTH = json.loads((DATA / "truth.json").read_text())
SPHIRE_PYTHON = Path(os.environ.get("ISAVAR_SPHIRE_PYTHON", "/work/peers/sphire-venv/bin/python"))


def planted_pixels() -> np.ndarray:
    """The images the fixture script wrote (seeded, so recomputed here rather than read back)."""
    return np.random.RandomState(TRUTH["seed"]).standard_normal((TRUTH["n"], TRUTH["box"], TRUTH["box"])) \
        .astype(np.float32)


def _db():
    try:
        from berkeleydb import db
    except ImportError:
        from bsddb3 import db
    return db


@pytest.fixture
def project(tmp_path) -> Path:
    """A writable copy of the fixture project directory."""
    dst = tmp_path / "proj"
    shutil.copytree(DATA, dst)
    return dst


def test_normal_stack_recovers_the_planted_images_and_headers():
    stack = read_particles(f"bdb:{DATA}#stack")
    t = stack.table
    apix = TRUTH["apix"]
    assert len(t) == TRUTH["n"] and stack.images.box == TRUTH["box"] and stack.pixel_size_A == apix
    np.testing.assert_array_equal(stack.images[:], planted_pixels())
    assert (t["image_index"] == np.arange(TRUTH["n"])).all()
    assert set(t["image_path"]) == {f"bdb:{DATA}#stack"}
    for i, p in enumerate(TRUTH["images"]):
        row = t.iloc[i]
        u, v, ang = eman_to_relion_defocus(p["defocus_um"], p["dfdiff_um"], p["dfang_deg"])
        # EMAN2Ctf stores float32 fields: 1e-3 Å on a defocus of 1e4 Å is float32 precision
        assert row["defocus_u_A"] == pytest.approx(float(u), abs=1e-2)
        assert row["defocus_v_A"] == pytest.approx(float(v), abs=1e-2)
        assert row["defocus_angle_deg"] == pytest.approx(float(ang), abs=1e-4)
        assert row["voltage_kV"] == p["voltage_kV"] and row["cs_mm"] == pytest.approx(p["cs_mm"])
        assert row["amplitude_contrast"] == pytest.approx(float(ampcont_percent_to_fraction(p["ampcont_percent"])))
        # set_params_proj(phi, theta, psi, s2x, s2y): SPIDER ZYZ = RELION (rot, tilt, psi); it stores t = -s2,
        # and s2 is RELION's origin (sp_relion2sphire passes rlnOriginX as s2x): origin = +s2 (docs/conventions.md)
        assert (row["angle_rot_deg"], row["angle_tilt_deg"], row["angle_psi_deg"]) == pytest.approx(
            (p["phi"], p["theta"], p["psi"]), abs=1e-4)
        assert (row["origin_x_A"], row["origin_y_A"]) == pytest.approx((p["s2x"] * apix, p["s2y"] * apix),
                                                                      abs=1e-5)
        assert (row["align_alpha_deg"], row["align_sx_px"], row["align_sy_px"]) == pytest.approx(
            (p["alpha"], p["sx"], p["sy"]), abs=1e-4)
        assert row["align_mirror"] == p["mirror"]
        assert row["micrograph_name"] == p["micrograph"]
        assert (row["coordinate_x_px"], row["coordinate_y_px"]) == tuple(p["coord"])
        assert row["ISAC_class_id"] == p["isac_class"] and row["my_weight"] == p["my_weight"]
    assert not {"timestamp", "data_path", "source_path", "maxrec"} & set(t.columns)


def test_headers_map_onto_the_table_as_eman2s_own_hdf_export_does():
    bdb = read_particles(f"bdb:{DATA}#stack")
    hdf = read_particles(DATA / "stack.hdf")            # written by EMAN2 from the same images in the script
    assert list(bdb.table.columns) == list(hdf.table.columns)
    np.testing.assert_array_equal(bdb.images[:], hdf.images[:])
    for col in bdb.table.columns:
        if col == "image_path":
            continue
        a, b = bdb.table[col], hdf.table[col]
        if a.dtype.kind == "f":                          # EMAN2's HDF CTF string has 10 significant digits
            np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-5, err_msg=col)
        else:
            assert a.tolist() == b.tolist(), col


def test_every_name_form_reads_the_same_stack(monkeypatch):
    reference = read_particles(f"bdb:{DATA}#stack").table
    monkeypatch.chdir(DATA)
    for name in ("bdb:stack", "EMAN2DB/stack.bdb", f"{DATA}/EMAN2DB/stack.bdb", f"bdb:{DATA}/stack", "bdb:.#stack"):
        assert particle_format(name) == "bdb"
        got = read_particles(name).table
        assert got.drop(columns="image_path").equals(reference.drop(columns="image_path")), name
        assert set(got["image_path"]) == {f"bdb:{DATA}#stack"}, name
    picked = read_particles("bdb:stack?5,0")
    assert picked.table["image_index"].tolist() == [5, 0]
    np.testing.assert_array_equal(picked.images[:], planted_pixels()[[5, 0]])


def test_virtual_stacks_follow_their_targets():
    pixels = planted_pixels()
    v = read_particles(f"bdb:{DATA}#vstack")             # e2bdb.py --makevstack --list, then sp_header.py --import
    members = TRUTH["vstack"]["members"]
    np.testing.assert_array_equal(v.images[:], pixels[members])
    assert [Path(s.path) for s in v.images.sources] == [DATA / "EMAN2DB" / "stack_32x32x1"]
    for row, m, a in zip(v.table.itertuples(), members, TRUTH["vstack"]["align2d"]):
        assert (row.align_alpha_deg, row.align_sx_px, row.align_sy_px, row.align_mirror) == pytest.approx(
            tuple(a[:4]), abs=1e-4)
        assert row.micrograph_name == TRUTH["images"][m]["micrograph"]
        assert row.angle_tilt_deg == pytest.approx(TRUTH["images"][m]["theta"], abs=1e-4)
    sub = read_particles(f"bdb:{DATA}/sub#vsub")         # a virtual stack in another directory (../../EMAN2DB/...)
    np.testing.assert_array_equal(sub.images[:], pixels[TRUTH["vsub"]["members"]])
    assert sub.table["my_weight"].tolist() == [TRUTH["images"][m]["my_weight"] for m in TRUTH["vsub"]["members"]]


def test_a_missing_stack_or_target_is_named(project, monkeypatch):
    monkeypatch.chdir(project)
    with pytest.raises(InputError, match=rf"^bdb:nothere: no such BDB stack: {project}/EMAN2DB/nothere.bdb does not exist$"):
        read_particles("bdb:nothere")
    with pytest.raises(InputError, match=rf"the directory {project}/elsewhere does not exist"):
        read_particles("bdb:elsewhere#stack")
    (project / "EMAN2DB" / "stack_32x32x1").unlink()
    target = project / "EMAN2DB" / "stack_32x32x1"
    with pytest.raises(InputError, match=rf"^bdb:sub#vsub: image 0 points to {target}, which does not exist"):
        read_particles("bdb:sub#vsub")


def test_truncated_data_and_incomplete_database(project):
    raw = project / "EMAN2DB" / "stack_32x32x1"
    raw.write_bytes(raw.read_bytes()[: 4 * 32 * 32 * 4])
    with pytest.raises(InputError, match=r"truncated: .*stack_32x32x1 holds 4 images of 32x32 but image slot 5"):
        read_particles(f"bdb:{project}#stack")
    db = _db()
    handle = db.DB()
    handle.open(str(project / "EMAN2DB" / "vstack.bdb"), "vstack", db.DB_BTREE, 0)
    handle.delete(pickle.dumps(1, 2))
    handle.close()
    with pytest.raises(InputError, match=r"lists 3 images but holds 2 .*still being written"):
        read_particles(f"bdb:{project}#vstack")


def test_a_damaged_database_gets_one_line_instead_of_a_hang(project):
    file = project / "EMAN2DB" / "stack.bdb"
    data = bytearray(file.read_bytes())
    data[3 * 4096:4 * 4096] = b"\xff" * 4096                   # one page overwritten (a cursor would loop on it)
    file.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"stack.bdb is damaged \(Berkeley DB verification failed\)"):
        read_particles(f"bdb:{project}#stack")
    file.write_bytes(bytes(data[: len(data) // 2]))             # half-written
    with pytest.raises(InputError, match=r"stack.bdb is damaged"):
        read_particles(f"bdb:{project}#stack")


def test_a_database_from_a_newer_berkeley_db_gets_one_line(project):
    file = project / "EMAN2DB" / "stack.bdb"
    data = bytearray(file.read_bytes())
    magic, version = struct.unpack("<II", data[12:20])
    assert magic == 0x053162 and version == 9                    # libdb 5.3's btree format, as EMAN2 wrote it
    data[16:20] = struct.pack("<I", 10)                           # what a newer libdb would write
    file.write_bytes(bytes(data))
    with pytest.raises(InputError) as err:
        read_particles(f"bdb:{project}#stack")
    message = str(err.value)
    assert "\n" not in message
    assert "written by a newer Berkeley DB (btree format 10)" in message and "e2proc2d.py" in message


def test_a_database_held_open_for_writing_by_an_eman2_environment_is_read_without_waiting(project, tmp_path):
    """EMAN2 writes through a shared environment with locks; isavar reads outside it, read-only, never blocking."""
    db = _db()
    env = db.DBEnv()
    (tmp_path / "env").mkdir()
    env.open(str(tmp_path / "env"), db.DB_CREATE | db.DB_INIT_MPOOL | db.DB_INIT_LOCK | db.DB_INIT_LOG
             | db.DB_THREAD)
    writer = db.DB(env)
    writer.open(str(project / "EMAN2DB" / "stack.bdb"), "stack", db.DB_BTREE, db.DB_THREAD)
    lock = env.lock_get(env.lock_id(), b"stack", db.DB_LOCK_WRITE)
    try:
        stack = read_particles(f"bdb:{project}#stack")
        np.testing.assert_array_equal(stack.images[:], planted_pixels())
    finally:
        env.lock_put(lock)
        writer.close()
        env.close()


def test_python2_era_pickles_are_read():
    """Keys and headers pickled by Python 2.7's cPickle as EMAN2 2.x stored them (tests/data/bdb/py2): Python 2
    str (Latin-1 bytes) and unicode, long ints, EMAN2 objects as (libpy... class, args) reductions."""
    truth = json.loads((DATA / "py2" / "truth.json").read_text())
    stack = read_particles(f"bdb:{DATA / 'py2'}#old")
    pixels = np.random.RandomState(truth["seed"]).standard_normal((truth["n"], truth["box"], truth["box"]))
    np.testing.assert_array_equal(stack.images[:], pixels.astype(np.float32))   # slots stored in reverse order
    t = stack.table
    for i, p in enumerate(truth["images"]):
        row = t.iloc[i]
        assert row["micrograph_name"] == f"mic_été_{i}.mrc" and row["note"] == "café"
        assert row["members"].tolist() == [3 * i, 3 * i + 1, 3 * i + 2] and row["big"] == 2 ** 40 + i
        assert (row["align_alpha_deg"], row["align_sx_px"], row["align_sy_px"], row["align_mirror"]) == \
            pytest.approx((p["alpha"], p["sx"], p["sy"], 0), abs=1e-9)
        assert row["angle_tilt_deg"] == pytest.approx(0.0, abs=1e-9)
        assert (row["angle_rot_deg"] + row["angle_psi_deg"]) % 360 == pytest.approx(p["rot_plus_psi"])
        # the fixture's "ox", "oy" are the translation stored in xform.projection, which SPHIRE keeps as -origin
        assert (row["origin_x_A"], row["origin_y_A"]) == pytest.approx((-2.0 * p["ox"], -2.0 * p["oy"]))
        assert row["defocus_u_A"] == pytest.approx(1e4 * p["defocus_um"]) and row["pixel_size_A"] == 2.0


def test_pickles_naming_other_classes_are_refused(tmp_path):
    db = _db()
    (tmp_path / "EMAN2DB").mkdir()
    handle = db.DB()
    handle.open(str(tmp_path / "EMAN2DB" / "bad.bdb"), "bad", db.DB_BTREE, db.DB_CREATE)
    handle.put(pickle.dumps(0, 2), b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R.")
    handle.put(pickle.dumps("maxrec", 2), pickle.dumps(0, 2))
    handle.close()
    with pytest.raises(InputError, match=r"bad.bdb: the header holds an object of class os.system"):
        read_particles(f"bdb:{tmp_path}#bad")


def test_a_missing_binding_names_the_install_command(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_bdb(name, *args, **kwargs):
        if name.split(".")[0] in ("berkeleydb", "bsddb3"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bdb)
    with pytest.raises(InputError, match=r"needs a Berkeley DB binding: pip install 'isavar\[bdb\]'"):
        read_particles(f"bdb:{DATA}#stack")


def test_written_stacks_read_back_and_follow_eman2s_layout(tmp_path):
    """isavar's BDB writer (used for SPHIRE substacks) against the reader, and against EMAN2 when it is built."""
    from isavar.io.bdb import EMAN2Ctf, Transform, write_bdb

    pixels = planted_pixels()
    headers = [{"apix_x": 1.5, "xform.align2d": Transform([1, 0, 0, 0.5 * k, 0, 1, 0, -k, 0, 0, 1, 0]),
                "ctf": EMAN2Ctf([2.0, 0.1, 30.0, 0.0, 10.0, 300.0, 2.7, 1.5, 0.0]), "ISAC_class_id": k}
               for k in range(len(pixels))]
    write_bdb(tmp_path, "normal", headers, 32, images=[pixels])
    raw = tmp_path / "EMAN2DB" / "normal_32x32x1"
    write_bdb(tmp_path / "sub", "virtual", headers[:3][::-1], 32, data_paths=[(raw, 2), (raw, 1), (raw, 0)])
    normal = read_particles(f"bdb:{tmp_path}#normal")
    np.testing.assert_array_equal(normal.images[:], pixels)
    assert normal.table["align_sx_px"].tolist() == [0.5 * k for k in range(6)]
    virtual = read_particles(f"bdb:{tmp_path}/sub#virtual")
    np.testing.assert_array_equal(virtual.images[:], pixels[[2, 1, 0]])
    assert virtual.table["ISAC_class_id"].tolist() == [2, 1, 0]
    with pytest.raises(InputError, match="already exists"):
        write_bdb(tmp_path, "normal", headers, 32, images=[pixels])
    if not SPHIRE_PYTHON.exists():
        pytest.skip("EMAN2 is not built here (set ISAVAR_SPHIRE_PYTHON)")
    script = ("import EMAN2, sys\n"
              "for url in sys.argv[1:]:\n"
              "    n = EMAN2.EMUtil.get_image_count(url)\n"
              "    for i in range(n):\n"
              "        e = EMAN2.EMData(url, i)\n"
              "        p = e['xform.align2d'].get_params('2D')\n"
              "        print(url[-7:], i, repr(float(e['mean'])), e['ISAC_class_id'], p['tx'], e['ctf'].defocus)\n")
    out = subprocess.run([str(SPHIRE_PYTHON), "-W", "ignore", "-c", script, f"bdb:{tmp_path}#normal",
                          f"bdb:{tmp_path}/sub#virtual"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line.split() for line in out.stdout.splitlines() if line.endswith(("2.0", "2"))]
    got = {(w[0], int(w[1])): w for w in lines}
    for k in range(6):
        w = got[("#normal", k)]
        assert float(w[2]) == pytest.approx(float(pixels[k].mean()), abs=1e-5)
        assert int(w[3]) == k and float(w[4]) == pytest.approx(0.5 * k) and float(w[5]) == pytest.approx(2.0)
    for j, k in enumerate([2, 1, 0]):
        w = got[("virtual", j)]
        assert float(w[2]) == pytest.approx(float(pixels[k].mean()), abs=1e-5) and int(w[3]) == k
