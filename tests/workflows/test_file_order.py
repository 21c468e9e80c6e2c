"""Passes over every image read the stacks in file order, whatever the row order of the particle table.

240 simulated particles (CTF) in 4 ``.mrcs`` of 60; ``ordered.star`` lists them file by file, ``shuffled.star``
the same rows in a random order (row ``j`` of the shuffled table is row ``perm[j]`` of the ordered one). The
passes are cut into chunks much smaller than the table, so that chunks in table order would come back to
every file: ISAC2's front end (CTF correction and shrinking into the working stack), ``isavar reconstruct``
and the ``--VAR`` and ``--SND`` modes of 3D variability. For each: the reads go through every file once,
front to back (the reader is instrumented), and the results of the shuffled table are those of the ordered
one, bit for bit (rows of the working stack mapped by ``perm``; volumes equal).
"""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import starfile

import isavar.io.mrc as mrc_module
from isavar._progress import NullProgress
from isavar.cli import main
from isavar.io import read_particles, write_image_stack
from isavar.parallel.pool import PoolExecutor
from isavar.parallel.serial import SerialExecutor

FILES, PER_FILE = 4, 60
CHUNK = 50                        # rows per task: 5 tasks, each touching every file of the shuffled table


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    d = tmp_path_factory.mktemp("file_order")
    assert main(["simulate", str(d / "sim"), "--phantom", "two_state", "--n", str(FILES * PER_FILE), "--box", "32",
                 "--apix", "6", "--snr", "1", "--seed", "4", "-q"]) == 0
    blocks = starfile.read(d / "sim" / "particles.star", always_dict=True)
    images = mrcfile.read(d / "sim" / "particles.mrcs")
    for f in range(FILES):
        write_image_stack(d / f"mic_{f + 1}.mrcs", images[f * PER_FILE:(f + 1) * PER_FILE], 6.0)
    rows = blocks["particles"].copy()
    rows["rlnImageName"] = [f"{i % PER_FILE + 1:06d}@mic_{i // PER_FILE + 1}.mrcs" for i in range(len(rows))]
    starfile.write({"optics": blocks["optics"], "particles": rows}, d / "ordered.star")
    perm = np.random.default_rng(5).permutation(len(rows))
    starfile.write({"optics": blocks["optics"], "particles": rows.iloc[perm].reset_index(drop=True)},
                   d / "shuffled.star")
    return d, perm


@pytest.fixture
def reads(monkeypatch):
    """Every image read from an MRC stack, as (file, index), in the order of the reads."""
    log: list = []
    original = mrc_module.MrcSource.read_into

    def recording(self, handle, indices, out):
        log.extend((self.path, int(i)) for i in indices)
        return original(self, handle, indices, out)

    monkeypatch.setattr(mrc_module.MrcSource, "read_into", recording)
    return log


def _assert_streamed(log, n):
    """Each of the ``n`` images read once, file after file (in path order), front to back in each."""
    assert len(log) == n
    assert log == sorted(log) and len(set(log)) == n


def _working_stack(star, outdir, executor=None):
    """ISAC2's front end alone (no pre-alignment, whose float sums follow the row order): the working stack."""
    from isavar.isac.params import Isac2Params
    from isavar.workflows import isac2 as workflow

    stack = read_particles(star)
    p = Isac2Params(radius=14, CTF=True, skip_prealignment=True, target_radius=10, target_nx=24)
    outdir.mkdir()
    run = workflow._Run(star, outdir, p, executor or SerialExecutor(), NullProgress(), None)
    working, _shifts, _ratio = workflow._prepare(run, stack)
    return np.load(working.path)


def test_isac2_front_end_reads_in_file_order_and_puts_rows_back(tables, tmp_path, monkeypatch, reads):
    from isavar.workflows import isac2 as workflow

    d, perm = tables
    monkeypatch.setattr(workflow, "CHUNK", CHUNK)
    ordered = _working_stack(d / "ordered.star", tmp_path / "ordered")
    reads.clear()
    shuffled = _working_stack(d / "shuffled.star", tmp_path / "shuffled")
    _assert_streamed(reads, len(perm))
    assert np.abs(ordered).max() > 0
    np.testing.assert_array_equal(shuffled, ordered[perm])
    pool = PoolExecutor(2)                                # the tasks' rows travel to the workers as pixels
    try:
        pooled = _working_stack(d / "shuffled.star", tmp_path / "pool", pool)
    finally:
        pool.close()
    np.testing.assert_array_equal(pooled, shuffled)


def test_reconstruct_reads_in_file_order_and_ignores_the_row_order(tables, tmp_path, reads):
    from isavar.workflows.variability import run_reconstruct

    d, perm = tables
    ordered = run_reconstruct(d / "ordered.star", tmp_path / "ordered.mrc", ctf=True, chunk_size=CHUNK)
    reads.clear()
    shuffled = run_reconstruct(d / "shuffled.star", tmp_path / "shuffled.mrc", ctf=True, chunk_size=CHUNK)
    _assert_streamed(reads, len(perm))
    assert np.abs(ordered).max() > 0
    assert ordered.tobytes() == shuffled.tobytes()
    pool = PoolExecutor(2)
    try:
        pooled = run_reconstruct(d / "shuffled.star", tmp_path / "pool.mrc", ctf=True, chunk_size=CHUNK,
                                 executor=pool)
    finally:
        pool.close()
    assert pooled.tobytes() == ordered.tobytes()


@pytest.mark.parametrize("mode", ["snd", "var_input"])
def test_variability_passes_read_in_file_order_and_ignore_the_row_order(tables, monkeypatch, reads, mode):
    from isavar.variability import run as var_run
    from isavar.variability.params import VariabilityParams
    from isavar.variability.run import variability

    d, perm = tables
    monkeypatch.setattr(var_run, "BLOCK", CHUNK)
    params = VariabilityParams(img_per_grp=20, ctf=mode == "snd", **{mode: True})
    results = []
    for name in ("ordered.star", "shuffled.star"):
        stack = read_particles(d / name)
        reads.clear()
        results.append(variability(stack.table, stack.images, params, pixel_size_A=stack.pixel_size_A))
        passes = 2 if mode == "snd" else 1                   # --SND: the reference, then the differences
        for k in range(passes):
            _assert_streamed(reads[k * len(perm):(k + 1) * len(perm)], len(perm))
    a, b = results
    assert np.abs(a.var3d).max() > 0
    assert a.var3d.tobytes() == b.var3d.tobytes()
    if mode == "snd":
        assert a.ave3d.tobytes() == b.ave3d.tobytes()
