"""The example command lines of SPHIRE's ISAC2 and 3D variability pages, run verbatim on BDB stacks.

The stacks are simulated particles written in EMAN2's BDB layout by ``isavar.io.bdb.write_bdb``, whose
output EMAN2 2.91 itself reads back (``tests/io/test_bdb.py``); the reader is checked against stacks written
by real EMAN2/SPHIRE there.
"""

from __future__ import annotations

import importlib.util
import json
import shlex

import numpy as np
import pytest

from isavar.cli import main
from isavar.io import read_particles, read_volume, write_particles

HAVE_BINDING = any(importlib.util.find_spec(m) is not None for m in ("berkeleydb", "bsddb3"))
pytestmark = pytest.mark.skipif(not HAVE_BINDING, reason="no Berkeley DB binding (pip install 'isavar[bdb]')")

#: As printed on the SPHIRE pages (``sx3dvariability.py`` is ``isavar 3dvariability``).
VARIABILITY_EXAMPLE = ("isavar 3dvariability bdb:data outdir_3dvariability --img_per_grp=100 --sym=c2 --CTF "
                       "--fl=0.25 --aaf=0.1")
ISAC2_EXAMPLE = "isavar isac2 bdb:stack isac2_outdir --radius=120 --CTF"


def _run(command: str) -> int:
    argv = shlex.split(command)
    assert argv[0] == "isavar"
    return main(argv[1:])


def _bdb_project(folder, name, box, apix, n, **simulate):
    from isavar.io.bdb import headers_from_table, write_bdb
    from isavar.synthetic import phantom_volume, simulate_particles

    vol = phantom_volume("blob", box, apix)
    imgs, table = simulate_particles(vol, n, pixel_size_A=apix, **simulate)
    write_bdb(folder, name, headers_from_table(table), box, images=[imgs])
    return vol, imgs, table


def test_3dvariability_example_runs_verbatim_on_a_bdb_stack(tmp_path, monkeypatch):
    vol, imgs, table = _bdb_project(tmp_path, "data", 48, 3.0, 400, snr=1.0, shift_sd_A=1.5, rng=5)
    monkeypatch.chdir(tmp_path)
    assert _run(VARIABILITY_EXAMPLE) == 0
    out = tmp_path / "outdir_3dvariability"
    var3d, voxel = read_volume(out / "var3D.mrc")
    ave3d, _ = read_volume(out / "ave3D.mrc")
    assert voxel == pytest.approx(3.0) and var3d.shape == (48, 48, 48) and np.isfinite(var3d).all()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_particles"] == 400 and summary["input"] == "bdb:data"
    assert summary["parameters"]["lowpass_aa"] == 0.1 and summary["parameters"]["symmetry"] == "c2"
    # the neighbourhood average recovers the planted map (low-passed, inside the particle)
    a, b = ave3d - ave3d.mean(), vol - vol.mean()
    assert float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())) > 0.8
    # the same particles from HDF with the option's other spelling give the same maps
    write_particles(tmp_path / "data.hdf", imgs, read_particles("bdb:data").table)
    assert _run("isavar 3dvariability data.hdf out_hdf --img_per_grp=100 --sym=c2 --CTF --fl=0.25 --aa=0.1") == 0
    np.testing.assert_allclose(read_volume(tmp_path / "out_hdf" / "var3D.mrc")[0], var3d, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_isac2_example_runs_verbatim_on_a_bdb_stack(tmp_path, monkeypatch):
    """Box 256 so that --radius=120 fits; two planted views: two classes, each of one view (about 3 minutes)."""
    _, _, table = _bdb_project(tmp_path, "stack", 256, 1.0, 400, snr=1.0, orientations="views:2", shift_sd_A=2.0,
                               rng=3)
    monkeypatch.chdir(tmp_path)
    assert _run(ISAC2_EXAMPLE) == 0
    out = tmp_path / "isac2_outdir"
    members = read_particles(out / "class_averages.hdf").table["members"]
    assert len(members) == 2
    views = table["true_view"].to_numpy()
    for m in members:
        m = np.asarray(m)
        assert len(m) >= 150
        assert np.bincount(views[m]).max() / len(m) >= 0.95
    assert _run("isavar isac2-select isac2_outdir selected --classes 1 -q") == 0
    assert len(np.loadtxt(tmp_path / "selected" / "isacselect.txt")) == len(
        read_particles(out / "ordered_class_averages.hdf").table["members"].iloc[0])


FIXTURE = __import__("pathlib").Path(__file__).resolve().parents[1] / "data" / "bdb"


@pytest.mark.parametrize("argv", [
    ["isac2", "bdb:nothere", "out", "--radius=10"],
    ["3dvariability", "bdb:nothere", "out"],
    ["reconstruct", "bdb:nothere", "out.mrc"],
    ["info", "bdb:nothere"],
    ["convert", "bdb:nothere", "out.hdf"],
])
def test_every_command_names_a_missing_bdb_stack_in_one_line(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.endswith(f"bdb:nothere: no such BDB stack: {tmp_path.resolve()}/EMAN2DB/nothere.bdb "
                                            "does not exist")
    assert not (tmp_path / "out").exists()


def test_info_convert_and_reconstruct_read_sphire_bdb_stacks(tmp_path, capsys):
    """The stacks EMAN2/SPHIRE wrote (tests/data/bdb) through the commands."""
    assert main(["info", f"bdb:{FIXTURE}#vstack"]) == 0
    text = capsys.readouterr().out
    assert "count         3" in text and "CTF           yes" in text and "2D alignment  yes" in text
    assert main(["convert", f"bdb:{FIXTURE}#vstack", str(tmp_path / "v.star"), "-q"]) == 0
    star = read_particles(tmp_path / "v.star")
    np.testing.assert_array_equal(star.images[:], read_particles(f"bdb:{FIXTURE}#vstack").images[:])
    assert star.table["micrograph_name"].tolist() == ["Movies/mic_002.mrc", "Movies/mic_000.mrc",
                                                      "Movies/mic_002.mrc"]
    assert main(["reconstruct", f"{FIXTURE}/EMAN2DB/stack.bdb", str(tmp_path / "map.mrc"), "--CTF", "-q",
                 "--workers", "1"]) == 0
    volume, voxel = read_volume(tmp_path / "map.mrc")
    assert volume.shape == (32, 32, 32) and voxel == pytest.approx(1.5) and np.isfinite(volume).all()
