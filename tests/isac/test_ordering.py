"""The ordering's tour search: O(1) move costs that track the true length, and a planted optimum found."""

import numpy as np
from hypothesis import given, settings, strategies as st

from isavar.isac.ordering import _anneal_at, _tour_length, anneal_tour, greedy_start


def _circle_distances(n, seed):
    """Chord distances of ``n`` points on a unit circle, in shuffled order; the optimum is the circle."""
    angle = np.random.default_rng(seed).permutation(n) * 2 * np.pi / n
    xy = np.column_stack([np.cos(angle), np.sin(angle)])
    return np.linalg.norm(xy[:, None] - xy[None], axis=-1), n * 2 * np.sin(np.pi / n)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(4, 30), seed=st.integers(0, 10_000), temp=st.floats(1e-3, 10.0))
def test_move_costs_track_the_tour_length(n, seed, temp):
    rng = np.random.default_rng(seed)
    d = rng.random((n, n))
    d = d + d.T
    np.fill_diagonal(d, 0.0)
    tour = rng.permutation(n).astype(np.int64)
    before = _tour_length(tour, d)
    _accepted, length = _anneal_at(d, tour, before, temp, rng.random((50 * n, 5)), 10 * n)
    assert sorted(tour.tolist()) == list(range(n))                      # still a tour
    np.testing.assert_allclose(length, _tour_length(tour, d), rtol=1e-9, atol=1e-9)


def test_annealing_finds_the_planted_circle():
    for n in (12, 60, 150):
        d, optimum = _circle_distances(n, n)
        tour = anneal_tour(d, np.random.default_rng(1))
        assert sorted(tour.tolist()) == list(range(n))
        assert _tour_length(tour, d) <= 1.03 * optimum, n
        again = anneal_tour(d, np.random.default_rng(1))
        assert np.array_equal(tour, again)                               # one seed, one tour


def test_ordering_is_the_same_on_any_executor():
    """The pairwise alignments run in fixed blocks: serial and a pool of 2 give the same order and frames."""
    from isac_data import prototypes, small_params

    from isavar.isac import _ops
    from isavar.isac.ordering import PAIR_ROWS, order_averages
    from isavar.parallel.pool import PoolExecutor

    rng = np.random.default_rng(4)
    n = PAIR_ROWS + 5                                                    # two blocks
    par = np.column_stack([rng.uniform(-180, 180, n), np.zeros(n), np.zeros(n), rng.integers(0, 2, n)])
    avgs = _ops.transform(prototypes(28)[rng.integers(0, 4, n)], par)
    avgs += rng.normal(0, 0.3, avgs.shape).astype(np.float32)
    serial = order_averages(avgs, small_params())
    pool = PoolExecutor(2)
    try:
        pooled = order_averages(avgs, small_params(), pool)
    finally:
        pool.close()
    assert np.array_equal(serial[0], pooled[0]) and np.array_equal(serial[1], pooled[1])


def test_greedy_start_is_the_best_greedy_chain():
    rng = np.random.default_rng(5)
    ccc = rng.random((9, 9))

    def chain_score(start):
        chain, score = [start], 0.0
        while len(chain) < 9:
            row = ccc[chain[-1]].copy()
            row[chain] = -np.inf
            score += row.max()
            chain.append(int(np.argmax(row)))
        return score

    assert greedy_start(ccc) == int(np.argmax([chain_score(s) for s in range(9)]))
