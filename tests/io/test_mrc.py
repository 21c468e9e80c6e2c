"""MRC/MRCS stacks and volumes: modes, header flags, voxel size, memory mapping, damaged files."""

from __future__ import annotations

import io

import mrcfile
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isavar.errors import InputError
from isavar.io import read_particles, read_volume, write_image_stack, write_particles, write_volume
from isavar.io.particles import new_table

from _io_helpers import open_files, random_images


def _valid(path) -> bool:
    return mrcfile.validate(str(path), print_file=io.StringIO())


def test_stack_round_trip_sets_image_stack_flags(tmp_path, rng):
    images = random_images(rng, 9, 20)
    path = tmp_path / "s.mrcs"
    assert write_image_stack(path, [images[:4], images[4:]], 1.35) == 9
    with mrcfile.open(path) as mrc:
        assert mrc.header.ispg == 0 and mrc.header.mz == 1 and mrc.header.nz == 9
        assert mrc.voxel_size.x == pytest.approx(1.35, rel=1e-6)
        assert mrc.header.dmin == pytest.approx(images.min())
        assert mrc.header.dmax == pytest.approx(images.max())
        assert mrc.header.dmean == pytest.approx(images.mean(), abs=1e-6)
        assert mrc.header.rms == pytest.approx(images.std(), rel=1e-5)
    assert _valid(path)
    stack = read_particles(path)
    assert stack.pixel_size_A == 1.35
    assert list(stack.table.columns) == ["image_path", "image_index", "pixel_size_A"]
    np.testing.assert_array_equal(stack.images[:], images)
    stack.close()


def test_volume_flags_and_round_trip(tmp_path, rng):
    volume = rng.normal(size=(12, 12, 12)).astype(np.float32)
    write_volume(tmp_path / "v.mrc", volume, 2.5)
    with mrcfile.open(tmp_path / "v.mrc") as mrc:
        assert mrc.header.ispg == 1 and mrc.header.mz == 12
    assert _valid(tmp_path / "v.mrc")
    got, voxel = read_volume(tmp_path / "v.mrc")
    assert voxel == 2.5
    np.testing.assert_array_equal(got, volume)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16, np.float16, np.float32])
def test_every_real_mode_reads_as_float32(tmp_path, rng, dtype):
    data = (rng.normal(size=(3, 8, 8)) * 20).astype(dtype)
    path = tmp_path / "m.mrcs"
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
        mrc.set_image_stack()
        mrc.voxel_size = 1.1
    stack = read_particles(path)
    block = stack.images[:]
    assert block.dtype == np.float32
    np.testing.assert_array_equal(block, data.astype(np.float32))
    assert stack.pixel_size_A == 1.1
    stack.close()


def test_float16_mode_12(tmp_path, rng):
    data = rng.normal(size=(2, 8, 8)).astype(np.float16)
    with mrcfile.new(tmp_path / "h.mrcs") as mrc:
        mrc.set_data(data)
        assert mrc.header.mode == 12
    np.testing.assert_array_equal(read_particles(tmp_path / "h.mrcs").images[1], data[1].astype(np.float32))


def test_complex_mode_refused(tmp_path):
    with mrcfile.new(tmp_path / "c.mrcs") as mrc:
        mrc.set_data(np.zeros((2, 8, 8), np.complex64))
    with pytest.raises(InputError, match="c.mrcs.*not a real-valued"):
        read_particles(tmp_path / "c.mrcs")


def test_truncated_file_is_an_input_error(tmp_path, rng):
    path = tmp_path / "t.mrcs"
    write_image_stack(path, random_images(rng, 4, 16), 1.0)
    data = path.read_bytes()
    path.write_bytes(data[:-300])
    with pytest.raises(InputError, match="t.mrcs: truncated"):
        read_particles(path)


def test_not_an_mrc_file(tmp_path):
    (tmp_path / "junk.mrcs").write_bytes(b"hello world" * 200)
    with pytest.raises(InputError, match="junk.mrcs"):
        read_particles(tmp_path / "junk.mrcs")


def test_non_square_stack_refused(tmp_path):
    with mrcfile.new(tmp_path / "r.mrcs") as mrc:
        mrc.set_data(np.zeros((2, 8, 10), np.float32))
    with pytest.raises(InputError, match="not square"):
        read_particles(tmp_path / "r.mrcs")


def test_nan_pixels_reported_on_read_of_the_chunk(tmp_path, rng):
    data = random_images(rng, 5, 8)
    data[3, 2, 2] = np.nan
    with pytest.warns(RuntimeWarning, match="NaN"), mrcfile.new(tmp_path / "n.mrcs") as mrc:
        mrc.set_data(data)
    stack = read_particles(tmp_path / "n.mrcs")
    np.testing.assert_array_equal(stack.images[:3], data[:3])
    with pytest.raises(InputError, match=r"n.mrcs: image 4 \(1-based\) contains NaN"):
        stack.images[2:5]
    stack.close()


