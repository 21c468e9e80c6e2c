"""The demo command runs end to end and its round trip is lossless."""

from __future__ import annotations

import json

import pytest

from isavar.cli import COMMANDS, main


def test_demo_runs_and_round_trip_is_lossless(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", str(out), "--n", "300", "--n-variability", "1200", "--workers", "1", "-q"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    check = summary["round_trip"]
    assert check["images_max_abs_diff"] == 0.0
    # Metadata go through float32 HDF/cs fields: relative precision ~1e-7 of the values (defocus ~2e4 Å).
    assert check["metadata_max_abs_diff"]["defocus_u_A"] < 0.01
    assert check["metadata_max_abs_diff"]["angle_tilt_deg"] < 1e-3
    assert "true_angle_rot_deg" in check["ground_truth_columns_kept"]
    assert (out / "provenance.json").exists() and (out / "3_info" / "0_particles.star.txt").exists()
    isac2 = summary["isac2"]
    assert isac2["particles"] == 300 and isac2["classes"] >= 1 and isac2["accounted"] >= 40
    assert (out / "4_isac2" / "class_averages.png").exists()
    # The variability map finds the planted domain. Measured at 1200 particles, SNR 0.2: r = 0.577-0.593 over
    # five simulation seeds (sd 0.007; 0.579 for this one), 0.27 for the same set without the planted
    # variability (one state only). 0.45 sits 18 sd below the seeds and well above the null.
    assert summary["variability"]["pearson_r"] > 0.45
    assert (out / "6_3dvariability" / "var3D_slices.png").exists()
    # 3dva on the same set: the consistent estimator beats the SPHIRE-method map and finds the states.
    cov = summary["covariance"]
    assert cov["pearson_r"] > summary["variability"]["pearson_r"] and cov["pearson_r"] > 0.8
    assert cov["latent1_auc"] > 0.9 and cov["above_noise"][0]
    assert (out / "compare_variability.png").exists()
    # Running again into the same folder replaces the previous demo.
    assert main(["demo", str(out), "--n", "200", "--n-variability", "200", "--workers", "1", "-q"]) == 0


def test_demo_refuses_foreign_folder(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["demo", str(out), "-q"]) == 2
    assert "not an output directory" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("command", [name for name, _ in COMMANDS])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    assert "Examples" in capsys.readouterr().out
