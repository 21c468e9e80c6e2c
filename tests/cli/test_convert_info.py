"""``isavar convert`` and ``isavar info``: conversions by suffix, refusals, warnings, summaries."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
import pytest

from isavar.cli import convert, info
from isavar.errors import InputError
from isavar.io import read_particles, read_volume, write_image_stack, write_particles, write_volume


@pytest.fixture(autouse=True)
def _restore_isavar_logger():
    """The commands configure the ``isavar`` logger; undo it so other tests see the default set-up."""
    import logging

    logger = logging.getLogger("isavar")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    for handler in list(logger.handlers):
        if handler not in saved[0]:
            logger.removeHandler(handler)
            handler.close()
    logger.propagate, logger.level = saved[1], saved[2]


def run_cli(module, argv) -> int:
    """Parse ``argv`` with the module's own arguments and run it as ``isavar`` would (InputError -> 2)."""
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return module.run(args)
    except InputError as exc:
        print(f"error: {exc}")
        return 2


def _particles(tmp_path, rng, n=5, box=12):
    images = rng.normal(size=(n, box, box)).astype(np.float32)
    table = pd.DataFrame({
        "defocus_u_A": rng.uniform(1e4, 2e4, n), "defocus_v_A": rng.uniform(1e4, 2e4, n),
        "defocus_angle_deg": 10.0, "voltage_kV": 300.0, "cs_mm": 2.7, "amplitude_contrast": 0.1,
        "angle_rot_deg": rng.uniform(-90, 90, n), "angle_tilt_deg": rng.uniform(10, 170, n),
        "angle_psi_deg": rng.uniform(-90, 90, n), "class_number": [1, 2, 1, 2, 3][:n],
        "true_conformation": rng.integers(0, 2, n),
    })
    write_particles(tmp_path / "in.star", images, table, pixel_size_A=1.4)
    return images, table


def test_help_texts_have_examples():
    for module in (convert, info):
        assert "Examples" in module.__doc__ and "isavar" in module.__doc__


@pytest.mark.parametrize("suffix", ["hdf", "cs", "star"])
def test_convert_star_to_each_format(tmp_path, rng, suffix):
    images, table = _particles(tmp_path, rng)
    before = (tmp_path / "in.star").read_bytes(), (tmp_path / "in.mrcs").read_bytes()
    assert run_cli(convert, [str(tmp_path / "in.star"), str(tmp_path / f"out.{suffix}"), "--chunk-size", "2",
                             "-q"]) == 0
    out = read_particles(tmp_path / f"out.{suffix}")
    np.testing.assert_array_equal(out.images[:], images)
    np.testing.assert_allclose(out.table["angle_tilt_deg"], table["angle_tilt_deg"], atol=1e-3)
    assert out.table["true_conformation"].tolist() == table["true_conformation"].tolist()
    assert out.pixel_size_A == pytest.approx(1.4)
    assert ((tmp_path / "in.star").read_bytes(), (tmp_path / "in.mrcs").read_bytes()) == before


def test_convert_to_mrcs_warns_about_lost_metadata(tmp_path, rng, capsys):
    _particles(tmp_path, rng)
    assert run_cli(convert, [str(tmp_path / "in.star"), str(tmp_path / "images.mrcs")]) == 0
    err = capsys.readouterr().err
    assert "images only" in err and "CTF" in err and "3D orientations" in err and "ground truth" in err
    assert read_particles(tmp_path / "images.mrcs").images.shape == (5, 12, 12)


def test_convert_refuses_existing_target_unless_forced(tmp_path, rng, capsys):
    _particles(tmp_path, rng)
    (tmp_path / "out.hdf").write_text("keep me")
    assert run_cli(convert, [str(tmp_path / "in.star"), str(tmp_path / "out.hdf")]) == 2
    assert "out.hdf: already exists" in capsys.readouterr().out
    assert (tmp_path / "out.hdf").read_text() == "keep me"
    assert run_cli(convert, [str(tmp_path / "in.star"), str(tmp_path / "out.hdf"), "--force", "-q"]) == 0
    assert len(read_particles(tmp_path / "out.hdf").table) == 5


def test_convert_never_overwrites_its_input_stack(tmp_path, rng, capsys):
    _particles(tmp_path, rng)
    # in.cs would write in.mrcs beside it, which is the input stack
    assert run_cli(convert, [str(tmp_path / "in.star"), str(tmp_path / "in.cs"), "--force"]) == 2
    assert "would overwrite the input file" in capsys.readouterr().out


