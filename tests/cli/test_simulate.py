"""``isavar simulate``: output directory contents, ground truth on disk, option handling, refusals."""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from isavar.cli import simulate
from isavar.errors import InputError
from isavar.io import read_particles, read_volume, write_volume
from isavar.synthetic import phantom_volume, plan_simulation, volume_from_model

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(autouse=True)
def _restore_isavar_logger():
    """``run`` configures the ``isavar`` logger (console + file); undo it after each test."""
    import logging

    logger = logging.getLogger("isavar")
    saved = (list(logger.handlers), logger.propagate, logger.level)
    yield
    for handler in list(logger.handlers):
        if handler not in saved[0]:
            logger.removeHandler(handler)
            handler.close()
    logger.propagate, logger.level = saved[1], saved[2]


def run_simulate(argv) -> int:
    """Parse ``argv`` with the subcommand's own arguments and run it as ``isavar`` does (InputError -> 2)."""
    parser = argparse.ArgumentParser()
    simulate.add_arguments(parser)
    args = parser.parse_args([*argv, "-q"])
    try:
        return simulate.run(args)
    except InputError as exc:
        print(f"error: {exc}")
        return 2


def test_help_text_has_examples_and_units():
    doc = simulate.__doc__
    assert "Examples" in doc and "isavar simulate" in doc
    assert "µm" in doc and "Å" in doc


def test_writes_particles_volumes_provenance_and_log(tmp_path):
    out = tmp_path / "sim"
    argv = [str(out), "--phantom", "two_state", "--n", "24", "--box", "24", "--apix", "2.5", "--snr", "0.5",
            "--shift-sd", "2", "--orientations", "views:4", "--noise-fraction", "0.25", "--seed", "5",
            "--defocus", "1.0", "2.0"]
    assert run_simulate(argv) == 0
    names = {p.name for p in out.iterdir()}
    assert {"particles.star", "particles.mrcs", "volume_0.mrc", "volume_1.mrc", "provenance.json",
            "simulate.log"} <= names

    # The files hold exactly what the library simulates with the same seed and options.
    state_a, state_b = phantom_volume("two_state", 24, 2.5)
    plan = plan_simulation([state_a, state_b], 24, pixel_size_A=2.5, snr=0.5, shift_sd_A=2.0,
                           orientations="views:4", noise_fraction=0.25, defocus_range_A=(10000.0, 20000.0),
                           astigmatism_A=200.0, weights=[0.5, 0.5], rng=5)
    stack = read_particles(out / "particles.star")
    assert stack.pixel_size_A == pytest.approx(2.5)
    np.testing.assert_allclose(stack.images[:], plan.images(), rtol=1e-6, atol=1e-6)
    truth = [c for c in plan.table.columns if c.startswith("true_")]
    assert {"true_angle_rot_deg", "true_origin_x_A", "true_defocus_u_A", "true_conformation", "true_view",
            "true_is_noise"} <= set(truth)
    for column in truth + ["angle_rot_deg", "angle_tilt_deg", "angle_psi_deg", "origin_x_A", "defocus_u_A"]:
        np.testing.assert_allclose(stack.table[column].to_numpy(np.float64),
                                   plan.table[column].to_numpy(np.float64), rtol=1e-6, atol=1e-6)
    for k, state in enumerate((state_a, state_b)):
        volume, voxel = read_volume(out / f"volume_{k}.mrc")
        np.testing.assert_array_equal(volume, state)
        assert voxel == pytest.approx(2.5)

    record = json.loads((out / "provenance.json").read_text())
    assert record["command"] == "simulate" and record["seed"] == 5
    assert record["parameters"]["phantom"] == "two_state" and record["parameters"]["symmetry"] == "c1"
    assert record["parameters"]["defocus_um"] == [1.0, 2.0]
    assert record["simulation"]["noise_sigma"] == pytest.approx(plan.noise_sigma)
    assert record["simulation"]["n_pure_noise"] == 6
    assert record["outputs"]["volumes"] == ["volume_0.mrc", "volume_1.mrc"]
    assert "simulating 24 images" in (out / "simulate.log").read_text()


def test_refuses_non_empty_out_unless_forced(tmp_path, capsys):
    out = tmp_path / "sim"
    out.mkdir()
    argv = [str(out), "--phantom", "blob", "--n", "4", "--box", "16", "--seed", "1"]
    assert run_simulate(argv) == 0  # an existing empty directory is fine
    before = (out / "particles.mrcs").read_bytes()
    capsys.readouterr()
    assert run_simulate(argv[:-1] + ["2"]) == 2
    message = capsys.readouterr().out
    assert "not empty" in message and "--force" in message
    assert (out / "particles.mrcs").read_bytes() == before  # untouched
    assert run_simulate(argv[:-1] + ["2", "--force"]) == 0
    assert (out / "particles.mrcs").read_bytes() != before
    (tmp_path / "file").write_text("x")
    assert run_simulate([str(tmp_path / "file"), "--phantom", "blob", "--n", "2", "--box", "16"]) == 2


