"""``isavar isac2-select`` on a real ISAC2 run of small simulated data held in a BDB stack: the three ways to
choose classes, the RCT case, the SPHIRE substack files, RELION and EMAN2/SPHIRE reading the outputs, and errors."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile

from isavar.cli import main
from isavar.io import read_particles, write_image_stack, write_particles

HAVE_BINDING = any(importlib.util.find_spec(m) is not None for m in ("berkeleydb", "bsddb3"))
pytestmark = pytest.mark.skipif(not HAVE_BINDING, reason="no Berkeley DB binding (pip install 'isavar[bdb]')")
SPHIRE_PYTHON = Path("/work/peers/sphire-venv/bin/python")
BOX, APIX = 48, 3.0
ISAC_ARGS = ["--radius=18", "--target_radius=10", "--target_nx=28", "--img_per_grp=50", "--minimum_grp_size=20",
             "--maxit=8", "--init_iter=2", "--stab_ali=4", "--rand_seed=7", "--thld_err=0.7", "--CTF", "-q",
             "--workers", "1"]


@pytest.fixture(scope="module")
def isac(tmp_path_factory):
    """A BDB stack of 250 simulated particles (4 views, 10 % noise) and a finished ISAC2 run on it."""
    from isavar.io.bdb import headers_from_table, write_bdb
    from isavar.synthetic import phantom_volume, simulate_particles

    root = tmp_path_factory.mktemp("isac2_select")
    vol = phantom_volume("blob", BOX, APIX)
    imgs, table = simulate_particles(vol, 250, pixel_size_A=APIX, snr=0.3, orientations="views:4",
                                     shift_sd_A=3.0, noise_fraction=0.1, rng=11)
    write_bdb(root, "stack", headers_from_table(table), BOX, images=[imgs])
    assert main(["isac2", f"bdb:{root}#stack", str(root / "isac_out"), *ISAC_ARGS]) == 0
    return root


def _members(path) -> list[np.ndarray]:
    """Members of each average, read straight from the HDF headers (not through isavar's reader)."""
    import h5py

    with h5py.File(path, "r") as fh:
        names = sorted((k for k in fh["MDF/images"].keys() if k.isdigit()), key=int)
        return [np.sort(np.asarray(fh[f"MDF/images/{k}"].attrs["EMAN.members"], np.int64)) for k in names]


def _ids(out: Path) -> np.ndarray:
    return np.loadtxt(out / "isacselect.txt", dtype=np.int64, ndmin=1)


def _particles(out: Path) -> pd.DataFrame:
    return starfile.read(out / "particles.star", always_dict=True)["particles"]


def test_classes_in_ordered_and_unordered_numbering(isac, tmp_path):
    out_dir = isac / "isac_out"
    unordered, ordered = _members(out_dir / "class_averages.hdf"), _members(out_dir / "ordered_class_averages.hdf")
    assert len(ordered) >= 3
    out = tmp_path / "ordered"
    assert main(["isac2-select", str(out_dir), str(out), "--classes", "1,3", "-q"]) == 0
    want = np.sort(np.concatenate([ordered[0], ordered[2]]))
    np.testing.assert_array_equal(_ids(out), want)
    # the class numbers agree with those isavar isac2 wrote into its own particles.star (ordered numbering)
    isac_star = read_particles(out_dir / "particles.star").table       # rows: the accounted particles, ascending
    accounted = np.sort(np.loadtxt(out_dir / "processed_images.txt", dtype=np.int64))
    isac_class = dict(zip(accounted, isac_star["class_number"]))
    stars = _particles(out)
    assert len(stars) == len(want)
    assert stars["rlnClassNumber"].tolist() == [isac_class[i] for i in want]
    assert set(stars["rlnClassNumber"]) == {1, 3}
    # cryoSPARC file: same particles, 0-based class
    from cryosparc.dataset import Dataset

    cs = Dataset.load(out / "particles.cs")
    assert len(cs) == len(want)
    # unordered numbering counts class_averages.hdf
    out2 = tmp_path / "unordered"
    assert main(["isac2-select", str(out_dir), str(out2), "--classes", "2", "--numbering", "unordered", "-q"]) == 0
    np.testing.assert_array_equal(_ids(out2), unordered[1])
    out3 = tmp_path / "zero"
    assert main(["isac2-select", str(out_dir), str(out3), "--classes", "0,2", "--zero-based", "-q"]) == 0
    np.testing.assert_array_equal(_ids(out3), want)
    # the kept averages: edited copy with the members of the chosen classes
    kept = _members(out / "class_averages.hdf")
    np.testing.assert_array_equal(kept[0], ordered[0])
    np.testing.assert_array_equal(kept[1], ordered[2])
    sel = starfile.read(out / "class_selection.star", always_dict=True)["model_classes"]
    assert sel["rlnSelected"].tolist() == [1 if k in (1, 3) else 0 for k in range(1, len(ordered) + 1)]


def test_edited_averages_hdf_mrcs_and_selection_star(isac, tmp_path):
    out_dir = isac / "isac_out"
    ordered = read_particles(out_dir / "ordered_class_averages.hdf")
    keep = [0, 2]
    edited = tmp_path / "good.hdf"                        # bad averages deleted, headers kept (e2display's save)
    write_particles(edited, ordered.images[keep], ordered.table.iloc[keep])
    mrcs = tmp_path / "good.mrcs"                         # no headers: matched by pixels
    write_image_stack(mrcs, read_particles(out_dir / "class_averages.mrcs").images[keep], None)
    results = []
    for i, choice in enumerate((["--averages", str(edited)], ["--averages", str(mrcs)],
                                ["--classes", "1,3"])):
        out = tmp_path / f"out{i}"
        assert main(["isac2-select", str(out_dir), str(out), *choice, "-q"]) == 0
        results.append(_ids(out))
    star_out = tmp_path / "star"
    assert main(["isac2-select", str(out_dir), str(star_out), "--select-star",
                 str(tmp_path / "out2" / "class_selection.star"), "-q"]) == 0
    results.append(_ids(star_out))
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_members_of_one_class_of_one_generation(isac, tmp_path):
    out_dir = isac / "isac_out"
    gen = _members(out_dir / "main001" / "generation001" / "class_averages_001_001.hdf")
    out = tmp_path / "rct"
    assert main(["isac2-select", str(out_dir), str(out), "--generation", "1,1", "--classes", "2", "-q"]) == 0
    np.testing.assert_array_equal(_ids(out), gen[1])
    assert set(_particles(out)["rlnClassNumber"]) == {2}


def test_sphire_substack_files_and_virtual_stack(isac, tmp_path):
    from isavar.core.params2d import compose

    out_dir = isac / "isac_out"
    out = tmp_path / "sub"
    assert main(["isac2-select", str(out_dir), str(out), "--classes", "1,2", "-q"]) == 0
    ids = _ids(out)
    np.testing.assert_array_equal(np.loadtxt(out / "isac_substack_particle_id_list.txt", dtype=int), ids)
    membership = np.loadtxt(out / "particle_membership.txt", dtype=int)
    np.testing.assert_array_equal(membership[:, 0], ids)
    assert set(membership[:, 1]) == {0, 1}
    # scaled_all_parameters = prealignment, then ISAC's parameters with shifts in input pixels (SPHIRE's recipe)
    shrink = float((out_dir / "README_shrink_ratio.txt").read_text().splitlines()[5])
    pre = np.loadtxt(out_dir / "2dalignment" / "initial2Dparams.txt")
    par = np.loadtxt(out_dir / "all_parameters.txt")
    scaled = np.loadtxt(out / "scaled_all_parameters.txt")
    ok = par[:, 3] >= 0
    c = compose(tuple(pre[ok].T), (par[ok, 0], par[ok, 1] / shrink, par[ok, 2] / shrink, par[ok, 3]))
    np.testing.assert_allclose(scaled[ok, 1:3], np.column_stack([c.sx, c.sy]), atol=2e-6)
    np.testing.assert_allclose((scaled[ok, 0] - c.alpha + 180) % 360 - 180, 0, atol=2e-6)
    assert ((scaled[ok, 0] >= 0) & (scaled[ok, 0] < 360)).all()                # SPHIRE's range
    assert (scaled[~ok, 3] == -1).all()
    # the virtual substack: the members' own pixels, ISAC_class_id and the 2D alignment in the headers
    stack = read_particles(f"bdb:{isac}#stack")
    sub = read_particles(f"bdb:{out}#isac_substack")
    np.testing.assert_array_equal(sub.images[:], stack.images[ids])
    np.testing.assert_array_equal(sub.table["ISAC_class_id"], membership[:, 1])
    header = np.loadtxt(out / "isac_substack_header_align2d.txt")
    np.testing.assert_allclose(sub.table["align_sx_px"], header[:, 1], atol=1e-5)
    np.testing.assert_allclose(sub.table["align_sy_px"], header[:, 2], atol=1e-5)
    assert (sub.table["align_mirror"] == header[:, 3]).all()
    # particles.star holds the same alignment as RELION columns at the input pixel size
    from isavar.conventions import align2d_to_relion

    psi, tilt, ox, oy = align2d_to_relion(header[:, 0], header[:, 1], header[:, 2], header[:, 3])
    stars = _particles(out)
    np.testing.assert_allclose(stars["rlnOriginXAngst"], ox * APIX, atol=1e-4)
    np.testing.assert_allclose(stars["rlnAngleTilt"], tilt)
    # an HDF stack (the same particles converted) gives an HDF substack
    hdf = tmp_path / "stack.hdf"
    write_particles(hdf, stack.images, stack.table)
    out_h = tmp_path / "sub_hdf"
    assert main(["isac2-select", str(out_dir), str(out_h), "--classes", "1,2", "--stack", str(hdf), "-q"]) == 0
    np.testing.assert_array_equal(read_particles(out_h / "isac_substack.hdf").images[:], stack.images[ids])


@pytest.mark.relion
def test_relion_reads_the_selection(isac, tmp_path):
    if shutil.which("relion_star_handler") is None:
        pytest.skip("RELION is not installed")
    out = tmp_path / "sel"
    assert main(["isac2-select", str(isac / "isac_out"), str(out), "--classes", "1,2,3", "-q"]) == 0
    n = len(_ids(out))
    for k in (1, 2, 3):
        res = subprocess.run(["relion_star_handler", "--i", "particles.star", "--o", f"c{k}.star", "--select",
                              "rlnClassNumber", "--minval", str(k), "--maxval", str(k)], cwd=out,
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
    counts = [len(starfile.read(out / f"c{k}.star", always_dict=True)["particles"]) for k in (1, 2, 3)]
    ordered = _members(isac / "isac_out" / "ordered_class_averages.hdf")
    assert counts == [len(ordered[k]) for k in range(3)] and sum(counts) == n


def test_sphire_reads_the_virtual_substack(isac, tmp_path):
    if not SPHIRE_PYTHON.exists():
        pytest.skip("EMAN2/SPHIRE is not built here")
    out = tmp_path / "sub"
    assert main(["isac2-select", str(isac / "isac_out"), str(out), "--classes", "1,2", "-q"]) == 0
    script = ("import EMAN2, sys\nfrom sphire.libpy import sp_utilities as u\n"
              "url = sys.argv[1]\n"
              "for i in range(EMAN2.EMUtil.get_image_count(url)):\n"
              "    e = EMAN2.EMData(url, i)\n"
              "    a, x, y, m, s = u.get_params2D(e)\n"
              "    p = u.get_params_proj(e)\n"
              "    print('ROW', e['ISAC_class_id'], a, x, y, m, p[3], p[4], float(e['mean']))\n")
    res = subprocess.run([str(SPHIRE_PYTHON), "-W", "ignore", "-c", script, f"bdb:{out}#isac_substack"],
                         capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = np.array([[float(v) for v in line.split()[1:]] for line in res.stdout.splitlines()
                     if line.startswith("ROW")])
    align = np.loadtxt(out / "isac_substack_header_align2d.txt")
    proj = np.loadtxt(out / "isac_substack_header_projection.txt")
    membership = np.loadtxt(out / "particle_membership.txt", dtype=int)
    assert len(rows) == len(align)
    np.testing.assert_array_equal(rows[:, 0], membership[:, 1])
    np.testing.assert_allclose((rows[:, 1] - align[:, 0] + 180) % 360 - 180, 0, atol=1e-3)
    np.testing.assert_allclose(rows[:, 2:4], align[:, 1:3], atol=1e-4)
    np.testing.assert_array_equal(rows[:, 4], align[:, 3])
    np.testing.assert_allclose(rows[:, 5:7], proj[:, 3:5], atol=1e-4)    # SPHIRE's s2x, s2y of xform.projection
    ids = _ids(out)
    means = read_particles(f"bdb:{isac}#stack").images[ids].mean(axis=(1, 2))
    np.testing.assert_allclose(rows[:, 7], means, atol=1e-5)


@pytest.mark.parametrize("argv,message", [
    (["--classes", "1,99"], "class 99 does not exist: the run has {c} classes, numbered 1..{c} (ordered numbering)"),
    (["--classes", "0"], "class 0 does not exist"),
    (["--generation", "1,1", "--classes", "40"], "class 40 does not exist: generation 1 of main iteration 1"),
    (["--averages", "{resized}"], "the class averages are 32x32 pixels but those of"),
    ([], "choose the classes in exactly one way"),
    (["--classes", "1", "--averages", "x.hdf"], "choose the classes in exactly one way"),
])
def test_errors_are_one_line_and_write_nothing(isac, tmp_path, capsys, argv, message):
    out_dir = isac / "isac_out"
    c = len(_members(out_dir / "class_averages.hdf"))
    resized = tmp_path / "resized.mrcs"
    write_image_stack(resized, np.zeros((2, 32, 32), np.float32), None)
    argv = [a.format(resized=resized) for a in argv]
    out = tmp_path / "out"
    assert main(["isac2-select", str(out_dir), str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message.format(c=c) in err
    assert not out.exists()


def test_existing_output_and_missing_directory(isac, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    assert main(["isac2-select", str(isac / "isac_out"), str(out), "--classes", "1"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["isac2-select", str(tmp_path / "nothere"), str(tmp_path / "o2"), "--classes", "1"]) == 2
    assert "not an ISAC2 output directory" in capsys.readouterr().err


@pytest.mark.slow
def test_matches_sphires_own_isac2_and_isac_substack(isac, tmp_path):
    """SPHIRE 1.4.2 runs ISAC2 on the BDB stack and makes its substack (sp_pipe.py isac_substack); isac2-select on
    SPHIRE's directory writes the same files (to their last printed digit: 1e-6) and the same virtual stack."""
    if not SPHIRE_PYTHON.exists() or shutil.which("mpirun") is None:
        pytest.skip("EMAN2/SPHIRE is not built here")
    import os

    shutil.copytree(isac / "EMAN2DB", tmp_path / "EMAN2DB")
    env = dict(os.environ, PATH=f"{SPHIRE_PYTHON.parent}:{os.environ['PATH']}")
    sp_args = [a for a in ISAC_ARGS if a.split("=")[0] in ("--radius", "--target_radius", "--target_nx",
                                                               "--img_per_grp", "--minimum_grp_size", "--CTF")]
    for cmd in (["mpirun", "--allow-run-as-root", "-np", "2", str(SPHIRE_PYTHON), "-W", "ignore",
                 str(SPHIRE_PYTHON.parent / "sp_isac2.py"), "bdb:stack", "sp_out", *sp_args, "--rand_seed=7"],
                [str(SPHIRE_PYTHON), "-W", "ignore", str(SPHIRE_PYTHON.parent / "sp_pipe.py"), "isac_substack",
                 "bdb:stack", "sp_out", "sp_sub", "--isac_class_avgs_path=sp_out/class_averages.hdf"]):
        res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    c = len(_members(tmp_path / "sp_out" / "class_averages.hdf"))
    assert main(["isac2-select", str(tmp_path / "sp_out"), str(tmp_path / "is_sub"), "--stack",
                 f"bdb:{tmp_path}#stack", "--classes", f"1-{c}", "--numbering", "unordered", "-q"]) == 0
    for name in ("isac_substack_particle_id_list.txt", "particle_membership.txt"):
        assert (tmp_path / "sp_sub" / name).read_text() == (tmp_path / "is_sub" / name).read_text(), name
    for name in ("scaled_all_parameters.txt", "init_isac_params.txt", "isac_substack_header_align2d.txt",
                 "isac_substack_header_projection.txt", *(f"params_avg/params_avg_{k:03d}.txt" for k in range(c))):
        a, b = np.loadtxt(tmp_path / "sp_sub" / name, ndmin=2), np.loadtxt(tmp_path / "is_sub" / name, ndmin=2)
        assert a.shape == b.shape, name
        np.testing.assert_allclose(a, b, atol=2.5e-6, err_msg=name)
    theirs = read_particles(f"bdb:{tmp_path}/sp_sub#isac_substack")
    ours = read_particles(f"bdb:{tmp_path}/is_sub#isac_substack")
    np.testing.assert_array_equal(theirs.images[:], ours.images[:])
    assert set(theirs.table.columns) == set(ours.table.columns)
    for col in ("align_sx_px", "align_sy_px", "origin_x_A", "origin_y_A"):
        np.testing.assert_allclose(theirs.table[col], ours.table[col], atol=1e-5, err_msg=col)
    for col in ("align_alpha_deg", "angle_psi_deg"):
        np.testing.assert_allclose((theirs.table[col] - ours.table[col] + 180) % 360 - 180, 0, atol=1e-5)
    for col in ("align_mirror", "ISAC_class_id", "angle_tilt_deg", "angle_rot_deg"):
        np.testing.assert_array_equal(theirs.table[col], ours.table[col], err_msg=col)


def test_auto_keeps_the_classes_under_the_pixel_error_threshold(isac, tmp_path, capsys):
    import json

    out_dir = isac / "isac_out"
    per_class = json.loads((out_dir / "summary.json").read_text())["per_class"]
    errors = np.array([c["pixel_error_working_px"] for c in per_class])
    threshold = float(np.median(errors))
    ordered = _members(out_dir / "ordered_class_averages.hdf")
    out = tmp_path / "auto"
    assert main(["isac2-select", str(out_dir), str(out), "--auto", "--max-pixel-error", str(threshold), "-q"]) == 0
    kept = np.flatnonzero(errors <= threshold)
    assert 0 < len(kept) < len(errors) or len(set(errors)) == 1
    np.testing.assert_array_equal(_ids(out), np.sort(np.concatenate([ordered[k] for k in kept])))
    assert set(_particles(out)["rlnClassNumber"]) == set((kept + 1).tolist())
    # SPHIRE's directories record no per-class pixel errors
    sphire_like = tmp_path / "sphire_like"
    shutil.copytree(out_dir, sphire_like, ignore=shutil.ignore_patterns("summary.json", "stack_ali2d.npy"))
    assert main(["isac2-select", str(sphire_like), str(tmp_path / "o2"), "--auto"]) == 2
    assert "--auto needs the per-class pixel errors" in capsys.readouterr().err
