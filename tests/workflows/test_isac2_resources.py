"""ISAC2 at scale: the working stack on disk, the memory and disk estimates and their early refusals."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from isavar.cli import main
from isavar.isac.params import Isac2Params
from isavar.workflows.isac2 import estimate_disk, estimate_memory, memory_terms

BOX, PIX, N = 24, 3.0, 60
ISAC = ["--radius", "8", "--target_radius", "6", "--target_nx", "20", "--img_per_grp", "20",
        "--minimum_grp_size", "10", "--CTF", "--workers", "1", "-q"]


@pytest.fixture(scope="module")
def particles(tmp_path_factory) -> Path:
    from isavar.io import write_particles
    from isavar.synthetic import phantom_volume, simulate_particles

    d = tmp_path_factory.mktemp("isac2_resources")
    a, b = phantom_volume("two_state", BOX, PIX)
    imgs, table = simulate_particles([a, b], N, pixel_size_A=PIX, snr=2.0, ctf=True, rng=3)
    write_particles(d / "good.star", imgs, table)
    return d / "good.star"


def _files(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _refused(argv, capsys, work) -> str:
    before = _files(work)
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and "Traceback" not in err[0]
    assert _files(work) == before, "a refused run must leave nothing behind"
    return err[0]


def test_too_little_disk_for_the_working_stack_is_refused_before_any_work(particles, tmp_path, monkeypatch, capsys):
    import isavar.workflows.outputs as outputs

    p = Isac2Params(radius=8, target_radius=6, target_nx=20, img_per_grp=20, minimum_grp_size=10, CTF=True)
    need = estimate_disk(N, BOX, p.validate(), own_image_stack=False)
    free = int(need) - 1                                        # one byte short of the estimate
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10**12, 10**12 - free, free))
    line = _refused(["isac2", particles, tmp_path / "out", *ISAC], capsys, tmp_path)
    assert "of disk space" in line and "working stack" in line and str(tmp_path) in line
    monkeypatch.setattr(outputs.shutil, "disk_usage", lambda _p: shutil._ntuple_diskusage(10**12, 0, 10**12))


@pytest.mark.parametrize("extra,option", [
    ([], "--workers"),                                         # a small run: the processes dominate
    (["--xr", "300"], "--xr"),                                  # a huge translational search
])
def test_too_little_memory_is_refused_naming_the_option(particles, tmp_path, monkeypatch, capsys, extra, option):
    import isavar.workflows.outputs as outputs

    monkeypatch.setattr(outputs, "available_memory", lambda: 50 << 20)       # 50 MB left
    line = _refused(["isac2", particles, tmp_path / "out", *ISAC, *extra], capsys, tmp_path)
    assert "of memory" in line and option in line, line


def test_memory_estimate_names_the_largest_part():
    p = Isac2Params(radius=50, CTF=True).validate()
    # the candidate search: per image a bounded number of candidates, so memory grows linearly in N
    small, big = estimate_memory(100_000, 128, p, 2), estimate_memory(1_000_000, 128, p, 2)
    assert big < 10 * small
    terms = memory_terms(1_000_000, 128, p, 2)
    assert max(terms, key=lambda k: terms[k][0]) == "images"
    assert "--eqk_candidates" in terms["images"][1]
    # SPHIRE's flat search keeps all K scores and parameters per image: N x K, the option to change is named
    flat = Isac2Params(radius=50, CTF=True, eqk_search="flat").validate()
    terms = memory_terms(200_000, 128, flat, 2)
    assert terms["images"][0] > 200_000 * 1000 * 64
    assert "--eqk_search candidates" in terms["images"][1]
    # per class: the references grow with K = N / img_per_grp
    assert memory_terms(200_000, 128, p, 2)["classes"][0] > 1.5 * memory_terms(100_000, 128, p, 2)["classes"][0]


def test_working_stack_is_memory_mapped_and_tasks_carry_rows(tmp_path):
    """A task built on a mapped stack pickles as a path and row numbers, and reads the same pixels."""
    import pickle

    from isavar.isac import _ops
    from isavar.isac.working import LazyRows, MappedStack, SubsetImages, normalise_for_alignment

    rng = np.random.default_rng(0)
    stack = rng.normal(size=(300, 20, 20)).astype(np.float32)
    np.save(tmp_path / "w.npy", stack)
    subset = np.sort(rng.choice(300, 120, replace=False))
    mapped = SubsetImages(MappedStack(tmp_path / "w.npy"), subset, 6)
    memory = SubsetImages(stack, subset, 6)
    local = np.arange(10, 60)
    task = mapped.for_task(local)
    assert isinstance(task, LazyRows)
    wire = pickle.dumps(task)
    assert len(wire) < 2000                                   # no pixels travel: 50 images would be 80 kB
    want = normalise_for_alignment(stack[subset[local]], _ops.circle(20, 6))
    np.testing.assert_array_equal(np.asarray(pickle.loads(wire)), want)
    np.testing.assert_array_equal(memory.take(local), want)
