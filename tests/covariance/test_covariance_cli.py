"""``isavar 3dva`` and ``isavar 3dva-split`` in-process: outputs, tables, formats, exit codes."""

from __future__ import annotations

import json

import mrcfile
import numpy as np
import pytest

from isavar.cli import main
from isavar.io import read_particles, write_particles
from isavar.synthetic import phantom_volume, simulate_particles

BOX, PIX, N = 20, 9.6, 160


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("va_in")
    a, b = phantom_volume("two_state", BOX, PIX)
    imgs, table = simulate_particles([a, b], N, pixel_size_A=PIX, snr=1.0, ctf=True, weights=[0.3, 0.7], rng=4,
                                     shift_sd_A=4.0)
    paths = {}
    for ext in ("star", "hdf", "cs"):
        paths[ext] = d / ext / f"p.{ext}"
        paths[ext].parent.mkdir()
        write_particles(paths[ext], imgs, table, pixel_size_A=PIX)
    return paths


@pytest.fixture(scope="module")
def run_star(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("va_out") / "va"
    status = main(["3dva", str(data["star"]), str(out), "--components", "2", "--CTF", "--iterations", "4",
                   "--workers", "1", "-q"])
    assert status == 0
    return out


def test_outputs_and_tables(run_star, data):
    out = run_star
    for name in ("var3D.mrc", "mean.mrc", "mask.mrc", "component_01.mrc", "component_02.mrc", "particles.star",
                 "particles.cs", "var3D_slices.png", "components.png", "latents.png", "summary.json",
                 "log.txt", "provenance.json", "series/component_1_frame_00.mrc", "series/component_2_frame_09.mrc"):
        assert (out / name).exists(), name
    with mrcfile.open(out / "var3D.mrc") as m:
        assert m.data.shape == (BOX, BOX, BOX)
        assert float(m.voxel_size.x) == pytest.approx(PIX)
        var3d = m.data.copy()
    comps = [mrcfile.read(out / f"component_0{i}.mrc") for i in (1, 2)]
    assert np.allclose(var3d, np.sqrt(comps[0].astype(float) ** 2 + comps[1].astype(float) ** 2), atol=1e-5)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["eigenvalues"]) == 2 and summary["eigenvalues"][0] >= summary["eigenvalues"][1]
    assert {"noise_eigenvalues", "above_noise", "half_set_snr", "history"} <= set(summary)
    src = read_particles(data["star"]).table
    for name in ("particles.star", "particles.cs"):
        stack = read_particles(out / name)
        t = stack.table
        assert len(t) == N and {"latent_1", "latent_2"} <= set(t.columns)
        assert np.allclose(t["defocus_u_A"], src["defocus_u_A"]) and np.allclose(t["true_conformation"],
                                                                                   src["true_conformation"])
        # images are referenced in place: the same pixels come back
        assert np.allclose(stack.images[np.arange(5)], read_particles(data["star"]).images[np.arange(5)])
    lines = (out / "particles.star").read_text()
    assert "_rlnIsavar_latent_1" in lines


def test_same_answer_from_star_hdf_and_cs(run_star, data, tmp_path):
    ref = read_particles(run_star / "particles.star").table[["latent_1", "latent_2"]].to_numpy()
    for ext in ("hdf", "cs"):
        out = tmp_path / ext
        assert main(["3dva", str(data[ext]), str(out), "--components", "2", "--CTF", "--iterations", "4",
                     "--workers", "1", "-q"]) == 0
        got = read_particles(out / "particles.star").table[["latent_1", "latent_2"]].to_numpy()
        assert np.allclose(got, ref, atol=1e-4 * np.abs(ref).max())


def test_split_by_threshold_and_kmeans(run_star):
    assert main(["3dva-split", str(run_star), "--component", "1", "--threshold", "0", "-q"]) == 0
    d = run_star / "split_c1_t0"
    counts = json.loads((d / "split.json").read_text())["counts"]
    assert sum(counts.values()) == N
    lat = read_particles(run_star / "particles.star").table["latent_1"].to_numpy()
    assert counts["subset_01"] == int((lat <= 0).sum())
    low = read_particles(d / "subset_01.star").table
    assert (low["latent_1"] <= 0).all() and (d / "subset_01.cs").exists()
    assert main(["3dva-split", str(run_star), "--kmeans", "2", "-q"]) == 0
    assert sum(json.loads((run_star / "split_kmeans2" / "split.json").read_text())["counts"].values()) == N
    # splitting again into the same folder is refused
    assert main(["3dva-split", str(run_star), "--kmeans", "2", "-q"]) == 2


def test_bad_input_is_refused_and_nothing_written(data, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["3dva", str(tmp_path / "missing.star"), str(out), "-q"]) == 2
    assert not out.exists()
    bad = tmp_path / "mask.mrc"
    with mrcfile.new(bad) as m:
        m.set_data(np.ones((8, 8, 8), np.float32))
    assert main(["3dva", str(data["star"]), str(out), "--mask", str(bad), "-q"]) == 2
    assert "mask has shape" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit) as usage:                   # argparse refuses it: one line, status 2
        main(["3dva", str(data["star"]), str(out), "--components", "0", "-q"])
    assert usage.value.code == 2 and "--components: must be at least 1" in capsys.readouterr().err
    assert main(["3dva", str(data["star"]), str(out), "--fl", "0.2", "-q"]) == 2  # --aa missing
    out.mkdir()
    assert main(["3dva", str(data["star"]), str(out), "-q"]) == 2
    assert list(out.iterdir()) == []


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "3dva" in text and "3dva-split" in text


def test_resume_after_an_interruption_equals_an_uninterrupted_run(data, tmp_path, monkeypatch):
    import isavar.workflows.covariance as wf

    opts = ["--components", "2", "--CTF", "--iterations", "4", "--tolerance", "1e-9", "--workers", "1", "-q"]
    full, broken = tmp_path / "full", tmp_path / "broken"
    assert main(["3dva", str(data["star"]), str(full), *opts]) == 0
    save = wf._save_checkpoint

    def save_then_stop(outdir, params, state):
        save(outdir, params, state)
        if state["iteration"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(wf, "_save_checkpoint", save_then_stop)
    assert main(["3dva", str(data["star"]), str(broken), *opts]) == 130
    assert (broken / "checkpoint.npz").exists() and not (broken / "summary.json").exists()
    monkeypatch.setattr(wf, "_save_checkpoint", save)
    # other options than the interrupted run's are refused
    assert main(["3dva", str(data["star"]), str(broken), *opts[:-3], "--seed", "7", "--resume", "-q"]) == 2
    assert main(["3dva", str(data["star"]), str(broken), *opts, "--resume"]) == 0
    assert not (broken / "checkpoint.npz").exists()
    for name in ("component_01.mrc", "component_02.mrc", "mean.mrc", "var3D.mrc"):
        assert np.array_equal(mrcfile.read(full / name), mrcfile.read(broken / name)), name
    a = read_particles(full / "particles.star").table[["latent_1", "latent_2"]].to_numpy()
    b = read_particles(broken / "particles.star").table[["latent_1", "latent_2"]].to_numpy()
    assert np.array_equal(a, b)
    hist = json.loads((broken / "summary.json").read_text())["history"]
    assert [h["iteration"] for h in hist] == [1, 2, 3, 4]
