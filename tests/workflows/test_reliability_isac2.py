"""ISAC2 reliability (issue 16): a changed input is never resumed, rejected runs leave nothing behind,
duplicated particles, volumes and absurd search ranges are refused before anything is written."""

from __future__ import annotations

import os

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from isavar.errors import InputError
from isavar.io import write_particles
from isavar.isac.params import Isac2Params
from isavar.workflows.isac2 import run_isac2

from _hooks import StopForTest, stop_after

BOX, APIX, N = 40, 3.0, 120


def _params(**kw):
    base = dict(radius=15, target_radius=10, target_nx=28, img_per_grp=40, minimum_grp_size=15, maxit=4,
                init_iter=1, stab_ali=2, rand_seed=5, CTF=True)
    base.update(kw)
    return Isac2Params(**base)


@pytest.fixture
def dataset(tmp_path):
    from isavar.synthetic import phantom_volume, simulate_particles

    vol = phantom_volume("blob", BOX, APIX)
    imgs, table = simulate_particles(vol, N, pixel_size_A=APIX, snr=0.5, orientations="views:3", rng=4)
    path = tmp_path / "in" / "particles.star"
    path.parent.mkdir()
    write_particles(path, imgs, table)
    return path


def _stack_of(star):
    return star.with_name("particles.mrcs")


def test_resume_refuses_an_input_replaced_in_place(dataset, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(StopForTest):
        run_isac2(dataset, out, _params(), on_checkpoint=stop_after(1))
    stack = _stack_of(dataset)
    with mrcfile.open(stack, "r+") as m:                         # re-extracted: same path, count and box
        m.data[:] = np.random.default_rng(0).normal(size=m.data.shape).astype(np.float32)
    with pytest.raises(InputError, match="input has changed.*pixels of a sample"):
        run_isac2(dataset, out, _params())
    assert not (out / "finished").exists()


def test_resume_refuses_changed_metadata(dataset, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(StopForTest):
        run_isac2(dataset, out, _params(), on_checkpoint=stop_after(1))
    blocks = starfile.read(dataset, always_dict=True)
    blocks["particles"]["rlnDefocusU"] += 1000.0                  # same size on disk is not required
    starfile.write(blocks, dataset, overwrite=True)
    with pytest.raises(InputError, match="input has changed"):
        run_isac2(dataset, out, _params())


def test_resume_continues_when_only_the_modification_time_changed(dataset, tmp_path):
    import logging

    out = tmp_path / "run"
    with pytest.raises(StopForTest):
        run_isac2(dataset, out, _params(), on_checkpoint=stop_after(1))
    stack = _stack_of(dataset)
    os.utime(stack, ns=(stack.stat().st_atime_ns, stack.stat().st_mtime_ns + 10**9))   # `touch`
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("isavar")
    logger.addHandler(handler)
    try:
        run_isac2(dataset, out, _params())
    finally:
        logger.removeHandler(handler)
    assert (out / "finished").exists()
    assert any("new modification time" in r.getMessage() for r in records)


def test_rejected_images_leave_no_output_directory(dataset, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    from isavar.io import read_particles

    stack = read_particles(dataset)
    images = stack.images[:]
    images[5, 3, 3] = np.nan
    path = bad / "nan.star"
    write_particles(path, np.nan_to_num(images), stack.table)    # written clean, then corrupted on disk
    with mrcfile.open(bad / "nan.mrcs", "r+") as m:
        m.data[5, 3, 3] = np.nan
    out = tmp_path / "run"
    with pytest.raises(InputError, match="NaN"):
        run_isac2(path, out, _params())
    assert not out.exists()                                       # the corrected run is not refused
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="NaN"):
        run_isac2(path, empty, _params())
    assert empty.is_dir() and not any(empty.iterdir())            # an empty folder given stays empty


def test_duplicated_particles_are_refused(dataset, tmp_path):
    blocks = starfile.read(dataset, always_dict=True)
    blocks["particles"] = pd.concat([blocks["particles"], blocks["particles"].iloc[:3]], ignore_index=True)
    dup = dataset.with_name("dup.star")
    starfile.write(blocks, dup)
    out = tmp_path / "run"
    with pytest.raises(InputError, match=r"3 rows repeat an earlier one \(first: row 121 repeats row 1"):
        run_isac2(dup, out, _params())
    assert not out.exists()


def test_a_volume_is_not_a_particle_stack(tmp_path):
    path = tmp_path / "map.mrc"
    with mrcfile.new(path) as m:
        m.set_data(np.zeros((BOX,) * 3, np.float32))
        m.set_volume()
    out = tmp_path / "run"
    with pytest.raises(InputError, match="3D volume"):
        run_isac2(path, out, _params(CTF=False))
    assert not out.exists()


def test_absurd_search_range_is_refused_before_any_work(dataset, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(InputError, match=r"--xr 1000 .* needs about .* of memory.*smaller --xr"):
        run_isac2(dataset, out, _params(xr=1000))
    assert not out.exists()