def test_convert_bare_stack_needs_pixel_size_for_star(tmp_path, rng, capsys):
    write_image_stack(tmp_path / "s.mrcs", rng.normal(size=(3, 8, 8)).astype(np.float32), None)
    assert run_cli(convert, [str(tmp_path / "s.mrcs"), str(tmp_path / "s2.star")]) == 2
    assert "pixel size is unknown" in capsys.readouterr().out
    assert run_cli(convert, [str(tmp_path / "s.mrcs"), str(tmp_path / "s2.star"), "--pixel-size", "1.2", "-q"]) == 0
    assert read_particles(tmp_path / "s2.star").pixel_size_A == 1.2


def test_convert_volume(tmp_path, rng):
    volume = rng.normal(size=(8, 8, 8)).astype(np.float32)
    write_volume(tmp_path / "v.mrc", volume, 2.0)
    assert run_cli(convert, [str(tmp_path / "v.mrc"), str(tmp_path / "v.hdf"), "-q"]) == 0
    got, voxel = read_volume(tmp_path / "v.hdf")
    np.testing.assert_array_equal(got, volume)
    assert voxel == 2.0
    assert run_cli(convert, [str(tmp_path / "v.hdf"), str(tmp_path / "v2.mrc"), "-q"]) == 0
    np.testing.assert_array_equal(read_volume(tmp_path / "v2.mrc")[0], volume)
    assert run_cli(convert, [str(tmp_path / "v.mrc"), str(tmp_path / "v.star"), "-q"]) == 2


@pytest.mark.parametrize("argv,message", [
    (["nothere.star", "out.hdf"], "nothere.star: file not found"),
    (["bdb:stack", "out.hdf"], "EMAN2DB/stack.bdb does not exist"),
    (["in.star", "out.xyz"], "unknown file format '.xyz'"),
])
def test_convert_bad_input(tmp_path, rng, capsys, monkeypatch, argv, message):
    _particles(tmp_path, rng)
    monkeypatch.chdir(tmp_path)
    assert run_cli(convert, argv) == 2
    assert message in capsys.readouterr().out


def test_info_particles_text_and_json(tmp_path, rng, capsys):
    _particles(tmp_path, rng)
    assert run_cli(info, [str(tmp_path / "in.star")]) == 0
    text = capsys.readouterr().out
    assert "count         5" in text and "box           12 px" in text and "pixel size    1.4 Å" in text
    assert "CTF           yes" in text and "3D angles     yes" in text and "2D alignment  no" in text
    assert "classes       3" in text and "true_conformation" in text
    assert run_cli(info, [str(tmp_path / "in.star"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["count"] == 5 and summary["ctf"] == "yes" and summary["ground_truth"] == ["true_conformation"]


def test_info_bare_stack_and_volume(tmp_path, rng, capsys):
    write_image_stack(tmp_path / "s.mrcs", rng.normal(size=(3, 8, 8)).astype(np.float32), 0.8)
    assert run_cli(info, [str(tmp_path / "s.mrcs"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["count"], summary["box"], summary["pixel_size_A"]) == (3, 8, 0.8)
    assert summary["ctf"] == summary["orientations_3d"] == "no"
    write_volume(tmp_path / "v.mrc", np.ones((4, 4, 4), np.float32), 3.0)
    assert run_cli(info, [str(tmp_path / "v.mrc")]) == 0
    text = capsys.readouterr().out
    assert "volume" in text and "4 x 4 x 4" in text and "3.0 Å" in text


def test_info_missing_file(tmp_path, capsys):
    assert run_cli(info, [str(tmp_path / "none.hdf")]) == 2
    assert "none.hdf: file not found" in capsys.readouterr().out


def test_info_into_a_closed_pipe_exits_quietly(tmp_path, rng):
    """``isavar info FILE | head -0``: the reader is gone before isavar writes; no BrokenPipeError traceback."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    _particles(tmp_path, rng)
    src = Path(__file__).resolve().parents[2] / "src"
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the downstream program has already exited
    try:
        proc = subprocess.run([sys.executable, "-m", "isavar", "info", str(tmp_path / "in.star")], stdout=write_end,
                              stderr=subprocess.PIPE, env=env, timeout=120)
    finally:
        os.close(write_end)
    assert "Traceback" not in proc.stderr.decode() and "BrokenPipeError" not in proc.stderr.decode()
    assert proc.returncode == 141  # 128 + SIGPIPE, as a shell tool killed by the signal reports it
