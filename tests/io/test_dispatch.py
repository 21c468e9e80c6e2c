"""Suffix dispatch, BDB and unknown formats, LazyImages indexing and pickling, conversions between formats."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isavar.errors import InputError
from isavar.io import (
    LazyImages,
    particle_format,
    read_particles,
    read_volume,
    write_image_stack,
    write_particles,
    write_volume,
)
from isavar.io.particles import validate

from _io_helpers import assert_tables_match, full_table, random_images


@pytest.mark.parametrize("name,file", [("bdb:stack", "EMAN2DB/stack.bdb"), ("bdb:data#stack", "data/EMAN2DB/stack.bdb"),
                                       ("proj/EMAN2DB/stack.bdb", "proj/EMAN2DB/stack.bdb")])
def test_missing_bdb_stack_is_named(name, file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert particle_format(name) == "bdb"
    with pytest.raises(InputError, match=f"^{name}: no such BDB stack: {tmp_path.resolve()}/{file} does not exist"):
        read_particles(name)
    with pytest.raises(InputError, match="does not write BDB"):
        write_particles(name, np.zeros((1, 4, 4), np.float32), pd.DataFrame({"a": [1]}))


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "x.txt").write_text("1")
    with pytest.raises(InputError, match=r"x.txt: unknown file format '.txt'"):
        read_particles(tmp_path / "x.txt")
    with pytest.raises(InputError, match="nothere.star: file not found"):
        read_particles(tmp_path / "nothere.star")
    with pytest.raises(InputError, match="file not found"):
        read_volume(tmp_path / "nothere.mrc")
    with pytest.raises(InputError, match="cannot write a volume as star"):
        write_volume(tmp_path / "v.star", np.zeros((4, 4, 4)), 1.0)
    assert [particle_format(p) for p in ("a.STAR", "b.mrcs", "c.h5", "d.cs")] == ["star", "mrcs", "hdf", "cs"]


def test_lazy_images_indexing(rng):
    data = random_images(rng, 7, 6)
    images = LazyImages.from_array(data)
    assert len(images) == 7 and images.shape == (7, 6, 6) and images.box == 6
    np.testing.assert_array_equal(images[-1], data[-1])
    np.testing.assert_array_equal(images[[4, 1, 4]], data[[4, 1, 4]])
    np.testing.assert_array_equal(images[1:6:2], data[1:6:2])
    mask = np.zeros(7, bool)
    mask[[0, 5]] = True
    np.testing.assert_array_equal(images[mask], data[mask])
    np.testing.assert_array_equal(np.asarray(images), data)
    np.testing.assert_array_equal(images.subset([6, 0])[:], data[[6, 0]])
    assert [(a, b) for a, b, _ in images.chunks(3)] == [(0, 3), (3, 6), (6, 7)]
    with pytest.raises(IndexError):
        images[7]


def test_lazy_images_pickle_without_handles(tmp_path, rng):
    data = random_images(rng, 4, 8)
    write_image_stack(tmp_path / "s.mrcs", data, 1.0)
    stack = read_particles(tmp_path / "s.mrcs")
    stack.images[0]
    clone = pickle.loads(pickle.dumps(stack.images))
    np.testing.assert_array_equal(clone[:], data)
    clone.close()
    stack.close()


@pytest.mark.parametrize("src", ["star", "hdf", "cs"])
@pytest.mark.parametrize("dst", ["star", "hdf", "cs"])
def test_conversions_between_formats(tmp_path, rng, src, dst):
    images, table = random_images(rng, 5, 10), full_table(rng, 5)
    write_particles(tmp_path / f"a.{src}", images, table, pixel_size_A=1.3)
    first = read_particles(tmp_path / f"a.{src}")
    write_particles(tmp_path / "out" / f"b.{dst}", first.images, first.table, chunk_size=2)
    second = read_particles(tmp_path / "out" / f"b.{dst}")
    np.testing.assert_array_equal(second.images[:], images)
    assert second.pixel_size_A == pytest.approx(1.3)
    assert_tables_match(second.table, table)
    assert validate(second.table) == []


def test_validate_reports_problems():
    table = pd.DataFrame({"image_index": [-1], "class_number": [0], "align_mirror": [2], "pixel_size_A": [0.0]})
    problems = validate(table, permissive=True)
    assert len(problems) == 4
    with pytest.raises(ValueError, match="0-based"):
        validate(table)


def test_row_count_mismatch(tmp_path, rng):
    with pytest.raises(ValueError, match="3 images but the table has 2 rows"):
        write_particles(tmp_path / "a.star", random_images(rng, 3, 8), full_table(rng, 2), pixel_size_A=1.0)


@pytest.mark.parametrize("suffix", ["star", "hdf", "cs"])
@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 6), box=st.integers(2, 9), seed=st.integers(0, 2**31))
def test_table_round_trip_property(tmp_path_factory, suffix, n, box, seed):
    rng = np.random.default_rng(seed)
    images, table = random_images(rng, n, box), full_table(rng, n)
    path = tmp_path_factory.mktemp("rt") / f"p.{suffix}"
    write_particles(path, images, table, pixel_size_A=float(rng.uniform(0.5, 5.0)))
    stack = read_particles(path)
    np.testing.assert_array_equal(stack.images[:], images)
    assert_tables_match(stack.table, table)
    stack.close()
