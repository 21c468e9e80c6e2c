"""3D variability reliability (issue 16): results independent of --chunk-size, interrupted runs resumed to
bit-identical outputs (also after kill -9), finished or different runs refused, rejected runs leave nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import pytest

import isavar.variability.run as vrun
from isavar.errors import InputError
from isavar.io import write_particles
from isavar.parallel.pool import PoolExecutor
from isavar.synthetic import phantom_volume, simulate_particles
from isavar.variability.params import VariabilityParams
from isavar.workflows.variability import run_variability

from _hooks import StopForTest, stop_after

BOX, PIX = 24, 3.0
SRC = str(Path(__file__).resolve().parents[2] / "src")
OUTPUTS = ("var3D.mrc", "ave3D.mrc", "var2D.mrcs", "ave2D.mrcs", "var2D.star", "ave2D.star")


@pytest.fixture(scope="module")
def star(tmp_path_factory):
    d = tmp_path_factory.mktemp("rel_var")
    a, b = phantom_volume("two_state", BOX, PIX)
    imgs, table = simulate_particles([a, b], 200, pixel_size_A=PIX, snr=2.0, ctf=True, weights=[0.3, 0.7], rng=5)
    path = d / "p.star"
    write_particles(path, imgs, table, pixel_size_A=PIX)
    return path


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 centres, so that 200 particles make several tasks, waves and checkpoints (one per wave)."""
    import isavar.workflows.variability as wvar

    monkeypatch.setattr(vrun, "BLOCK", 64)
    monkeypatch.setattr(wvar, "CHECKPOINT_SECONDS", 0.0)


def _same_files(a: Path, b: Path, names=OUTPUTS):
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _params(**kw):
    base = dict(img_per_grp=10, ctf=True)
    base.update(kw)
    return VariabilityParams(**base)


def test_maps_do_not_depend_on_chunk_size_or_workers(star, tmp_path, small_blocks):
    ref = tmp_path / "c1024"
    run_variability(star, ref, _params(chunk_size=1024))
    for cs in (7, 50):
        run_variability(star, tmp_path / f"c{cs}", _params(chunk_size=cs))
        _same_files(ref, tmp_path / f"c{cs}")
    pool = PoolExecutor(2)
    try:
        run_variability(star, tmp_path / "pool", _params(chunk_size=13), executor=pool)
    finally:
        pool.close()
    _same_files(ref, tmp_path / "pool")


def test_var_and_snd_modes_do_not_depend_on_chunk_size(star, tmp_path, small_blocks):
    run_variability(star, tmp_path / "a", _params(save_ave2d=False))
    for mode, kw in (("var", dict(var_input=True)), ("snd", dict(snd=True, img_per_grp=2))):
        run_variability(tmp_path / "a" / "var2D.star" if mode == "var" else star, tmp_path / f"{mode}1",
                        VariabilityParams(chunk_size=1024, **kw))
        run_variability(tmp_path / "a" / "var2D.star" if mode == "var" else star, tmp_path / f"{mode}2",
                        VariabilityParams(chunk_size=9, **kw))
        _same_files(tmp_path / f"{mode}1", tmp_path / f"{mode}2", ("var3D.mrc",))


def test_interrupted_run_continues_to_identical_outputs(star, tmp_path, small_blocks):
    ref = tmp_path / "ref"
    run_variability(star, ref, _params())
    out = tmp_path / "run"
    with pytest.raises(StopForTest):
        run_variability(star, out, _params(), on_checkpoint=stop_after(2))
    assert (out / "checkpoints" / "groups.npz").exists() and (out / ".var2D.scratch").exists()
    assert json.loads((out / "manifest.json").read_text())["stage"] == "running"
    with pytest.raises(StopForTest):                               # interrupted again, later
        run_variability(star, out, _params(chunk_size=33), on_checkpoint=stop_after(1))
    run_variability(star, out, _params(chunk_size=17))            # chunk size is free to change
    _same_files(ref, out)
    assert not list(out.glob(".*scratch")) and not (out / "checkpoints").exists()
    assert json.loads((out / "manifest.json").read_text())["stage"] == "finished"
    with pytest.raises(InputError, match="already exists and holds a finished"):
        run_variability(star, out, _params())


def test_interrupted_run_with_other_options_or_input_is_refused(star, tmp_path, small_blocks):
    out = tmp_path / "run"
    with pytest.raises(StopForTest):
        run_variability(star, out, _params(), on_checkpoint=stop_after(1))
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(InputError, match=r"other parameters \(img_per_grp\); run the same command"):
        run_variability(star, out, _params(img_per_grp=12))
    other = star.with_name("other.star")
    imgs, table = simulate_particles(phantom_volume("blob", BOX, PIX), 50, pixel_size_A=PIX, rng=1)
    write_particles(other, imgs, table, pixel_size_A=PIX)
    with pytest.raises(InputError, match="unfinished 3dvariability run on another input"):
        run_variability(other, out, _params())
    assert sorted(p.name for p in out.rglob("*")) == before


