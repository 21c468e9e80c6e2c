"""The bad-input table: every command, every kind of bad input, one row each.

Each row runs ``isavar <command> ...`` in-process and checks what a user sees and what is left: exactly one
line on stderr naming the problem, a non-zero exit status, no traceback, no file created or overwritten,
and the inputs unchanged (SHA-256 of every file before and after). A new kind of bad input is one line in
``CASES``. Rows whose setup needs something more (a full disk, a failing write) patch it with
``monkeypatch`` in their ``patch`` function.
"""

from __future__ import annotations

import errno
import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from isavar.cli import main

BOX, PIX, N = 24, 3.0, 60


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Good and bad input files, made once; the tests copy them."""
    from isavar.io import write_particles
    from isavar.synthetic import phantom_volume, simulate_particles

    d = tmp_path_factory.mktemp("bad_input_sources")
    a, b = phantom_volume("two_state", BOX, PIX)
    imgs, table = simulate_particles([a, b], N, pixel_size_A=PIX, snr=2.0, ctf=True, rng=3)
    write_particles(d / "good.star", imgs, table)
    write_particles(d / "good_cs.cs", imgs, table)
    write_particles(d / "nan.star", imgs, table)
    with mrcfile.open(d / "nan.mrcs", "r+") as m:
        m.data[3, 4, 4] = np.nan
    blocks = starfile.read(d / "good.star", always_dict=True)
    blocks["particles"] = pd.concat([blocks["particles"], blocks["particles"].iloc[[5]]], ignore_index=True)
    starfile.write(blocks, d / "dup.star")
    with mrcfile.new(d / "map.mrc") as m:
        m.set_data(a.astype(np.float32))
        m.set_volume()
        m.voxel_size = PIX
    cs = np.load(d / "good_cs.cs")
    for name, field_, values in (("float_idx", "blob/idx", cs["blob/idx"].astype(np.float64) + 0.5),
                                 ("bad_shape", "blob/shape", cs["blob/shape"] * 2),
                                 ("text_defocus", "ctf/df1_A", cs["ctf/df1_A"].astype("S12"))):
        dtype = [(n, values.dtype if n == field_ else cs.dtype[n].base, cs.dtype[n].shape) for n in cs.dtype.names]
        bad = np.zeros(len(cs), dtype=dtype)
        for n in cs.dtype.names:
            bad[n] = values if n == field_ else cs[n]
        with open(d / f"{name}.cs", "wb") as fh:
            np.save(fh, bad)
    (d / "a_file").write_text("not a folder\n")
    return d


@dataclass
class Case:
    """One bad input: ``argv`` gets the folder holding the inputs and returns the command line."""

    id: str
    argv: Callable[[Path], list]
    message: str
    code: int = 2
    patch: Callable | None = None
    existing: tuple = field(default_factory=tuple)      # outputs that exist beforehand and must survive


def _no_space(monkeypatch):
    import isavar.workflows.outputs as outputs

    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))


def _read_only(monkeypatch):
    """Every folder refuses new files, as a folder without write permission (root ignores chmod) would."""
    import isavar.workflows.outputs as outputs

    def mkstemp(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(outputs.tempfile, "mkstemp", mkstemp)


def _write_fails_enospc(monkeypatch):
    import isavar.io as io

    def write_particles(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "write_particles", write_particles)


ISAC = ["--radius", "8", "--target_radius", "6", "--target_nx", "20", "--img_per_grp", "20",
        "--minimum_grp_size", "10", "--CTF", "--workers", "1", "-q"]
VAR = ["--img_per_grp", "5", "--workers", "1", "-q"]

CASES = [
    # isac2
    Case("isac2-nan-pixels", lambda d: ["isac2", d / "nan.star", d / "out", *ISAC], "contains NaN"),
    Case("isac2-volume", lambda d: ["isac2", d / "map.mrc", d / "out", *ISAC[:-3], "-q"], "3D volume"),
    Case("isac2-duplicated-rows", lambda d: ["isac2", d / "dup.star", d / "out", *ISAC], "row 61 repeats row 6"),
    Case("isac2-xr-1000", lambda d: ["isac2", d / "good.star", d / "out", *ISAC, "--xr", "1000"], "of memory"),
    Case("isac2-outdir-under-a-file", lambda d: ["isac2", d / "good.star", d / "a_file" / "out", *ISAC],
         "is not a directory"),
    Case("isac2-outdir-not-writable", lambda d: ["isac2", d / "good.star", d / "out", *ISAC],
         "cannot write in", patch=_read_only),
    Case("isac2-workers-0", lambda d: ["isac2", d / "good.star", d / "out", *ISAC, "--workers", "0"],
         "--workers: must be at least 1"),
    Case("isac2-radius-negative", lambda d: ["isac2", d / "good.star", d / "out", *ISAC, "--radius", "-3"],
         "--radius"),
    Case("isac2-negative-seed", lambda d: ["isac2", d / "good.star", d / "out", *ISAC, "--rand_seed", "-5"],
         "--rand_seed: must be >= 0"),
    Case("isac2-nan-threshold", lambda d: ["isac2", d / "good.star", d / "out", *ISAC, "--thld_err", "nan"],
         "--thld_err: must be a finite number"),
    Case("isac2-missing-input", lambda d: ["isac2", d / "nope.star", d / "out", *ISAC], "file not found"),
    # 3dvariability
    Case("3dvar-nan-pixels", lambda d: ["3dvariability", d / "nan.star", d / "out", *VAR], "contains NaN"),
    Case("3dvar-radius-too-large", lambda d: ["3dvariability", d / "good.star", d / "out", *VAR, "--radius", "100"],
         "--radius 100 is outside (0, 12]"),
    Case("3dvar-radius-negative", lambda d: ["3dvariability", d / "good.star", d / "out", *VAR, "--radius=-7"],
         "--radius -7 is outside"),
    Case("3dvar-nan-lowpass", lambda d: ["3dvariability", d / "good.star", d / "out", *VAR, "--fl", "nan", "--aa",
                                         "0.1"], "--fl: must be a finite number"),
    Case("3dvar-chunk-size-0", lambda d: ["3dvariability", d / "good.star", d / "out", *VAR, "--chunk-size", "0"],
         "--chunk-size: must be at least 1"),
    Case("3dvar-duplicated-rows", lambda d: ["3dvariability", d / "dup.star", d / "out", *VAR], "repeat an earlier"),
    Case("3dvar-volume", lambda d: ["3dvariability", d / "map.mrc", d / "out", *VAR], "3D volume"),
    Case("3dvar-outdir-under-a-file", lambda d: ["3dvariability", d / "good.star", d / "a_file" / "o", *VAR],
         "is not a directory"),
    Case("3dvar-outdir-not-writable", lambda d: ["3dvariability", d / "good.star", d / "out", *VAR],
         "Permission denied", patch=_read_only),
    Case("3dvar-no-disk-space", lambda d: ["3dvariability", d / "good.star", d / "out", *VAR], "of disk space",
         patch=_no_space),
    # reconstruct
    Case("reconstruct-chunk-size-negative", lambda d: ["reconstruct", d / "good.star", d / "m.mrc", "--chunk-size",
                                                       "-5", "-q"], "--chunk-size: must be at least 1"),
    Case("reconstruct-chunk-size-0", lambda d: ["reconstruct", d / "good.star", d / "m.mrc", "--chunk-size", "0"],
         "--chunk-size: must be at least 1"),
    Case("reconstruct-npad-0", lambda d: ["reconstruct", d / "good.star", d / "m.mrc", "--npad", "0"],
         "--npad: must be at least 1"),
    Case("reconstruct-radius-negative", lambda d: ["reconstruct", d / "good.star", d / "m.mrc", "--radius=-7"],
         "--radius must be > 0"),
    Case("reconstruct-radius-too-large", lambda d: ["reconstruct", d / "good.star", d / "m.mrc", "--radius", "100",
                                                    "-q"], "larger than half"),
    Case("reconstruct-output-under-a-file", lambda d: ["reconstruct", d / "good.star", d / "a_file" / "m.mrc", "-q"],
         "is not a directory"),
    Case("reconstruct-output-not-writable", lambda d: ["reconstruct", d / "good.star", d / "m.mrc", "-q"],
         "Permission denied", patch=_read_only),
    Case("reconstruct-output-not-a-map-format", lambda d: ["reconstruct", d / "good.star", d / "m.star", "-q"],
         ".mrc or .hdf"),
    Case("reconstruct-duplicated-rows", lambda d: ["reconstruct", d / "dup.star", d / "m.mrc", "-q"],
         "repeat an earlier"),
    Case("reconstruct-volume", lambda d: ["reconstruct", d / "map.mrc", d / "m.mrc", "-q"], "3D volume"),
    Case("reconstruct-existing-output", lambda d: ["reconstruct", d / "good.star", d / "good.mrcs", "-q"],
         "exists", existing=("good.mrcs",)),
    # convert
    Case("convert-pixel-size-0", lambda d: ["convert", d / "good.star", d / "o.hdf", "--pixel-size", "0"],
         "--pixel-size/--apix: must be a positive number"),
    Case("convert-pixel-size-negative", lambda d: ["convert", d / "good.star", d / "o.hdf", "--pixel-size=-1"],
         "--pixel-size/--apix: must be a positive number"),
    Case("convert-pixel-size-replaces-stated", lambda d: ["convert", d / "good.star", d / "o.hdf", "--pixel-size",
                                                          "2", "-q"], "--replace-pixel-size"),
    Case("convert-volume-pixel-size-replaces-stated", lambda d: ["convert", d / "map.mrc", d / "o.hdf",
                                                                 "--pixel-size", "2", "-q"], "--replace-pixel-size"),
    Case("convert-chunk-size-0", lambda d: ["convert", d / "good.star", d / "o.hdf", "--chunk-size", "0"],
         "--chunk-size: must be at least 1"),
    Case("convert-cs-float-idx", lambda d: ["convert", d / "float_idx.cs", d / "o.star", "-q"], "blob/idx"),
    Case("convert-cs-wrong-blob-shape", lambda d: ["convert", d / "bad_shape.cs", d / "o.star", "-q"],
         "blob/shape of particle 1 is 48 x 48"),
    Case("convert-cs-text-defocus", lambda d: ["convert", d / "text_defocus.cs", d / "o.star", "-q"], "ctf/df1_A"),
    Case("convert-output-under-a-file", lambda d: ["convert", d / "good.star", d / "a_file" / "o.hdf", "-q"],
         "is not a directory"),
    Case("convert-output-not-writable", lambda d: ["convert", d / "good.star", d / "o.hdf", "-q"],
         "Permission denied", patch=_read_only),
    Case("convert-existing-output", lambda d: ["convert", d / "good.star", d / "good_cs.cs", "-q"], "already exists",
         existing=("good_cs.cs",)),
    Case("convert-no-disk-space", lambda d: ["convert", d / "good.star", d / "o.hdf", "-q"], "of disk space",
         patch=_no_space),
    Case("convert-disk-full-while-writing", lambda d: ["convert", d / "good.star", d / "o.hdf", "-q"],
         "o.hdf: no space left on device", code=1, patch=_write_fails_enospc),
    # info
    Case("info-missing-file", lambda d: ["info", d / "nope.star"], "file not found"),
    Case("info-cs-float-idx", lambda d: ["info", d / "float_idx.cs"], "blob/idx"),
    # simulate and demo
    Case("simulate-n-0", lambda d: ["simulate", d / "sim", "--phantom", "blob", "--n", "0", "-q"], "--n must be"),
    Case("simulate-negative-seed", lambda d: ["simulate", d / "sim", "--phantom", "blob", "--seed", "-1"],
         "--seed: must be >= 0"),
    Case("simulate-nan-shift", lambda d: ["simulate", d / "sim", "--phantom", "blob", "--shift-sd", "nan"],
         "--shift-sd: must be a finite number"),
    Case("simulate-negative-voltage", lambda d: ["simulate", d / "sim", "--phantom", "blob", "--voltage=-300",
                                                 "-q"], "--voltage > 0"),
    Case("simulate-out-under-a-file", lambda d: ["simulate", d / "a_file" / "sim", "--phantom", "blob", "--n", "5",
                                                 "--box", "16", "-q"], "is not a directory"),
    Case("simulate-out-not-writable", lambda d: ["simulate", d / "sim", "--phantom", "blob", "--n", "5", "--box",
                                                 "16", "-q"], "Permission denied", patch=_read_only),
    Case("simulate-no-disk-space", lambda d: ["simulate", d / "sim", "--phantom", "blob", "--n", "5", "--box", "16",
                                              "-q"], "of disk space", patch=_no_space),
    Case("demo-n-0", lambda d: ["demo", d / "demo", "--n", "0"], "--n: must be at least 1"),
    Case("demo-out-under-a-file", lambda d: ["demo", d / "a_file" / "demo", "-q"], "is not a directory"),
    Case("demo-out-not-writable", lambda d: ["demo", d / "demo", "-q"], "Permission denied", patch=_read_only),
]


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, inputs, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(inputs, work)
    if case.patch is not None:
        case.patch(monkeypatch)
    before = _tree(work)
    try:
        code = main([str(a) for a in case.argv(work)])
    except SystemExit as exc:                      # argparse usage errors
        code = exc.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == case.code, captured.err
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and "error:" in lines[0]
    assert case.message in lines[0], lines[0]
    after = _tree(work)
    assert after == before, "files were created, changed or removed"
    for name in case.existing:
        assert (work / name).exists()
