"""Ordering of class averages (SPHIRE ``sp_chains --align``, spec isac2 §8.2), seeded, any number.

Every pair of averages is aligned (rotation, mirror, small shift); the distance
is ``max(0, 1 - CCC)`` inside a circular mask. The order is a circular
travelling-salesman tour found by simulated annealing from one seed, started at
the best greedy chain's first average; each average is rotated/mirrored into the
frame of its predecessor, cumulatively (shifts dropped, as in SPHIRE).
"""

from __future__ import annotations

import numpy as np

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


def pairwise_alignment(averages, p, executor=None):
    """Align every average to every other one.

    Returns
    -------
    ccc : ndarray, (C, C)
        ``ccc[i, j]`` = correlation of average j with average i transformed by ``params[i, j]``.
    params : ndarray, (C, C, 4)
        Parameters taking average i onto average j.
    """
    averages = np.asarray(averages, np.float32)
    c, t, _ = averages.shape
    radius = t // 2 - 2
    mask = _ops.circle(t, radius)
    from isavar.isac.generation import normalise_references
    from isavar.core.polar import polar_grid

    grid = polar_grid(1, min(radius, t // 2 - 2 - (p.xr + 1) - 1), 1)
    norm = normalise_references(averages, mask)
    _, cand = _ops.align_multi(norm, norm, grid, p, np.zeros((c, 4)), xr=p.xr + 1, yr=p.yr_eff + 1,
                               normalize=False)
    ccc = np.zeros((c, c))
    for i in range(c):
        moved = _ops.transform(np.repeat(averages[i:i + 1], c, 0), cand[i])
        ccc[i] = _ccc(moved, averages, mask)
    np.fill_diagonal(ccc, 1.0)
    return ccc, cand


def _tour_length(tour, dist):
    return float(dist[tour, np.roll(tour, -1)].sum())


def anneal_tour(dist, rng, *, t0=0.2, cooling=0.9, n_temps=100):
    """Circular tour through all items, by simulated annealing (segment reversal / transposition)."""
    n = len(dist)
    tour = np.arange(n)
    if n <= 3:
        return tour
    cur = _tour_length(tour, dist)
    temp = t0
    for _ in range(n_temps):
        accepted = 0
        for _ in range(100 * n):
            i, j = np.sort(rng.choice(n, 2, replace=False))
            if j - i < 1:
                continue
            if rng.random() < 0.5:
                new = tour.copy()
                new[i:j + 1] = new[i:j + 1][::-1]
            else:
                seg = tour[i:j + 1]
                rest = np.concatenate([tour[:i], tour[j + 1:]])
                k = rng.integers(0, len(rest) + 1)
                new = np.concatenate([rest[:k], seg, rest[k:]])
            length = _tour_length(new, dist)
            if length < cur or rng.random() < np.exp(-(length - cur) / temp):
                tour, cur = new, length
                accepted += 1
                if accepted >= 10 * n:
                    break
        if accepted == 0:
            break
        temp *= cooling
    return tour


def greedy_start(ccc) -> int:
    """Start of the best greedy chain (largest summed CCC along the chain)."""
    n = len(ccc)
    best, best_score = 0, -np.inf
    for start in range(n):
        chain, used, score = [start], {start}, 0.0
        while len(chain) < n:
            row = ccc[chain[-1]].copy()
            row[list(used)] = -np.inf
            nxt = int(np.argmax(row))
            score += ccc[chain[-1], nxt]
            chain.append(nxt)
            used.add(nxt)
        if score > best_score:
            best, best_score = start, score
    return best


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
    ccc, cand = pairwise_alignment(averages, p, executor)
    dist = np.maximum(0.0, 1.0 - 0.5 * (ccc + ccc.T))
    rng = task_rngs(p.rand_seed, 1, key=_ORDER_KEY)[0]
    tour = anneal_tour(dist, rng)
    init = greedy_start(ccc)
    pos = int(np.flatnonzero(tour == init)[0])
    order = np.roll(tour, -pos)
    params = np.zeros((c, 4))
    cum = np.zeros((1, 4))
    for k in range(1, c):
        prev, cur = order[k - 1], order[k]
        step = cand[cur, prev][None]                      # cur -> prev
        cum = _ops.compose(step, cum)                     # cur -> first
        cum[:, 1:3] = 0.0
        params[cur] = cum[0]
    return order.astype(np.int64), params


def apply_order(averages, order, params) -> np.ndarray:
    """The ordered averages (rotation/mirror applied)."""
    moved = _ops.transform(np.asarray(averages, np.float32), params)
    return moved[np.asarray(order)]
