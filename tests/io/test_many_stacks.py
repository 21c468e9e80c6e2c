"""Inputs as users have them: a RELION Extract project (one .mrcs per micrograph, paths relative to the
project directory) and a cryoSPARC .cs naming the same stacks, here 2,000 particles over 200 files.

Every image holds its own address (pixel value = 1000 * file + index), so a wrong row order, a wrong file
or a wrong index shows in the pixels. The bench at full scale (1,000,000 particles over 5,000 files) is
``bench/io_many_bench.py`` (figures in ``bench/io.md``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import starfile
from hypothesis import given, settings
from hypothesis import strategies as st

import isavar.io.mrc as mrc_module
import isavar.io.stack as stack_module
from isavar.errors import InputError
from isavar.io import read_particles, write_image_stack, write_particles
from isavar.io.star import _read_blocks, _read_loop_blocks, split_image_names

from _io_helpers import open_files

FILES, PER_FILE, BOX = 200, 10, 4
MOVIES = Path("Extract/job007/Movies")


def _stack_name(f: int) -> str:
    return (MOVIES / f"mic_{f + 1:04d}.mrcs").as_posix()


def _write_project(root: Path, order: np.ndarray | None = None) -> dict:
    (root / MOVIES).mkdir(parents=True, exist_ok=True)
    (root / "J12").mkdir(exist_ok=True)
    for f in range(FILES):
        if not (root / _stack_name(f)).exists():
            images = np.broadcast_to((1000.0 * f + np.arange(PER_FILE))[:, None, None], (PER_FILE, BOX, BOX))
            write_image_stack(root / _stack_name(f), images.astype(np.float32), 1.5)
    file_of = np.repeat(np.arange(FILES), PER_FILE)
    index = np.tile(np.arange(PER_FILE), FILES)
    if order is not None:
        file_of, index = file_of[order], index[order]
    n = file_of.size
    particles = pd.DataFrame({
        "rlnCoordinateX": np.arange(n, dtype=float), "rlnCoordinateY": 1.0,
        "rlnImageName": [f"{i + 1:06d}@{_stack_name(f)}" for f, i in zip(file_of, index)],
        "rlnMicrographName": [f"MotionCorr/job002/Movies/mic_{f + 1:04d}.mrc" for f in file_of],
        "rlnOpticsGroup": 1, "rlnDefocusU": 15000.0 + file_of, "rlnDefocusV": 14000.0, "rlnDefocusAngle": 10.0,
    })
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [1.5], "rlnImageSize": [BOX], "rlnImageDimensionality": [2]})
    starfile.write({"optics": optics, "particles": particles}, root / "Extract/job007/particles.star")
    cs = np.zeros(n, dtype=[("uid", "<u8"), ("blob/path", "S40"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
                            ("blob/psize_A", "<f4"), ("location/micrograph_path", "S40")])
    cs["uid"] = np.arange(1, n + 1)
    cs["blob/path"] = [_stack_name(f).encode() for f in file_of]
    cs["blob/idx"] = index
    cs["blob/shape"] = BOX
    cs["blob/psize_A"] = 1.5
    cs["location/micrograph_path"] = [f"J3/mic_{f + 1:04d}.mrc".encode() for f in file_of]
    with open(root / "J12/J12_particles.cs", "wb") as fh:
        np.save(fh, cs)
    return {"file_of": file_of, "index": index, "expected": 1000.0 * file_of + index}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("relion_project")
    return root, _write_project(root)


@pytest.fixture
def shuffled(tmp_path):
    root = tmp_path / "proj"
    order = np.random.default_rng(4).permutation(FILES * PER_FILE)
    return root, _write_project(root, order)


def _mrcs_open() -> int:
    return sum(p.endswith(".mrcs") for p in open_files())


@pytest.mark.parametrize("kind", ["star", "cs"])
def test_many_stacks_read_in_table_order_with_bounded_open_files(project, kind, monkeypatch):
    root, truth = project
    monkeypatch.setattr(stack_module, "MAX_OPEN_FILES", 8)
    monkeypatch.chdir(root)                                  # RELION's project directory
    path = "Extract/job007/particles.star" if kind == "star" else "J12/J12_particles.cs"
    before = _mrcs_open()
    stack = read_particles(path)
    assert len(stack.table) == FILES * PER_FILE and len(stack.images.sources) == FILES
    assert _mrcs_open() == before                            # opening reads headers only
    assert stack.pixel_size_A == 1.5 and stack.images.box == BOX
    assert isinstance(stack.table["image_path"].dtype, pd.CategoricalDtype)
    assert stack.table["image_path"].nunique() == FILES
    assert stack.table["image_path"].iloc[-1] == str((root / _stack_name(FILES - 1)).resolve())
    np.testing.assert_array_equal(stack.table["image_index"], truth["index"])
    most, got = 0, []
    for start, stop, block in stack.images.chunks(128):
        got.append(block[:, 0, 0])
        most = max(most, _mrcs_open() - before)
    np.testing.assert_array_equal(np.concatenate(got), truth["expected"])
    assert 0 < most <= 8
    stack.close()
    assert _mrcs_open() == before
    assert not any(line.rstrip().endswith(".mrcs") for line in Path("/proc/self/maps").read_text().splitlines())


def _record_reads(monkeypatch) -> list:
    calls = []
    original = mrc_module.MrcSource.read_into

    def read_into(self, handle, indices, out):
        calls.append((self.path, np.array(indices)))
        return original(self, handle, indices, out)

    monkeypatch.setattr(mrc_module.MrcSource, "read_into", read_into)
    return calls


def test_shuffled_table_is_read_file_by_file_in_file_order(shuffled, monkeypatch):
    root, truth = shuffled
    stack = read_particles(root / "Extract/job007/particles.star", project_dir=root)
    calls = _record_reads(monkeypatch)
    for start, stop, block in stack.images.chunks(500):
        np.testing.assert_array_equal(block[:, 0, 0], truth["expected"][start:stop])
        paths = [p for p, _ in calls]
        assert len(paths) == len(set(paths))                 # each file once per chunk ...
        assert all((np.diff(i) > 0).all() for _, i in calls)  # ... front to back
        calls.clear()
    rows = np.random.default_rng(0).choice(len(stack.table), 300, replace=False)
    rows = np.concatenate([rows, rows[:7]])                  # repeated rows are read once
    np.testing.assert_array_equal(stack.images[rows][:, 0, 0], truth["expected"][rows])
    assert len({p for p, _ in calls}) == len(calls)
    assert sum(i.size for _, i in calls) == 300
    stack.close()


def test_headers_are_read_once_per_stack_and_pixels_only_on_demand(project, monkeypatch):
    root, _ = project
    seen = []
    original = mrc_module._quick_header
    monkeypatch.setattr(mrc_module, "_quick_header", lambda p: seen.append(str(p)) or original(p))
    calls = _record_reads(monkeypatch)
    stack = read_particles(root / "Extract/job007/particles.star", project_dir=root)
    assert len(seen) == len(set(seen)) == FILES
    assert calls == []
    assert stack.images[1234][0, 0] == 1000.0 * 123 + 4
    assert [Path(p).name for p, _ in calls] == ["mic_0124.mrcs"]
    stack.close()


def _copy(project_root: Path, tmp_path: Path) -> Path:
    root = tmp_path / "copy"
    shutil.copytree(project_root, root)
    return root


@pytest.mark.parametrize("kind", ["star", "cs"])
def test_missing_stacks_among_many_named_at_once(project, tmp_path, kind, monkeypatch, capsys):
    from isavar.cli import main

    root = _copy(project[0], tmp_path)
    for f in (150, 37, 90):
        (root / _stack_name(f)).unlink()
    monkeypatch.chdir(root)
    path = "Extract/job007/particles.star" if kind == "star" else "J12/J12_particles.cs"
    with pytest.raises(InputError) as err:
        read_particles(path)
    message = str(err.value)
    assert "mic_0038.mrcs" in message                        # the first missing one in table order
    assert "3 of the 200 image stacks it names are missing" in message
    assert main(["info", path]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "mic_0038.mrcs" in lines[0] and "3 of the 200" in lines[0]


@pytest.mark.parametrize("kind", ["star", "cs"])
def test_index_past_the_end_of_one_stack_among_many(project, tmp_path, kind, monkeypatch, capsys):
    from isavar.cli import main

    root = _copy(project[0], tmp_path)
    row = 150 * PER_FILE + 3
    if kind == "star":
        path = root / "Extract/job007/particles.star"
        blocks = starfile.read(path, always_dict=True)
        blocks["particles"].loc[row, "rlnImageName"] = f"000011@{_stack_name(150)}"
        starfile.write(blocks, path)
    else:
        path = root / "J12/J12_particles.cs"
        cs = np.load(path)
        cs["blob/idx"][row] = 10
        with open(path, "wb") as fh:
            np.save(fh, cs)
    monkeypatch.chdir(root)
    calls = _record_reads(monkeypatch)
    with pytest.raises(InputError, match=r"mic_0151.mrcs: image index 11 \(1-based\) is past the end of the stack, "
                                         r"which holds 10 images"):
        read_particles(path)
    assert calls == []
    assert main(["info", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "mic_0151.mrcs: image index 11" in lines[0]


def test_open_file_bound_holds_for_hdf_sources(tmp_path, monkeypatch):
    from isavar.io.stack import LazyImages

    monkeypatch.setattr(stack_module, "MAX_OPEN_FILES", 3)
    sources = []
    for f in range(10):
        images = np.full((2, BOX, BOX), f, np.float32) + np.arange(2, dtype=np.float32)[:, None, None]
        write_particles(tmp_path / f"s{f}.hdf", images, pd.DataFrame({"pixel_size_A": [1.0, 1.0]}))
        sources += read_particles(tmp_path / f"s{f}.hdf").images.sources
    ids = np.repeat(np.arange(10), 2)[::-1].copy()
    idx = np.tile([0, 1], 10)
    images = LazyImages(sources, ids, idx)
    most = 0
    for _, _, block in images.chunks(3):
        most = max(most, sum(p.endswith(".hdf") for p in open_files()))
    assert 0 < most <= 3
    np.testing.assert_array_equal(images[:][:, 0, 0], ids + idx)
    images.close()
    assert not any(p.endswith(".hdf") for p in open_files())


def test_fast_star_reader_matches_starfile(project, tmp_path):
    path = project[0] / "Extract/job007/particles.star"
    fast = _read_loop_blocks(path)
    slow = starfile.read(path, always_dict=True)
    assert list(fast) == list(slow)
    for name in slow:
        pd.testing.assert_frame_equal(fast[name], slow[name])
    odd = tmp_path / "odd.star"
    odd.write_text("# comment\n\ndata_general\n\n_rlnOpticsGroup 3\n_rlnSomething  text\n\n"
                   "data_optics\n\nloop_\n_rlnOpticsGroup #1\n_rlnVoltage #2\n  1 300.0\n\n2 200\n\n"
                   "data_particles\n\nloop_ \n_rlnImageName #1\n_rlnNote #2\n_rlnEmpty #3\n"
                   "000001@a.mrcs x1 nan\n# a comment line\n\n000002@a.mrcs x2 nan\n   \n"
                   "data_empty\n\nloop_\n_rlnA\n_rlnB\n\n")
    fast = _read_loop_blocks(odd)
    slow = {k: v for k, v in starfile.read(odd, always_dict=True).items() if isinstance(v, pd.DataFrame)}
    assert list(fast) == list(slow) == ["optics", "particles", "empty"]
    for name in slow:
        pd.testing.assert_frame_equal(fast[name], slow[name])
    quoted = tmp_path / "quoted.star"
    quoted.write_text("data_particles\n\nloop_\n_rlnImageName\n_rlnNote\n1@a.mrcs 'two words'\n")
    blocks = _read_blocks(quoted)                            # left to starfile
    assert blocks["particles"]["rlnNote"].tolist() == ["two words"]


def test_image_names_split_like_parse_image_name():
    from isavar.conventions import parse_image_name

    names = ["000001@Extract/a.mrcs", "12@b c.mrcs", " 3@x.mrcs ", "stack.mrcs", "7@é.mrcs", "0000002@Extract/a.mrcs"]
    indices, codes, paths = split_image_names(pd.Series(names), "t.star")
    expected = [parse_image_name(n) for n in names]
    assert indices.tolist() == [e[0] for e in expected]
    assert [paths[c] for c in codes] == [e[1] for e in expected]
    for bad in (["0@a.mrcs"], ["x@a.mrcs"], ["1@a.mrcs", "-2@a.mrcs"]):
        with pytest.raises(InputError, match="t.star"):
            split_image_names(pd.Series(bad), "t.star")


def test_missing_optics_group_is_an_error(tmp_path, rng):
    write_particles(tmp_path / "p.star", rng.normal(size=(3, BOX, BOX)).astype(np.float32),
                    pd.DataFrame({"pixel_size_A": [1.0] * 3, "voltage_kV": 300.0, "optics_group": 1}))
    blocks = starfile.read(tmp_path / "p.star", always_dict=True)
    blocks["particles"].loc[1, "rlnOpticsGroup"] = 2
    starfile.write(blocks, tmp_path / "p.star")
    with pytest.raises(InputError, match="optics group 2 is not defined in data_optics"):
        read_particles(tmp_path / "p.star")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 2), st.sampled_from(["a", "b"])),
                min_size=0, max_size=30))
def test_duplicated_rows_equals_a_full_comparison(rows):
    from isavar.io.particles import duplicated_rows

    table = pd.DataFrame(rows, columns=["file", "image_index", "value", "note"])
    table.insert(0, "image_path", pd.Categorical([f"s{f}.mrcs" for f in table.pop("file")]))
    expected = table.duplicated(keep="first").to_numpy() if len(table) > 1 else np.zeros(len(table), bool)
    np.testing.assert_array_equal(duplicated_rows(table), expected)
    np.testing.assert_array_equal(duplicated_rows(table, columns=()),
                                  table.duplicated(subset=["image_path", "image_index"]).to_numpy()
                                  if len(table) > 1 else np.zeros(len(table), bool))


def test_chunked_star_parse_equals_one_read(tmp_path, monkeypatch):
    import isavar.io.star as star_module

    monkeypatch.setattr(star_module, "CSV_CHUNK_ROWS", 3)
    path = tmp_path / "c.star"
    path.write_text("data_particles\n\nloop_\n_rlnImageName\n_rlnX\n_rlnY\n_rlnZ\n"
                    + "".join(f"{i + 1}@a.mrcs {i} {i}.5 {i if i < 7 else 'text'}\n" for i in range(10)))
    fast = _read_loop_blocks(path)["particles"]
    pd.testing.assert_frame_equal(fast, starfile.read(path))
    assert fast["rlnX"].dtype == np.int64 and fast["rlnZ"].tolist()[6:8] == ["6", "text"]


def test_file_order_streams_every_file_once(shuffled, monkeypatch):
    root, truth = shuffled
    stack = read_particles(root / "Extract/job007/particles.star", project_dir=root)
    order = stack.images.file_order()
    assert sorted(order.tolist()) == list(range(len(order)))
    calls = _record_reads(monkeypatch)
    values = np.concatenate([b[:, 0, 0] for _, _, b in stack.images.subset(order).chunks(64)])
    np.testing.assert_array_equal(values, truth["expected"][order])
    assert np.all(np.diff(values) > 0)                       # file by file, front to back
    chunks = -(-FILES * PER_FILE // 64)
    assert len({p for p, _ in calls}) == FILES and len(calls) <= FILES + chunks   # a file split by a chunk edge
    stack.close()


@pytest.mark.skipif(shutil.which("relion_stack_create") is None, reason="RELION binaries not installed")
def test_relion_reads_the_same_images_from_the_project_directory(shuffled, tmp_path):
    """relion_stack_create, run from the project directory, gathers the images of the shuffled 200-stack
    STAR; isavar's read of that STAR (and of the .cs naming the same stacks) gives the same pixels."""
    import subprocess

    import mrcfile

    root, truth = shuffled
    out = tmp_path / "relion_out"
    subprocess.run(["relion_stack_create", "--i", "Extract/job007/particles.star", "--o", str(out)], cwd=root,
                   check=True, capture_output=True, timeout=300)
    relion = mrcfile.read(str(out) + ".mrcs")
    np.testing.assert_array_equal(relion[:, 0, 0], truth["expected"])
    for path in ("Extract/job007/particles.star", "J12/J12_particles.cs"):
        stack = read_particles(root / path, project_dir=root)
        np.testing.assert_array_equal(stack.images[:], relion)
        stack.close()