@pytest.mark.parametrize("fmt, files", [("hdf", {"particles.hdf"}), ("cs", {"particles.cs", "particles.mrcs"})])
def test_other_formats_keep_the_truth(tmp_path, fmt, files):
    out = tmp_path / fmt
    assert run_simulate([str(out), "--phantom", "blob", "--n", "6", "--box", "16", "--seed", "3",
                         "--noise-fraction", "0.5", "--format", fmt]) == 0
    assert files <= {p.name for p in out.iterdir()}
    stack = read_particles(out / f"particles.{fmt}")
    assert len(stack.images) == 6 and stack.images[:].shape == (6, 16, 16)
    assert stack.table["true_is_noise"].sum() == 3
    np.testing.assert_allclose(stack.table["true_defocus_u_A"], stack.table["defocus_u_A"], rtol=1e-6)


def test_pdb_source_without_ctf(tmp_path):
    out = tmp_path / "ubq"
    assert run_simulate([str(out), "--pdb", str(DATA / "1ubi.pdb"), "--box", "32", "--apix", "2.5",
                         "--resolution", "8", "--n", "5", "--no-ctf", "--snr", "inf", "--seed", "2"]) == 0
    volume, _ = read_volume(out / "volume_0.mrc")
    np.testing.assert_array_equal(volume, volume_from_model(DATA / "1ubi.pdb", 32, 2.5, resolution_A=8.0))
    stack = read_particles(out / "particles.star")
    assert not any("defocus" in c for c in stack.table.columns)
    record = json.loads((out / "provenance.json").read_text())
    assert record["simulation"]["noise_sigma"] == 0.0 and record["simulation"]["ctf"] is False


def test_volume_with_mix_follows_the_weights(tmp_path):
    state_a, state_b = phantom_volume("two_state", 16, 3.0)
    write_volume(tmp_path / "a.mrc", state_a, 3.0)
    write_volume(tmp_path / "b.mrc", state_b, 3.0)
    out = tmp_path / "mix"
    n = 400
    assert run_simulate([str(out), "--volume", str(tmp_path / "a.mrc"), "--mix", f"{tmp_path / 'b.mrc'}:0.3",
                         "--n", str(n), "--no-ctf", "--snr", "inf", "--seed", "4"]) == 0
    stack = read_particles(out / "particles.star")
    assert stack.pixel_size_A == pytest.approx(3.0)
    fraction_b = (stack.table["true_conformation"] == 1).mean()
    assert abs(fraction_b - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n)
    np.testing.assert_array_equal(read_volume(out / "volume_1.mrc")[0], state_b)
    record = json.loads((out / "provenance.json").read_text())
    assert record["parameters"]["weights"] == pytest.approx([0.7, 0.3])


def test_symmetric_phantom_records_its_symmetry(tmp_path):
    out = tmp_path / "c4"
    assert run_simulate([str(out), "--phantom", "c4", "--n", "3", "--box", "16", "--seed", "0"]) == 0
    assert json.loads((out / "provenance.json").read_text())["parameters"]["symmetry"] == "c4"


@pytest.mark.parametrize("extra, message", [
    (["--orientations", "views:x"], "orientations"),
    (["--defocus", "2", "1"], "--defocus"),
    (["--symmetry", "c4x"], "symmetry"),
    (["--mix", "b.mrc:1.5"], "--mix"),
    (["--weights", "1", "2"], "--weights"),
    (["--snr", "-1"], "--snr"),
    (["--noise-fraction", "2"], "--noise-fraction"),
])
def test_bad_options_are_one_line_errors(tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    assert run_simulate([str(out), "--phantom", "blob", "--n", "4", "--box", "16", *extra]) == 2
    assert message in capsys.readouterr().out
    assert not out.exists() or not any(out.iterdir())


def test_missing_inputs_are_named(tmp_path, capsys):
    assert run_simulate([str(tmp_path / "o1"), "--volume", str(tmp_path / "none.mrc")]) == 2
    assert "none.mrc" in capsys.readouterr().out
    assert run_simulate([str(tmp_path / "o2"), "--pdb", str(tmp_path / "none.pdb")]) == 2
    assert "none.pdb" in capsys.readouterr().out


def test_registered_in_the_isavar_command(tmp_path):
    from isavar import cli

    for _, module_name in cli.COMMANDS:
        if importlib.util.find_spec(f"isavar.cli.{module_name}") is None:
            pytest.skip(f"isavar.cli.{module_name} is not written yet")
    out = tmp_path / "main"
    assert cli.main(["simulate", str(out), "--phantom", "blob", "--n", "2", "--box", "16", "-q"]) == 0
    assert (out / "particles.star").exists()
    assert cli.main(["simulate", str(out), "--phantom", "blob", "--n", "2", "--box", "16", "-q"]) == 2
