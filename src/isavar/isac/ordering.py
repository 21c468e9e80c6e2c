"""Ordering of class averages (SPHIRE ``sp_chains --align``, spec isac2 §8.2), seeded, any number.

Every pair of averages is aligned (rotation, mirror, small shift); the distance
is ``max(0, 1 - CCC)`` inside a circular mask. The order is a circular
travelling-salesman tour found by simulated annealing from one seed, started at
the best greedy chain's first average; each average is rotated/mirrored into the
frame of its predecessor, cumulatively (shifts dropped, as in SPHIRE).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from isavar.isac import _ops
from isavar.parallel.partition import task_rngs

_ORDER_KEY = 77


def _ccc(a, b, mask):
    inside = mask > 0.5
    x = a[..., inside].astype(np.float64)
    y = b[..., inside].astype(np.float64)
    x = x - x.mean(-1, keepdims=True)
    y = y - y.mean(-1, keepdims=True)
    den = np.sqrt((x * x).sum(-1) * (y * y).sum(-1))
    return np.where(den > 0, (x * y).sum(-1) / np.where(den > 0, den, 1.0), 0.0)


#: Averages per task of the pairwise alignment (fixed: the results never depend on the executor).
PAIR_ROWS = 16


def _pair_setup(averages, p):
    """Mask, polar grid, ring-normalised copies of the averages and those prepared as references."""
    from isavar.core.polar import polar_grid
    from isavar.isac.generation import normalise_references

    t = averages.shape[-1]
    radius = t // 2 - 2
    mask = _ops.circle(t, radius)
    grid = polar_grid(1, min(radius, t // 2 - 2 - (p.xr + 1) - 1), 1)
    norm = normalise_references(averages, mask)
    return mask, grid, norm, _ops.prepare(norm, grid)


def _align_rows(norm, refs, grid, p):
    """Parameters taking each of ``norm`` (m, T, T) onto each prepared reference: (m, k, 4)."""
    _, cand = _ops.align_multi(norm, refs, grid, p, np.zeros((len(norm), 4)), xr=p.xr + 1, yr=p.yr_eff + 1,
                               normalize=False)
    return cand


def _ccc_rows(shared, rows):
    """CCC of every average with averages ``rows`` aligned onto it, (len(rows), C) (an executor task)."""
    averages, norm, prep, grid, mask, p = shared
    c = len(averages)
    cand = _align_rows(norm[rows], prep, grid, p)                         # (m, C, 4)
    out = np.empty((len(rows), c))
    for r, i in enumerate(rows):
        moved = _ops.transform(np.repeat(averages[i:i + 1], c, 0), cand[r])
        out[r] = _ccc(moved, averages, mask)
    return out


def pairwise_ccc(averages, p, executor=None, *, setup=None):
    """Align every average to every other one; the correlation after alignment.

    Parameters
    ----------
    averages : ndarray, (C, T, T)
    p : Isac2Params
        ``xr``/``yr``: the translational search reaches one pixel further.
    executor : Executor, optional
        Spreads blocks of :data:`PAIR_ROWS` averages (same result on any executor).
    setup : tuple, optional
        :func:`_pair_setup` of ``averages`` when the caller already has it.

    Returns
    -------
    ndarray, (C, C)
        ``ccc[i, j]`` = CCC inside a circular mask of average j with average i aligned onto it (rotation,
        mirror, shift); 1 on the diagonal. Memory O(C²) for this matrix only, not for the parameters.
    """
    from isavar.parallel.serial import SerialExecutor

    executor = executor or SerialExecutor()
    averages = np.asarray(averages, np.float32)
    c = len(averages)
    mask, grid, norm, prep = setup if setup is not None else _pair_setup(averages, p)
    blocks = [np.arange(s, min(c, s + PAIR_ROWS)) for s in range(0, c, PAIR_ROWS)]
    ccc = np.concatenate(executor.map(_ccc_rows, blocks, shared=(averages, norm, prep, grid, mask, p)), axis=0)
    np.fill_diagonal(ccc, 1.0)
    return ccc


def _tour_length(tour, dist) -> float:
    """Length of the circular tour ``tour`` under the distance matrix ``dist``."""
    return float(dist[tour, np.roll(tour, -1)].sum())


@njit(cache=True)
def _anneal_at(dist, tour, cur, temp, draws, max_accepted):  # pragma: no cover - compiled
    """Moves of one temperature on ``tour`` (changed in place); returns ``(accepted, length)``.

    Each move takes one row of ``draws`` (uniform in [0, 1)): two distinct positions ``i < j``, the kind of
    move (reverse ``tour[i..j]``, or move that segment to another place of the tour), the new place, and the
    Metropolis test. A move's change of length is computed from the four to six edges it replaces, O(1);
    only accepted moves rewrite the tour.
    """
    n = tour.shape[0]
    accepted = 0
    buf = np.empty(n, np.int64)
    for t in range(draws.shape[0]):
        i = int(draws[t, 0] * n)
        j = int(draws[t, 1] * (n - 1))
        if j >= i:
            j += 1
        if i > j:
            i, j = j, i
        seg = j - i + 1
        if seg >= n - 1:                                   # the whole tour, or all but one item: same cycle
            continue
        a, ti, tj, b = tour[(i - 1) % n], tour[i], tour[j], tour[(j + 1) % n]
        reverse = draws[t, 2] < 0.5
        if reverse:
            delta = dist[a, tj] + dist[ti, b] - dist[a, ti] - dist[tj, b]
        else:
            # the tour without the segment, as a sequence starting after it: b ... a (n - seg items); the
            # segment goes between items k - 1 and k of that sequence (k = 0 or n - seg: between a and b)
            rest = n - seg
            k = int(draws[t, 3] * (rest + 1))
            if k == 0 or k == rest:
                continue                                   # back where it was
            p = tour[(j + k) % n]
            q = tour[(j + k + 1) % n]
            delta = (dist[a, b] - dist[a, ti] - dist[tj, b]) + (dist[p, ti] + dist[tj, q] - dist[p, q])
        if delta < 0 or draws[t, 4] < np.exp(-delta / temp):
            if reverse:
                for u in range((j - i + 1) // 2):
                    tour[i + u], tour[j - u] = tour[j - u], tour[i + u]
            else:
                w = 0
                for u in range(1, k + 1):                  # the rest up to p, then the segment, then q ... a
                    buf[w] = tour[(j + u) % n]
                    w += 1
                for u in range(i, j + 1):
                    buf[w] = tour[u]
                    w += 1
                for u in range(k + 1, rest + 1):
                    buf[w] = tour[(j + u) % n]
                    w += 1
                tour[:] = buf
            cur += delta
            accepted += 1
            if accepted >= max_accepted:
                break
    return accepted, cur


def anneal_tour(dist, rng, *, t0=0.2, cooling=0.9, n_temps=100):
    """Circular tour through all items, by simulated annealing (segment reversal / transposition).

    Parameters
    ----------
    dist : ndarray, (n, n)
        Symmetric distances.
    rng : numpy.random.Generator
        The only source of randomness (five uniforms per move).
    t0, cooling, n_temps : float, float, int
        Start temperature, its factor per step, and the number of steps; at each temperature at most
        ``100 n`` moves are tried and it ends after ``10 n`` accepted ones; no accepted move ends the run.

    Returns
    -------
    ndarray of int, (n,)
        The tour (a permutation of ``0 .. n-1``). Cost O(n) per tried move in the worst case, O(1) for a
        rejected one.
    """
    n = len(dist)
    tour = np.arange(n, dtype=np.int64)
    if n <= 3:
        return tour
    dist = np.ascontiguousarray(dist, dtype=np.float64)
    temp = t0
    for _ in range(n_temps):
        accepted, _length = _anneal_at(dist, tour, _tour_length(tour, dist), temp, rng.random((100 * n, 5)),
                                       10 * n)
        if accepted == 0:
            break
        temp *= cooling
    return tour


@njit(cache=True)
def _greedy_chain_score(ccc, start, used):  # pragma: no cover - compiled
    """Summed CCC along the greedy chain from ``start`` (always to the most similar unused item)."""
    n = ccc.shape[0]
    used[:] = False
    used[start] = True
    last, score = start, 0.0
    for _ in range(n - 1):
        nxt, best = -1, -np.inf
        for m in range(n):
            if not used[m] and ccc[last, m] > best:
                nxt, best = m, ccc[last, m]
        score += best
        used[nxt] = True
        last = nxt
    return score


def greedy_start(ccc) -> int:
    """Start of the best greedy chain (largest summed CCC along the chain; ties: the first start)."""
    ccc = np.ascontiguousarray(ccc, dtype=np.float64)
    n = len(ccc)
    used = np.zeros(n, np.bool_)
    scores = np.array([_greedy_chain_score(ccc, start, used) for start in range(n)])
    return int(np.argmax(scores))


def order_averages(averages, p, executor=None):
    """Order class averages and bring them into a common frame.

    Parameters
    ----------
    averages : ndarray, (C, T, T)
    p : Isac2Params
        ``xr``/``yr`` (search range + 1), ``rand_seed``.

    Returns
    -------
    order : ndarray of int, (C,)
        Class index at each position.
    params : ndarray, (C, 4)
        Per class index: rotation and mirror (shifts 0) into the frame of the first average.
    """
    averages = np.asarray(averages, np.float32)
    c = len(averages)
    if c == 0:
        return np.zeros(0, np.int64), np.zeros((0, 4))
    if c == 1:
        return np.zeros(1, np.int64), np.zeros((1, 4))
    setup = _pair_setup(averages, p)
    ccc = pairwise_ccc(averages, p, executor, setup=setup)
    dist = np.add(ccc, ccc.T)                                  # max(0, 1 - (ccc + ccc.T) / 2), one C x C copy
    dist *= -0.5
    dist += 1.0
    np.maximum(dist, 0.0, out=dist)
    rng = task_rngs(p.rand_seed, 1, key=_ORDER_KEY)[0]
    tour = anneal_tour(dist, rng)
    init = greedy_start(ccc)
    del dist, ccc
    pos = int(np.flatnonzero(tour == init)[0])
    order = np.roll(tour, -pos)
    # each average aligned onto its predecessor again (C alignments instead of keeping C² parameters)
    _mask, grid, norm, prep = setup
    params = np.zeros((c, 4))
    cum = np.zeros((1, 4))
    for k in range(1, c):
        prev, cur = order[k - 1], order[k]
        step = _align_rows(norm[cur:cur + 1], _ops.subset(prep, [prev]), grid, p)[0]       # cur -> prev
        cum = _ops.compose(step, cum)                     # cur -> first
        cum[:, 1:3] = 0.0
        params[cur] = cum[0]
    return order.astype(np.int64), params


def apply_order(averages, order, params) -> np.ndarray:
    """The ordered averages (rotation/mirror applied)."""
    moved = _ops.transform(np.asarray(averages, np.float32), params)
    return moved[np.asarray(order)]
