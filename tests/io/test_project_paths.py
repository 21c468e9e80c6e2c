"""Relative image paths resolved as RELION resolves them (from the project directory), and written so that
RELION run from the project directory opens them; checked with ``relion_stack_create`` where installed."""

from __future__ import annotations

import logging
import shutil
import subprocess
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from isavar.errors import InputError
from isavar.io import read_particles, write_particles

HAVE_RELION = shutil.which("relion_stack_create") is not None
needs_relion = pytest.mark.skipif(not HAVE_RELION, reason="RELION binaries not installed")


def _relion_job(project: Path, rng, n=5, box=12):
    """A RELION-style project: Extract/job007/Movies/mic1.mrcs and Extract/job007/particles.star naming
    the stack relative to the project directory, as RELION's Extract job does."""
    images = rng.normal(size=(n, box, box)).astype(np.float32)
    stack = project / "Extract" / "job007" / "Movies" / "mic1.mrcs"
    stack.parent.mkdir(parents=True)
    with mrcfile.new(stack) as m:
        m.set_data(images)
        m.set_image_stack()
        m.voxel_size = 1.5
    star = project / "Extract" / "job007" / "particles.star"
    names = "\n".join(f"{i + 1:06d}@Extract/job007/Movies/mic1.mrcs\t1" for i in range(n))
    star.write_text("data_optics\nloop_\n_rlnOpticsGroup\n_rlnOpticsGroupName\n_rlnImagePixelSize\n_rlnImageSize\n"
                    f"_rlnImageDimensionality\n_rlnVoltage\n_rlnSphericalAberration\n_rlnAmplitudeContrast\n"
                    f"1 opticsGroup1 1.5 {box} 2 300 2.7 0.1\n\n"
                    f"data_particles\nloop_\n_rlnImageName\n_rlnOpticsGroup\n{names}\n")
    return star, images


def _relion_stack(project: Path, star_rel: str, tmp_root: Path) -> np.ndarray:
    """The images RELION reads for ``star_rel`` when run from ``project`` (relion_stack_create)."""
    out = tmp_root / "relion_out"
    subprocess.run(["relion_stack_create", "--i", star_rel, "--o", str(out)], cwd=project, check=True,
                   capture_output=True, timeout=120)
    return mrcfile.read(str(out) + ".mrcs")


@needs_relion
def test_fixture_is_what_relion_opens_from_the_project_directory(tmp_path, rng):
    project = tmp_path / "proj"
    star, images = _relion_job(project, rng)
    np.testing.assert_array_equal(_relion_stack(project, "Extract/job007/particles.star", tmp_path), images)


def test_star_inside_a_relion_job_opens_in_place(tmp_path, rng, monkeypatch):
    project = tmp_path / "proj"
    star, images = _relion_job(project, rng)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    # found through the STAR folder's parents, through --project-dir, and from the project directory itself
    np.testing.assert_array_equal(read_particles(star).images[:], images)
    np.testing.assert_array_equal(read_particles(star, project_dir=project).images[:], images)
    monkeypatch.chdir(project)
    np.testing.assert_array_equal(read_particles("Extract/job007/particles.star").images[:], images)


def test_missing_stack_names_the_places_looked(tmp_path, rng):
    project = tmp_path / "proj"
    star, _ = _relion_job(project, rng)
    (project / "Extract" / "job007" / "Movies" / "mic1.mrcs").unlink()
    with pytest.raises(InputError, match="project directory"):
        read_particles(star, project_dir=project)


class _records:
    """Collect the records of a logger directly (the isavar logger may not propagate to pytest's caplog)."""

    def __init__(self, name):
        self.logger = logging.getLogger(name)
        self.handler = logging.Handler(logging.WARNING)
        self.records = []
        self.handler.emit = self.records.append

    def __enter__(self):
        self.logger.addHandler(self.handler)
        return self.records

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)


def test_project_directory_wins_and_an_ambiguity_is_reported(tmp_path, rng):
    """RELION reads the project-relative file; a different file of the same name beside the STAR is not used."""
    project = tmp_path / "proj"
    star, images = _relion_job(project, rng)
    decoy = project / "Extract" / "job007" / "Extract" / "job007" / "Movies" / "mic1.mrcs"
    decoy.parent.mkdir(parents=True)
    with mrcfile.new(decoy) as m:
        m.set_data(np.zeros_like(images))
    with _records("isavar") as records:
        got = read_particles(star, project_dir=project).images[:]
    np.testing.assert_array_equal(got, images)
    assert any("exists both" in r.getMessage() for r in records)


def _table(n):
    return pd.DataFrame({"defocus_u_A": np.linspace(1e4, 2e4, n), "defocus_v_A": 1.5e4, "defocus_angle_deg": 0.0,
                         "voltage_kV": 300.0, "cs_mm": 2.7, "amplitude_contrast": 0.1})


@needs_relion
def test_written_with_a_project_dir_relion_opens_it_from_there(tmp_path, rng):
    project = tmp_path / "proj"
    out = project / "Isavar" / "run1" / "particles.star"
    out.parent.mkdir(parents=True)
    images = rng.normal(size=(4, 10, 10)).astype(np.float32)
    write_particles(out, images, _table(4), pixel_size_A=2.0, project_dir=project)
    assert "@Isavar/run1/particles.mrcs" in out.read_text()
    np.testing.assert_array_equal(_relion_stack(project, "Isavar/run1/particles.star", tmp_path), images)
    np.testing.assert_array_equal(read_particles(out, project_dir=project).images[:], images)


@needs_relion
def test_cli_convert_writes_paths_relion_opens_from_the_project_dir(tmp_path, rng):
    """``isavar convert`` run anywhere with --project-dir: the STAR opens in RELION run from that directory."""
    import os
    import sys

    project = tmp_path / "proj"
    star, images = _relion_job(project, rng)
    (project / "Isavar").mkdir()
    src = Path(__file__).resolve().parents[2] / "src"
    env = dict(os.environ, PYTHONPATH=f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    subprocess.run([sys.executable, "-m", "isavar", "convert", str(star), str(project / "Isavar" / "c.star"),
                    "--project-dir", str(project), "-q"], check=True, env=env, cwd=tmp_path, timeout=120)
    np.testing.assert_array_equal(_relion_stack(project, "Isavar/c.star", tmp_path), images)