def test_rejected_new_run_leaves_nothing(star, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    from isavar.io import read_particles

    stack = read_particles(star)
    write_particles(bad / "nan.star", stack.images[:], stack.table)
    with mrcfile.open(bad / "nan.mrcs", "r+") as m:
        m.data[7, 2, 2] = np.nan
    out = tmp_path / "run"
    with pytest.raises(InputError, match="NaN"):
        run_variability(bad / "nan.star", out, _params())
    assert not out.exists()


@pytest.mark.parametrize("radius", [-7, 0, 13])
def test_mask_radius_must_fit_the_box(star, tmp_path, radius):
    with pytest.raises(InputError, match=r"--radius .* outside \(0, 12\]"):
        run_variability(star, tmp_path / "run", _params(mask_radius_px=radius))
    assert not (tmp_path / "run").exists()


ENV = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
ISAVAR = [sys.executable, "-m", "isavar"]


def _argv(star, out, workers):
    # --project-dir OUT: the STAR outputs name their stacks relative to their own folder, so two runs compare
    return ISAVAR + ["3dvariability", str(star), str(out), "--img_per_grp", "10", "--CTF", "--workers",
                     str(workers), "-q", "--project-dir", str(out)]


@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    """3100 particles (4 blocks of 1024 centres, about a second each) and their uninterrupted result."""
    d = tmp_path_factory.mktemp("var_kill")
    subprocess.run(ISAVAR + ["simulate", str(d / "in"), "--phantom", "two_state", "--n", "3100", "--box", "24",
                             "--apix", "3", "--snr", "2", "--seed", "3", "-q"], check=True, env=ENV)
    star = d / "in" / "particles.star"
    subprocess.run(_argv(star, d / "ref", 1), check=True, env=ENV)
    return star, d / "ref"


def _start_and_stop(argv, out, sig, **popen):
    """Start a run, and send ``sig`` once its first checkpoint is on disk; returns (process, stderr)."""
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **popen)
    ck = out / "checkpoints" / "groups.npz"
    deadline = time.monotonic() + 120
    while not ck.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    if popen.get("start_new_session"):
        os.killpg(proc.pid, sig)                                      # as a terminal's Ctrl-C: the whole group
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    if json.loads((out / "manifest.json").read_text())["stage"] == "finished":   # pragma: no cover
        pytest.skip("the run finished before it could be stopped (machine too fast)")
    return proc, err


def _continue_and_compare(argv, out, ref):
    assert (out / ".var2D.scratch").exists()
    res = subprocess.run(argv, env=ENV, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    _same_files(ref, out)
    assert "continuing an interrupted run" in (out / "log.txt").read_text()
    assert [p.name for p in out.glob(".*")] == [".isavar_3dvariability"]      # scratch files removed


def test_kill_9_then_the_same_command_continues(big_run, tmp_path):
    """A real process killed with SIGKILL after its first checkpoint; the re-run equals an uninterrupted run."""
    star, ref = big_run
    out = tmp_path / "killed"
    proc, _ = _start_and_stop(_argv(star, out, 1), out, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    _continue_and_compare(_argv(star, out, 1), out, ref)


@pytest.mark.skipif(os.name != "posix", reason="process groups")
def test_ctrl_c_prints_one_line_and_the_same_command_continues(big_run, tmp_path):
    star, ref = big_run
    out = tmp_path / "interrupted"
    proc, err = _start_and_stop(_argv(star, out, 2), out, signal.SIGINT, start_new_session=True)
    assert proc.returncode == 130
    assert err.strip() == "isavar 3dvariability: interrupted; run the same command again to continue", err
    _continue_and_compare(_argv(star, out, 2), out, ref)


def test_run_that_memory_cannot_hold_is_refused_up_front(star, tmp_path, monkeypatch):
    """The estimate (issue 12) is checked before any work: one line naming the need and what to change."""
    import isavar.workflows.outputs as outputs
    from isavar.workflows.variability import estimate_memory

    need = estimate_memory(200, BOX, BOX, _params())
    monkeypatch.setattr(outputs, "available_memory", lambda: int(need * 0.9))
    with pytest.raises(InputError, match=r"needs about .* of memory but .* is available; use fewer --workers"):
        run_variability(star, tmp_path / "run", _params())
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(outputs, "available_memory", lambda: int(need * 1.1))
    run_variability(star, tmp_path / "run", _params(save_ave2d=False, save_var2d=False))


def test_memory_estimate_grows_with_the_working_box_and_names_the_option(tmp_path):
    """At 200,000 particles of box 128 the working box of --fl 0.1 (40 px) fits 2 GB with 2 workers; the
    full box does not, and the refusal then points at --fl/--decimate."""
    from isavar.workflows.variability import _check_memory, estimate_memory

    p = _params(img_per_grp=100, lowpass_fl=0.1, lowpass_aa=0.2)
    small, full = estimate_memory(200_000, 128, 40, p, 2), estimate_memory(200_000, 128, 128, p, 2)
    assert small < 2e9 < full
    assert estimate_memory(1_000_000, 128, 40, p, 2) > small        # O(N) per-particle tables only

    class _Pool:
        workers, size = 2, 1

    import isavar.workflows.outputs as outputs

    old = outputs.available_memory
    outputs.available_memory = lambda: int(small * 1.5)
    try:
        _check_memory(p, 200_000, 128, 40, _Pool())
        with pytest.raises(InputError,
                           match=r"use --fl \(with automatic decimation\) or --decimate .* fewer --workers"):
            _check_memory(p, 200_000, 128, 128, _Pool())
    finally:
        outputs.available_memory = old
