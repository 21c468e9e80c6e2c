"""The EQK data layout at scale: per-image top candidates, class sums in blocks, rows read from a mapped stack."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from isavar.isac import _ops
from isavar.isac import generation as gen
from isavar.isac.params import Isac2Params
from isavar.isac.run import make_grid
from isavar.isac.working import MappedStack, SubsetImages
from isavar.parallel.serial import SerialExecutor

from isac_data import count_coarse_pairs


@given(st.lists(st.integers(0, 9), max_size=200), st.integers(10, 14))
@settings(max_examples=50, deadline=None)
def test_members_by_class_is_the_per_class_index_list(labels, n_classes):
    labels = np.array(labels, np.int64)
    got = gen.members_by_class(labels, n_classes)
    assert len(got) == n_classes
    for k in range(n_classes):
        np.testing.assert_array_equal(got[k], np.flatnonzero(labels == k))


def _stack(n=700, box=40, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, box, box)).astype(np.float32)


def test_coarse_fallback_scores_only_the_images_left_against_the_open_classes(monkeypatch):
    """The assignment's fallback gives the coarse scores of the step over every reference (to rounding) and
    scores only the ``left x classes`` pairs it is asked for."""
    p = Isac2Params(radius=15, target_radius=14, target_nx=40).validate()
    grid = make_grid(p)
    images = SubsetImages(_stack(), None, p.target_radius)
    refs = _stack(30, seed=1)
    prep = _ops.truncate(_ops.prepare(gen.normalise_references(refs, _ops.circle(40, 14)), grid),
                         gen.COARSE_MAX_FREQ)
    params = np.zeros((len(images), 4))
    params[:, 1:3] = np.random.default_rng(2).normal(size=(len(images), 2))
    full = np.concatenate([_ops.coarse_scores(images.take(np.arange(s, e)), prep, params[s:e],
                                              gen.COARSE_MAX_FREQ)
                           for s, e in gen.chunk_ranges(len(images), gen.EQK_CHUNK)])
    left = np.array([3, 200, 511, 512, 650])
    classes = np.array([0, 7, 29])
    pairs, real = count_coarse_pairs(monkeypatch)
    got = gen._coarse_fallback(images, prep, params, left, classes)
    assert sum(pairs) == left.size * classes.size
    np.testing.assert_allclose(got, full[np.ix_(left, classes)], rtol=1e-5, atol=1e-5)


def test_class_sums_in_blocks_equal_one_block_and_the_plain_sums(monkeypatch, tmp_path):
    """Blocks of classes (bounded accumulator) give the bits of one block; both match float64 sums."""
    stack = _stack(600, 24)
    np.save(tmp_path / "w.npy", stack)
    images = SubsetImages(MappedStack(tmp_path / "w.npy"))
    rng = np.random.default_rng(3)
    assignment = rng.integers(0, 9, len(stack))
    chosen = np.column_stack([rng.uniform(0, 360, 600), rng.normal(size=(600, 2)), rng.integers(0, 2, 600)])
    one = gen.class_sums(images, chosen, assignment, 9, SerialExecutor())
    monkeypatch.setattr(gen, "SUM_BLOCK_BYTES", 24 * 24 * 24 * 2)             # two classes per block
    blocks = gen.class_sums(images, chosen, assignment, 9, SerialExecutor())
    np.testing.assert_array_equal(one, blocks)
    moved = _ops.transform(stack, chosen).astype(np.float64)
    plain = np.stack([moved[assignment == k].sum(0) for k in range(9)])
    np.testing.assert_allclose(one, plain, rtol=1e-9, atol=1e-9)


def test_candidate_eqk_iteration_is_the_same_from_a_mapped_stack_and_from_memory(tmp_path, planted):
    """Tasks that read their rows from the file give the bits of tasks that carry the pixels."""
    import dataclasses

    from isac_data import small_params

    imgs, _, _ = planted
    p = dataclasses.replace(small_params(), img_per_grp=10, minimum_grp_size=4)
    assert len(imgs) // p.img_per_grp > 2 * p.eqk_candidates                 # the candidate search runs
    import pandas as pd

    from isavar.isac.preprocess import correct_and_shrink, finish_working_images

    shrunk, _ = correct_and_shrink(imgs, pd.DataFrame(index=range(len(imgs))), p, None)
    working = finish_working_images(shrunk, np.zeros((len(imgs), 2)), None, p)
    np.save(tmp_path / "w.npy", working)
    subset = np.arange(3, len(imgs))
    grid = make_grid(p)
    outs = []
    for source in (working, MappedStack(tmp_path / "w.npy")):
        images = SubsetImages(source, subset, p.target_radius)
        state = gen.start_generation(images, p, main=1, gen=1)
        outs.append(gen.eqk_iteration(images, state.refs, state.params, p.FL, p, grid, SerialExecutor(),
                                      np.random.default_rng(4)))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


def test_a_mapped_stack_is_mapped_once_per_process_while_its_file_is_unchanged(tmp_path):
    """Tasks arrive with a fresh MappedStack (its path); they share one mapping of the file until it is
    replaced."""
    import pickle

    import isavar.isac.working as working

    path = tmp_path / "w.npy"
    np.save(path, np.arange(2 * 9, dtype=np.float32).reshape(2, 3, 3))
    first = pickle.loads(pickle.dumps(MappedStack(path)))
    second = pickle.loads(pickle.dumps(MappedStack(path)))
    assert first._map() is second._map()
    np.testing.assert_array_equal(second[1], np.arange(9, 18, dtype=np.float32).reshape(3, 3))
    tmp = tmp_path / "new.npy"
    np.save(tmp, np.full((2, 3, 3), 7.0, np.float32))
    tmp.replace(path)                                  # a new file under the same name: mapped again
    third = pickle.loads(pickle.dumps(MappedStack(path)))
    assert third._map() is not first._map()
    np.testing.assert_array_equal(third[0], np.full((3, 3), 7.0, np.float32))
    assert len(working._MAPPED) <= working.MAPPED_FILES