def test_writing_nan_refused_and_nothing_left_behind(tmp_path, rng):
    data = random_images(rng, 3, 8)
    data[1, 0, 0] = np.inf
    with pytest.raises(InputError, match="NaN or Inf"):
        write_image_stack(tmp_path / "x.mrcs", data, 1.0)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_not_overwritten(tmp_path, rng):
    path = tmp_path / "s.mrcs"
    write_image_stack(path, random_images(rng, 2, 8), 1.0)
    before = path.read_bytes()
    with pytest.raises(InputError, match="already exists"):
        write_image_stack(path, random_images(rng, 3, 8), 1.0)
    assert path.read_bytes() == before
    write_image_stack(path, random_images(rng, 3, 8), 1.0, overwrite=True)
    assert read_particles(path).images.shape == (3, 8, 8)


def test_an_open_stack_is_one_file_descriptor_and_inputs_unchanged(tmp_path, rng):
    path = tmp_path / "s.mrcs"
    images = random_images(rng, 6, 8)
    write_image_stack(path, images, 1.0)
    before = path.read_bytes()
    stack = read_particles(path)
    np.testing.assert_array_equal(stack.images[[4, 0, 2, 3]], images[[4, 0, 2, 3]])
    assert open_files().count(str(path.resolve())) == 1
    stack.close()
    assert str(path.resolve()) not in open_files()
    assert path.read_bytes() == before


def test_single_image_mrc_is_a_stack_of_one(tmp_path, rng):
    image = random_images(rng, 1, 8)[0]
    with mrcfile.new(tmp_path / "one.mrc") as mrc:
        mrc.set_data(image)
    stack = read_particles(tmp_path / "one.mrc")
    assert stack.images.shape == (1, 8, 8)
    np.testing.assert_array_equal(stack.images[0], image)


def test_write_particles_mrcs_ignores_metadata(tmp_path, rng):
    images = random_images(rng, 4, 8)
    table = new_table(4, pixel_size_A=2.0)
    table["angle_psi_deg"] = 10.0
    write_particles(tmp_path / "o.mrcs", images, table)
    stack = read_particles(tmp_path / "o.mrcs")
    assert stack.pixel_size_A == 2.0 and "angle_psi_deg" not in stack.table


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 7), box=st.integers(1, 12), chunk=st.integers(1, 5), seed=st.integers(0, 2**31))
def test_stack_round_trip_property(tmp_path_factory, n, box, chunk, seed):
    images = np.random.default_rng(seed).normal(size=(n, box, box)).astype(np.float32)
    path = tmp_path_factory.mktemp("p") / "s.mrcs"
    write_image_stack(path, [images[i:i + chunk] for i in range(0, n, chunk)], 0.9)
    stack = read_particles(path)
    blocks = [b for _, _, b in stack.images.chunks(chunk)]
    np.testing.assert_array_equal(np.concatenate(blocks), images)
    stack.close()


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint16, np.float16, np.float32])
@pytest.mark.parametrize("byte_order", ["<", ">"])
@pytest.mark.parametrize("extended", [0, 96])
def test_header_fast_path_agrees_with_mrcfile(tmp_path, rng, dtype, byte_order, extended):
    from isavar.io.mrc import MrcSource, _mrcfile_header, _quick_header

    data = (rng.normal(size=(5, 6, 6)) * 20).astype(dtype)
    path = tmp_path / "s.mrcs"
    with mrcfile.new(path) as mrc:
        if extended:
            mrc.set_extended_header(np.zeros(extended, dtype="V1"))
        mrc.set_data(data)
        mrc.set_image_stack()
        mrc.voxel_size = 1.37
    if byte_order == ">":                                    # rewrite big-endian, as some programs write
        with mrcfile.open(path) as mrc:
            header = mrc.header.copy().astype(mrc.header.dtype.newbyteorder(">"))
            header["machst"] = [0x11, 0x11, 0, 0]
            ext = bytes(mrc.extended_header.tobytes()) if extended else b""
        path.write_bytes(header.tobytes() + ext + data.astype(data.dtype.newbyteorder(">")).tobytes())
    fast, slow = _quick_header(path), _mrcfile_header(path)
    assert fast is not None and fast == slow
    np.testing.assert_array_equal(read_particles(path).images[[3, 1]], data[[3, 1]].astype(np.float32))
    assert MrcSource(path).offset == 1024 + extended


def test_header_fast_path_leaves_odd_files_to_mrcfile(tmp_path, rng):
    from isavar.io.mrc import _quick_header

    path = tmp_path / "s.mrcs"
    write_image_stack(path, random_images(rng, 3, 8), 1.0)
    raw = bytearray(path.read_bytes())
    raw[212:216] = b"\x00\x00\x00\x00"                        # unknown machine stamp
    path.write_bytes(bytes(raw))
    assert _quick_header(path) is None
    assert read_particles(path).images.shape == (3, 8, 8)   # mrcfile reads it (little-endian default)
