"""The EQK candidate search restricted to the references near each image's previous class (``eqk_neighbours``)."""

import dataclasses

import numpy as np
import pytest

from isavar.isac import _ops
from isavar.isac import generation as gen
from isavar.isac.run import make_grid
from isavar.parallel.serial import SerialExecutor

from isac_data import count_coarse_pairs, small_params

N_CLASSES = 10
PER_CLASS = 30


def blob_prototypes(n_proto: int, box: int, seed: int) -> np.ndarray:
    """``n_proto`` distinct images, each a sum of 4 Gaussian blobs at random places within radius 9."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:box, :box] - box // 2
    out = np.zeros((n_proto, box, box), np.float32)
    for k in range(n_proto):
        for _ in range(4):
            r, phi = 9.0 * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
            s = rng.uniform(1.5, 3.0)
            out[k] += np.exp(-((x - r * np.cos(phi)) ** 2 + (y - r * np.sin(phi)) ** 2) / (2 * s * s))
    return out


@pytest.fixture(scope="module")
def ten_classes():
    """300 working images (28 px) of 10 planted classes: rotated, shifted, mirrored noisy copies."""
    p = dataclasses.replace(small_params(img_per_grp=PER_CLASS, minimum_grp_size=10), eqk_neighbours=2)
    rng = np.random.default_rng(4)
    protos = blob_prototypes(N_CLASSES, p.box, seed=5)
    par = np.column_stack([rng.uniform(-180, 180, N_CLASSES * PER_CLASS),
                           rng.normal(0, 0.7, (N_CLASSES * PER_CLASS, 2)),
                           rng.integers(0, 2, N_CLASSES * PER_CLASS)])
    truth = np.repeat(np.arange(N_CLASSES), PER_CLASS)
    imgs = _ops.transform(protos[truth], par)
    imgs = imgs + rng.normal(0, 0.7 * imgs.std(), imgs.shape).astype(np.float32)    # SNR 2
    mask = _ops.circle(p.box, p.target_radius)
    return gen.normalise_for_alignment(imgs.astype(np.float32), mask), truth, protos, p


def test_reference_neighbours_finds_the_rotated_mirrored_copy():
    """Five references and a rotated, mirrored, slightly noisy copy of each: every reference's nearest
    other reference is its copy."""
    p = small_params()
    grid = make_grid(p)
    protos = blob_prototypes(5, p.box, seed=11)
    turn = np.array([[70.0, 0.0, 0.0, 1]] * 5)
    copies = _ops.transform(protos, turn)
    copies = copies + np.random.default_rng(1).normal(0, 0.05 * copies.std(), copies.shape).astype(np.float32)
    refs = gen.normalise_references(np.concatenate([protos, copies]), _ops.circle(p.box, p.target_radius))
    coarse = _ops.truncate(_ops.prepare(refs, grid), gen.COARSE_MAX_FREQ)
    table = gen.reference_neighbours(refs, coarse, 3, SerialExecutor())
    assert table.shape == (10, 4)
    np.testing.assert_array_equal(table[:, 0], np.arange(10))
    np.testing.assert_array_equal(table[:, 1], (np.arange(10) + 5) % 10)
    assert all(len(set(row)) == 4 for row in table.tolist())


def _class_averages(images, truth, p):
    """References from two flat EQK iterations with the planted classes held fixed."""
    grid = make_grid(p)
    refs, params = images[::PER_CLASS].copy(), np.zeros((len(images), 4))
    flat = dataclasses.replace(p, eqk_search="flat")
    for it in range(2):
        refs, params, _ = gen.eqk_iteration(images, refs, params, p.FH, flat, grid, SerialExecutor(),
                                            np.random.default_rng(it), assign=lambda scores: truth)
    return refs, params


def test_neighbour_candidates_lie_near_the_previous_class(ten_classes, monkeypatch):
    """Each image's candidates come from its previous class's neighbourhood, and only ``L + 1`` references
    per image (plus the references among themselves) get a coarse score."""
    images, truth, _protos, p = ten_classes
    grid = make_grid(p)
    refs, params = _class_averages(images, truth, p)
    nrefs = gen.normalise_references(refs, _ops.circle(p.box, p.target_radius))
    coarse = _ops.truncate(_ops.prepare(nrefs, grid), gen.COARSE_MAX_FREQ)
    previous = np.roll(truth, 7)                                 # some images now "come from" another class
    pairs, real = count_coarse_pairs(monkeypatch)
    table = gen.reference_neighbours(nrefs, coarse, p.eqk_neighbours, SerialExecutor())
    order = gen._neighbour_candidates(gen.as_subset(images), coarse, params, previous, table, 2, SerialExecutor())
    assert sum(pairs) == N_CLASSES * N_CLASSES + len(images) * (p.eqk_neighbours + 1)
    assert order.shape == (len(images), 2)
    for i in range(len(images)):
        assert set(order[i].tolist()) <= set(table[previous[i]].tolist())
    # the best candidate is the best of the neighbourhood under the scores over every reference
    full = real(images, coarse, params, gen.COARSE_MAX_FREQ)
    masked = np.full_like(full, -np.inf)
    for i in range(len(images)):
        masked[i, table[previous[i]]] = full[i, table[previous[i]]]
    assert np.mean(order[:, 0] == np.argmax(masked, axis=1)) >= 0.99


def test_eqk_iteration_with_neighbours_keeps_the_planted_classes(ten_classes):
    """From the planted classes, the neighbour-restricted search assigns like the search over every reference,
    and a pool gives the serial bits."""
    from isavar.parallel.pool import PoolExecutor

    images, truth, _protos, p = ten_classes
    grid = make_grid(p)
    # every image of a group against all the group's references: with only 2 candidates per image the equal-size
    # assignment often needs a third class, which --eqk_pairs own leaves to the coarse score (0.90 instead of
    # 0.96 here; docs/deviations.md)
    q = dataclasses.replace(p, eqk_candidates=2, eqk_pairs="union")
    # the candidate search runs (K > 2 C) and is restricted to the neighbours (K > 4 L)
    assert N_CLASSES > 2 * q.eqk_candidates and N_CLASSES > gen.NEIGHBOUR_FACTOR * q.eqk_neighbours
    refs, params = _class_averages(images, truth, q)
    restricted = gen.eqk_iteration(images, refs, params, q.FH, q, grid, SerialExecutor(),
                                   np.random.default_rng(9), previous=truth)
    everywhere = gen.eqk_iteration(images, refs, params, q.FH, dataclasses.replace(q, eqk_neighbours=0), grid,
                                   SerialExecutor(), np.random.default_rng(9), previous=truth)
    flat = gen.eqk_iteration(images, refs, params, q.FH, dataclasses.replace(q, eqk_search="flat"), grid,
                             SerialExecutor(), np.random.default_rng(9), previous=truth)
    assert np.mean(restricted[2] == truth) >= 0.93                # 0.96 (NumPy 2.4.6)
    # as good as the candidate search over every reference (0.923-0.957 depending on the last bits of the
    # data, i.e. on the NumPy release), and assigning like SPHIRE's exact search over every reference
    assert np.mean(restricted[2] == truth) >= np.mean(everywhere[2] == truth) - 0.01
    assert np.mean(restricted[2] == flat[2]) >= 0.95              # 0.957
    assert np.bincount(restricted[2], minlength=N_CLASSES).tolist() == [PER_CLASS] * N_CLASSES
    pool = PoolExecutor(2)
    try:
        again = gen.eqk_iteration(images, refs, params, q.FH, q, grid, pool, np.random.default_rng(9),
                                  previous=truth)
    finally:
        pool.close()
    for a, b in zip(again, restricted):
        np.testing.assert_array_equal(a, b)


def test_engine_state_keeps_the_assignment():
    st = gen.EngineState(params=np.zeros((3, 4)), refs=np.zeros((1, 4, 4), np.float32),
                         assignment=np.array([0, 0, 0]))
    back = gen.EngineState.from_arrays(st.to_arrays())
    np.testing.assert_array_equal(back.assignment, [0, 0, 0])
    old = {k: v for k, v in st.to_arrays().items() if k != "assignment"}      # a checkpoint of an older version
    assert gen.EngineState.from_arrays(old).assignment is None


def test_generation_with_neighbours_resumes_identically(ten_classes, monkeypatch):
    """A generation whose EQK iterations use the neighbour-restricted search, checkpointed after its first SAC
    round (the state through arrays, as after a kill) and continued, equals the uninterrupted one; the
    restriction starts with the generation's second EQK iteration and goes on across rounds and the resume."""
    images, _truth, _protos, p = ten_classes
    q = dataclasses.replace(p, eqk_candidates=2, init_iter=2, maxit=6, stab_ali=2)
    grid = make_grid(q)
    calls = []
    real = gen._neighbour_candidates
    monkeypatch.setattr(gen, "_neighbour_candidates", lambda *a, **k: calls.append(1) or real(*a, **k))
    saved = []
    full = gen.run_generation(images, q, grid, SerialExecutor(), main=1, gen=1,
                              on_round=lambda st: saved.append(st.to_arrays()))
    assert full.rounds == 2 and saved[0]["assignment"].shape == (len(images),)
    first, later = len(gen.round_ramp(q, 0)), len(gen.round_ramp(q, 1))
    assert len(calls) == first - 1 + later and later >= 2      # every EQK iteration but the generation's first
    calls.clear()
    resumed = gen.run_generation(images, q, grid, SerialExecutor(), main=1, gen=1,
                                 state=gen.EngineState.from_arrays(saved[0]))
    assert len(calls) == later                       # the checkpointed assignment restricts the first one too
    np.testing.assert_array_equal(resumed.params, full.params)
    np.testing.assert_array_equal(resumed.averages, full.averages)
    assert [m.tolist() for m in resumed.members] == [m.tolist() for m in full.members]
