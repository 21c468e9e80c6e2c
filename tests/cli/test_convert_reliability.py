"""convert after killed runs (stale temporaries, orphaned sidecars), the pixel-size rule, the workers cap."""

from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from isavar.cli import main
from isavar.io import read_particles, write_particles


@pytest.fixture
def star(tmp_path, rng):
    from isavar.io.particles import new_table

    imgs = rng.normal(size=(12, 16, 16)).astype(np.float32)
    table = new_table(12, pixel_size_A=1.5)
    table["defocus_u_A"] = 15000.0
    path = tmp_path / "in" / "p.star"
    path.parent.mkdir()
    write_particles(path, imgs, table)
    return path


def _dead_pid() -> int:
    pid = 4_000_000
    while Path(f"/proc/{pid}").exists() or pid == os.getpid():
        pid -= 1
    return pid


def test_stale_temporaries_of_dead_processes_are_removed(star, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / f".o.hdf.{_dead_pid()}.tmp", out / f".o.star.{_dead_pid()}.raw"]
    live = out / f".o.hdf.{os.getppid()}.tmp"                  # a running process's: left alone
    other = out / f".notes.txt.{_dead_pid()}.tmp"               # not a temporary of this output
    for p in (*stale, live, other):
        p.write_bytes(b"x" * 1000)
    assert main(["convert", str(star), str(out / "o.hdf")]) == 0
    assert not stale[0].exists() and stale[1].exists()          # only temporaries of the target's files
    assert live.exists() and other.exists()
    assert "left behind by a convert run that was killed" in capsys.readouterr().err
    assert main(["convert", str(star), str(out / "o.star")]) == 0
    assert not stale[1].exists()


def test_orphaned_sidecar_is_replaced_but_a_foreign_stack_is_not(star, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    # a run killed between o.mrcs and o.star leaves an isavar-made o.mrcs alone
    write_particles(out / "o.mrcs", np.zeros((3, 16, 16), np.float32), read_particles(star).table.iloc[:3])
    assert main(["convert", str(star), str(out / "o.star"), "-q"]) == 0
    assert "no o.star beside it" in capsys.readouterr().err
    assert len(read_particles(out / "o.star").table) == 12
    # a stack some other program wrote is never replaced without --force
    with mrcfile.new(out / "f.mrcs") as m:
        m.set_data(np.zeros((2, 16, 16), np.float32))
    data = (out / "f.mrcs").read_bytes()
    assert main(["convert", str(star), str(out / "f.star"), "-q"]) == 2
    assert "f.mrcs: already exists without f.star beside it" in capsys.readouterr().err
    assert (out / "f.mrcs").read_bytes() == data and not (out / "f.star").exists()


def test_pixel_size_fills_in_or_replaces_only_when_asked(star, tmp_path, rng):
    assert main(["convert", str(star), str(tmp_path / "same.hdf"), "--pixel-size", "1.5", "-q"]) == 0
    assert read_particles(tmp_path / "same.hdf").pixel_size_A == pytest.approx(1.5)
    assert main(["convert", str(star), str(tmp_path / "new.hdf"), "--pixel-size", "2", "--replace-pixel-size",
                 "-q"]) == 0
    assert read_particles(tmp_path / "new.hdf").pixel_size_A == pytest.approx(2.0)
    bare = tmp_path / "bare.mrcs"
    with mrcfile.new(bare) as m:                                     # states no pixel size
        m.set_data(rng.normal(size=(4, 16, 16)).astype(np.float32))
        m.set_image_stack()
    assert main(["convert", str(bare), str(tmp_path / "bare2.star"), "--pixel-size", "1.2", "-q"]) == 0
    assert read_particles(tmp_path / "bare2.star").pixel_size_A == pytest.approx(1.2)


def test_workers_beyond_the_cores_are_capped_with_a_warning(star, tmp_path, capsys):
    from isavar.parallel.pool import available_cores

    table = read_particles(star).table
    table["angle_rot_deg"], table["angle_tilt_deg"], table["angle_psi_deg"] = 0.0, 90.0, 0.0
    oriented = tmp_path / "o.star"
    write_particles(oriented, read_particles(star).images, table)
    assert main(["reconstruct", str(oriented), str(tmp_path / "m.mrc"), "--executor", "pool",
                 "--workers", "100000", "-q"]) == 0
    err = capsys.readouterr().err
    assert f"--workers 100000 is more than the {available_cores()} cores available" in err


def test_a_convert_killed_with_sigkill_is_cleaned_up_by_the_next_run(tmp_path, rng):
    """A real ``kill -9`` while the HDF file is being written; the next run removes the temporary file."""
    import signal
    import subprocess
    import sys
    import time

    from isavar.io.particles import new_table

    src = tmp_path / "big.star"
    write_particles(src, rng.normal(size=(1500, 24, 24)).astype(np.float32), new_table(1500, pixel_size_A=2.0))
    dst = tmp_path / "out" / "o.hdf"
    dst.parent.mkdir()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src") + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "isavar", "convert", str(src), str(dst), "--chunk-size", "32",
                             "-q"], env=env)
    tmp = dst.with_name(f".o.hdf.{proc.pid}.tmp")
    deadline = time.monotonic() + 60
    while not (tmp.exists() and tmp.stat().st_size > 50_000) and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if dst.exists():                                               # pragma: no cover - machine too fast
        pytest.skip("the conversion finished before it could be killed")
    assert tmp.exists()                                            # what a killed run leaves behind
    assert main(["convert", str(src), str(dst), "-q"]) == 0
    assert not tmp.exists() and [p.name for p in dst.parent.iterdir()] == ["o.hdf"]
    assert len(read_particles(dst).table) == 1500