def test_picked_rows_travel_as_file_positions_and_read_the_same_pixels(shuffled):
    """A task's rows sent to another process name their files and positions (bytes independent of the table's
    size) and read the same pixels there; images held in memory travel as pixels."""
    import pickle

    from isavar.io.stack import LazyImages
    from isavar.isac.working import PickRows

    root, info = shuffled
    stack = read_particles(root / "Extract/job007/particles.star", project_dir=root)
    rows = np.random.default_rng(5).choice(len(stack.table), 37, replace=False)
    files = stack.images.file_subset(rows)
    assert len(files) == 37 and len(files.sources) == len(np.unique(info["file_of"][rows]))
    data = pickle.dumps(PickRows(stack.images, rows))
    assert len(data) < 64 * 37 + 200 * len(files.sources) + 4096      # no pixels, nothing per table row
    got = np.asarray(pickle.loads(data), dtype=np.float32)
    assert got.shape == (37, BOX, BOX)
    np.testing.assert_array_equal(got[:, 0, 0], info["expected"][rows])
    np.testing.assert_array_equal(got, stack.images[rows])
    in_memory = LazyImages.from_array(np.arange(5 * 16, dtype=np.float32).reshape(5, 4, 4))
    assert in_memory.file_subset([1, 3]) is None
    np.testing.assert_array_equal(np.asarray(pickle.loads(pickle.dumps(PickRows(in_memory, [3, 1])))),
                                  in_memory[[3, 1]])
