"""One ISAC generation: EQK-means rounds alternating with within-group stability stages.

Spec isac2 §6. The generation works on a subset of the working stack, starts
from ``K = n // img_per_grp`` single images as references, and ends after at
most ``init_iter`` SAC rounds (EQK iterations over the filter ramp, 6 in a generation's first round and 3
in the later ones by default, then one within-group stage) or when the stable memberships stop changing.

Every random choice is drawn from generators spawned from one seed and a key
naming the (main iteration, generation, round, iteration, purpose), never from
the process that does the work (deviation from Q4).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np

from isavar.isac import _ops
from isavar.isac.kmeans import assign_groups, assign_groups_sparse
from isavar.isac.stability import class_stability_task, within_group_refinement
from isavar.isac.working import as_subset, normalise_for_alignment, resolve  # noqa: F401 (re-exported)
from isavar.parallel.partition import chunk_ranges, task_rngs

log = logging.getLogger(__name__)

#: Images per task of the multi-reference (EQK) alignment; fixed, so results never depend on workers.
EQK_CHUNK = 512
#: Highest ring frequency of the coarse scores that choose an image's candidate references.
COARSE_MAX_FREQ = 8
#: A group of images is aligned exactly to at most this many times ``eqk_candidates`` references (3 measured
#: 0.03-0.04 lower EQK purity than the flat search at 10,000 particles, 5 the same: bench/isac2.md).
UNION_FACTOR = 5
#: the neighbour-restricted coarse step (``eqk_neighbours``) needs more than this many times as many classes
NEIGHBOUR_FACTOR = 4

# purposes for random-stream keys
_INIT, _CENTRE, _WITHIN = 1, 2, 3


def stream_key(main: int, gen: int, rnd: int, it: int, purpose: int) -> int:
    """A unique non-negative integer naming one use of randomness."""
    return ((((purpose * 10_000 + main) * 10_000 + gen) * 1_000 + rnd) * 1_000 + it)


@dataclass
class EngineState:
    """Checkpointable state of a generation between SAC rounds.

    Attributes
    ----------
    params : ndarray, (n, 4)
        Current parameters of the subset's images.
    refs : ndarray, (K, T, T)
        References for the next EQK iteration.
    rounds_done : int
        Completed SAC rounds.
    prev_members : list of ndarray or None
        Stable members (local indices) at the previous stability check.
    prev_agreement : float
        Agreement at the previous check.
    members : list of ndarray or None
        Stable members (local indices, sorted) of the last checked round.
    pixel_errors, mirror_rates : ndarray, (K,)
        Of the last checked round.
    done : bool
        The generation has converged or reached ``init_iter`` rounds.
    assignment : ndarray of int, (n,) or None
        Class of every image in the last EQK iteration (None before the first).
    empty_checks : int
        Consecutive stability checks, up to the last, whose stable images all together were too few for one
        accepted class (``--empty_stop``).
    """

    params: np.ndarray
    refs: np.ndarray
    rounds_done: int = 0
    prev_members: list | None = None
    prev_agreement: float = 0.0
    members: list | None = None
    pixel_errors: np.ndarray | None = None
    mirror_rates: np.ndarray | None = None
    done: bool = False
    history: list = field(default_factory=list)
    assignment: np.ndarray | None = None
    empty_checks: int = 0

    def to_arrays(self) -> dict:
        """Flatten into a dict of arrays (for ``np.savez``)."""
        out = {"params": self.params, "refs": self.refs, "rounds_done": self.rounds_done,
               "prev_agreement": self.prev_agreement, "done": self.done, "empty_checks": self.empty_checks}
        for name in ("prev_members", "members"):
            lst = getattr(self, name)
            out[f"{name}_present"] = lst is not None
            if lst is not None:
                out[f"{name}_sizes"] = np.array([len(m) for m in lst], np.int64)
                out[f"{name}_flat"] = np.concatenate([np.asarray(m, np.int64) for m in lst]) if lst else np.zeros(0, np.int64)
        for name in ("pixel_errors", "mirror_rates", "assignment"):
            v = getattr(self, name)
            if v is not None:
                out[name] = v
        return out

    @classmethod
    def from_arrays(cls, d) -> "EngineState":
        """Inverse of :meth:`to_arrays`."""
        def lists(name):
            if not bool(d[f"{name}_present"]):
                return None
            sizes = d[f"{name}_sizes"]
            return np.split(d[f"{name}_flat"], np.cumsum(sizes)[:-1]) if len(sizes) else []
        return cls(params=np.array(d["params"]), refs=np.array(d["refs"]), rounds_done=int(d["rounds_done"]),
                   prev_members=lists("prev_members"), prev_agreement=float(d["prev_agreement"]),
                   members=lists("members"),
                   pixel_errors=np.array(d["pixel_errors"]) if "pixel_errors" in d else None,
                   mirror_rates=np.array(d["mirror_rates"]) if "mirror_rates" in d else None,
                   done=bool(d["done"]),
                   assignment=np.array(d["assignment"]) if "assignment" in d else None,
                   empty_checks=int(d["empty_checks"]) if "empty_checks" in d else 0)


@dataclass(frozen=True)
class GenerationResult:
    """Averages and memberships produced by one generation.

    Attributes
    ----------
    averages : ndarray, (K, T, T) float32
        Stable-member averages (tanh-filtered at FH).
    members : list of ndarray
        Stable members of each class (local indices into the subset, sorted).
    params : ndarray, (n, 4)
        Final parameters of every image of the subset.
    pixel_errors : ndarray, (K,)
        RMS pixel error of each class (before pruning; SPHIRE's reported value).
    mirror_rates : ndarray, (K,)
    rounds : int
        SAC rounds run.
    """

    averages: np.ndarray
    members: list
    params: np.ndarray
    pixel_errors: np.ndarray
    mirror_rates: np.ndarray
    rounds: int


def normalise_references(refs, mask) -> np.ndarray:
    """Zero mean and unit standard deviation inside the mask (spec §5.2, references)."""
    inside = mask > 0.5
    vals = refs[:, inside].astype(np.float64)
    mean = vals.mean(axis=1)
    std = vals.std(axis=1, ddof=1)
    std = np.where(std > 0, std, 1.0)
    return ((refs - mean[:, None, None]) / std[:, None, None]).astype(np.float32)


# ------------------------------------------------------------------------------------- where results live
# Tasks name rows of the working stack (isavar.isac.working) and run on any process. Per-image results that
# only the assignment needs (scores) are gathered at the root; per-image parameters stay on the process that
# computed them until the assignment says which are kept; sums (class references) are reduced exactly.

_ONE = np.ones(1)


class _Tagged:
    """``fn`` as a :meth:`map_sum` task: sums nothing of use, keeps ``(task number, result)`` where it ran.

    Called as ``(item)`` or, with a shared context, ``(shared, item)``; ``fn`` gets the same arguments.
    """

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, *args):
        *shared, (number, task) = args
        return (_ONE,), (number, self.fn(*shared, task))


def run_here(executor, fn, tasks, *, shared=None, cost=None) -> dict:
    """Run ``tasks`` spread over the executor; ``{task number: result}`` of those this process ran.

    A serial or pool executor returns every result to this process; under MPI each rank keeps its own
    block and nothing per task is sent between ranks (:meth:`map_sum`, whose sum here is a task count).
    ``tasks`` may be a generator (a pool then takes them as it goes). With ``shared`` each task runs
    ``fn(shared, task)`` and ``shared`` (e.g. prepared references) reaches each pool worker once per call.
    ``cost``: the relative cost of each task (MPI ranks then take blocks of near-equal cost).
    """
    out: dict = {}
    executor.map_sum(_Tagged(fn), enumerate(tasks), on_result=lambda r: out.__setitem__(r[0], r[1]),
                     shared=shared, cost=cost)
    return out


def at_root(executor, local: dict) -> dict | None:
    """Every process's ``{key: value}`` merged at the root (None on the other processes)."""
    parts = executor.gather(local)
    if parts is None:
        return None
    merged: dict = {}
    for part in parts:
        merged.update(part)
    return merged


def assemble_rows(executor, pieces, n: int, width: int = 4) -> np.ndarray:
    """``(n, width)`` rows from ``[(rows, values), ...]`` spread over processes, on every process."""
    parts = executor.gather(list(pieces))
    full = None
    if parts is not None:
        full = np.full((n, width), np.nan)
        for part in parts:
            for rows, values in part:
                full[rows] = values
    return executor.bcast(full)


# ------------------------------------------------------------------------------------- EQK search

def _eqk_chunk(task):
    """:func:`_ops.align_multi` of ``(images, refs, params, p, grid[, pairs])``; ``pairs`` ``(n, K)`` bool: only
    those (image, reference) pairs (the others score -inf)."""
    images, refs, params, p, grid, *pairs = task
    return _ops.align_multi(resolve(images), refs, grid, p, params, shift_candidates=p.eqk_shift_candidates,
                            pairs=pairs[0] if pairs else None)


def _eqk_all_refs(refs, task):
    """:func:`_eqk_chunk` of a chunk of images against every reference ``refs`` (a shared context)."""
    images, params, p, grid = task
    return _eqk_chunk((images, refs, params, p, grid))


def _coarse_chunk(prep, task):
    """Top candidates of a chunk of images: ``(order (m, C) int32, best first; full scores or None)``.

    ``prep``: the references truncated to the coarse frequencies (shared by every task of the call)."""
    images, params, n_cand, keep_all = task
    scores = _ops.coarse_scores(resolve(images), prep, params, COARSE_MAX_FREQ)          # (m, K) float32
    order = np.argsort(-scores, axis=1, kind="stable")[:, :n_cand].astype(np.int32)
    return order, (scores if keep_all else None)


def _coarse_among(task):
    """The ``n_cand`` best references of each image among a subset: ``(m, n_cand)`` int32 class numbers, best first.

    ``task``: ``(images, params, refs (the coarse references' subset), numbers (their class numbers),
    n_cand)``."""
    images, params, refs, numbers, n_cand = task
    order, _ = _coarse_chunk(refs, (images, params, n_cand, False))
    return numbers[order].astype(np.int32)


def reference_neighbours(ref_images, coarse_prep, n_neighbours: int, executor) -> np.ndarray:
    """Every reference with its ``n_neighbours`` nearest references by their mutual coarse scores.

    Parameters
    ----------
    ref_images : ndarray, (K, T, T) float32
        The references as images (normalised as for the alignment).
    coarse_prep : PreparedReferences
        The same references prepared and truncated to the coarse frequencies.
    n_neighbours : int
        ``L``, less than ``K``.
    executor : Executor

    Returns
    -------
    ndarray of int64, (K, L + 1)
        Row ``k``: ``k`` itself, then the ``L`` references whose coarse score as an image against ``k``'s
        row is highest (the best rotation and mirror at the centre, as for the images), best first. The
        same on every process.
    """
    n_refs = len(ref_images)
    if not 0 < n_neighbours < n_refs:
        raise ValueError(f"reference_neighbours needs 0 < n_neighbours < K = {n_refs}, got {n_neighbours}")
    zero = np.zeros((n_refs, 4))
    ranges = chunk_ranges(n_refs, EQK_CHUNK)
    tasks = ((ref_images[s:e], zero[s:e], n_neighbours + 1, False) for s, e in ranges)
    found = at_root(executor, run_here(executor, _coarse_chunk, tasks, shared=coarse_prep))
    table = None
    if found is not None:
        order = np.concatenate([found[t][0] for t in range(len(ranges))], axis=0).astype(np.int64)
        table = np.empty((n_refs, n_neighbours + 1), np.int64)
        for k in range(n_refs):
            others = order[k][order[k] != k][:n_neighbours]
            table[k] = np.concatenate([[k], others])
    return executor.bcast(table)


def _neighbour_candidates(images, coarse_prep, params, previous, neighbours, n_cand, executor):
    """Candidates ``(n, C)`` of every image among the neighbours of its previous class.

    One task per chunk of a previous class's members, scored against that class's row of ``neighbours``
    (``(K, L + 1)``). Returns the candidates at the root, None on the other processes."""
    n = len(images)
    jobs = []
    for k, members in enumerate(members_by_class(previous, coarse_prep.n_refs)):
        for s, e in chunk_ranges(members.size, EQK_CHUNK):
            jobs.append((k, members[s:e]))
    tasks = ((images.for_task(idx), params[idx], _ops.subset(coarse_prep, neighbours[k]), neighbours[k],
              min(n_cand, neighbours.shape[1])) for k, idx in jobs)
    found = at_root(executor, run_here(executor, _coarse_among, tasks, cost=[idx.size for _k, idx in jobs]))
    if found is None:
        return None
    order = np.empty((n, min(n_cand, neighbours.shape[1])), np.int32)
    for t, (_k, idx) in enumerate(jobs):
        order[idx] = found[t]
    return order


def members_by_class(labels, n_classes: int) -> list:
    """``[np.flatnonzero(labels == k) for k in range(n_classes)]`` in O(n log n) instead of O(n K)."""
    labels = np.asarray(labels, np.int64)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(n_classes + 1))
    return [order[bounds[k]:bounds[k + 1]] for k in range(n_classes)]


def candidate_groups(order, n_classes: int):
    """Images grouped by their best candidate, each group with the references it is aligned to exactly.

    Parameters
    ----------
    order : ndarray of int, (n, C)
        Every image's candidate references, best first.
    n_classes : int

    Returns
    -------
    list of (members, union)
        Image positions (at most ``EQK_CHUNK``) and the sorted references they are aligned to: those most
        often among the members' candidates, the group's own first, at most ``UNION_FACTOR * C``.
    """
    n_cand = order.shape[1]
    groups = []
    for k, members in enumerate(members_by_class(order[:, 0], n_classes)):
        if members.size == 0:
            continue
        # the references most often among the members' candidates, at most UNION_FACTOR x C of them (the
        # group's own reference always first): bounds the exact work per image whatever K is
        refs_, counts = np.unique(order[members], return_counts=True)
        counts[refs_ == k] = members.size * n_cand + 1
        keep = np.argsort(-counts, kind="stable")[:UNION_FACTOR * n_cand]
        union = np.sort(refs_[keep]).astype(np.int64)
        for s, e in chunk_ranges(members.size, EQK_CHUNK):
            groups.append((members[s:e], union))
    return groups


def _coarse_fallback(images, coarse_prep, params, left, classes):
    """Coarse scores of images ``left`` against references ``classes``, ``(left.size, classes.size)`` float64.

    For the second phase of the equal-size assignment (images whose candidate classes all closed first):
    ``left.size x classes.size`` pairs, in fixed chunks of ``left`` (the same numbers whatever the executor;
    the phase compares these scores only with each other).
    """
    out = np.empty((left.size, classes.size), np.float64)
    sub = _ops.subset(coarse_prep, classes)
    for s, e in chunk_ranges(left.size, EQK_CHUNK):
        idx = left[s:e]
        out[s:e] = _ops.coarse_scores(images.take(idx), sub, params[idx], COARSE_MAX_FREQ)
    return out


def eqk_search_candidates(images, prep, params, p, grid, executor, *, keep_all=False, previous=None,
                          ref_images=None):
    """The EQK search against a few candidate references per image (linear cost in the number of images).

    1. Coarse scores of every image against every reference (:func:`isavar.core.align2d.coarse_scores`: low
       ring frequencies, current centre only; about 1/40 of the full search per pair); each task keeps the
       ``p.eqk_candidates`` (C) best references of its images only.
    2. At the root, images are grouped by their best candidate (:func:`candidate_groups`); each group is
       aligned exactly (the full search of :func:`_ops.align_multi`) against the references most often among
       its members' candidates (the group's own first, at most ``UNION_FACTOR * C``), so every image gets
       exact scores and parameters for its best candidate and, usually, for all of them.

    With ``K`` references the cost per image is ``K`` coarse pairs (about 1/100 of an exact one each) plus at
    most ``UNION_FACTOR * C`` exact ones, instead of ``K`` exact ones; the memory per image is ``C`` candidate
    numbers and at most ``UNION_FACTOR * C`` exact scores and parameters.

    With ``previous`` classes, ``ref_images`` and ``K > NEIGHBOUR_FACTOR * p.eqk_neighbours`` (``L``), step 1
    scores every image only against the ``L + 1`` references of :func:`reference_neighbours` of its previous
    class: ``K * K`` coarse pairs for the references' neighbours and ``N * (L + 1)`` for the images, so the
    cost per image no longer grows with ``K``.

    Parameters
    ----------
    images : SubsetImages or ndarray, (n, T, T)
    prep : PreparedReferences
    params : ndarray, (n, 4)
    p : Isac2Params
    grid : PolarGrid
    executor : Executor
    keep_all : bool
        Also return the full ``(n, K)`` coarse scores (diagnostics only; every image against every reference).
    previous : ndarray of int, (n,), optional
        Every image's class in the previous EQK iteration of the generation.
    ref_images : ndarray, (K, T, T), optional
        The references as images, normalised as for ``prep`` (needed with ``previous``).

    Returns
    -------
    groups : list of (members, union)
        The same on every process.
    local : dict
        ``{group number: (scores (m, u) float32, params (m, u, 4))}`` of the groups this process aligned.
    coarse : ndarray, (n, K) float32 or None
        At the root with ``keep_all``.
    """
    images = as_subset(images)
    n, n_classes = len(images), prep.n_refs
    coarse_prep = _ops.truncate(prep, COARSE_MAX_FREQ)
    n_cand = min(int(p.eqk_candidates), n_classes)
    n_nb = int(p.eqk_neighbours)
    groups, coarse = None, None
    if (previous is not None and ref_images is not None and not keep_all and n_nb > 0
            and n_classes > NEIGHBOUR_FACTOR * n_nb):
        neighbours = reference_neighbours(ref_images, coarse_prep, n_nb, executor)
        order = _neighbour_candidates(images, coarse_prep, params, previous, neighbours, n_cand, executor)
        if order is not None:
            groups = candidate_groups(order, n_classes)
    else:
        ranges = chunk_ranges(n, EQK_CHUNK)
        tasks = ((images.for_task(np.arange(s, e)), params[s:e], n_cand, keep_all) for s, e in ranges)
        found = at_root(executor, run_here(executor, _coarse_chunk, tasks, shared=coarse_prep))
        if found is not None:
            order = np.concatenate([found[t][0] for t in range(len(ranges))], axis=0)           # (n, C)
            if keep_all:
                coarse = np.concatenate([found[t][1] for t in range(len(ranges))], axis=0)
            del found
            groups = candidate_groups(order, n_classes)
    if groups is not None and p.eqk_pairs == "own":
        # each image against its own candidates only (those in its group's union)
        groups = [(idx, union, (order[idx][:, :, None] == union[None, None, :]).any(axis=1))
                  for idx, union in groups]
    groups = executor.bcast(groups)
    # lazy: image copies (or row lists) and reference subsets are made as the executor takes the tasks
    tasks = ((images.for_task(idx), _ops.subset(prep, union), params[idx], p, grid, *own)
             for idx, union, *own in groups)
    # groups differ in size (images x references): MPI ranks take blocks of about equal work
    local = run_here(executor, _eqk_chunk, tasks, cost=[idx.size * union.size for idx, union, *_own in groups])
    return groups, local, coarse


def _assign_candidates(images, prep, params, p, grid, executor, assign, previous=None, ref_images=None):
    """Assignment and chosen parameters of the candidate search (see :func:`eqk_search_candidates`).

    Returns the assignment and the chosen parameters, the same on every process.
    """
    n, n_classes = len(images), prep.n_refs
    diagnostic = assign is not assign_groups
    groups, local, coarse = eqk_search_candidates(images, prep, params, p, grid, executor, keep_all=diagnostic,
                                                  previous=previous, ref_images=ref_images)
    scores = at_root(executor, {g: score for g, (score, _par) in local.items()})
    decided = None
    if scores is not None:
        pi = np.concatenate([np.repeat(idx, union.size) for idx, union, *_own in groups])
        pk = np.concatenate([np.tile(union, idx.size) for idx, union, *_own in groups])
        ps = np.concatenate([scores[g].reshape(-1) for g in range(len(groups))])
        del scores
        searched = np.isfinite(ps)                  # with --eqk_pairs own: only each image's own candidates
        if not searched.all():
            pi, pk, ps = pi[searched], pk[searched], ps[searched]
        if diagnostic:
            # a diagnostic rule needs the full (K, n) matrix: exact scores where known, coarse ones elsewhere
            full = coarse.T.astype(np.float64).copy()
            full[pk, pi] = ps
            assignment = np.asarray(assign(full), dtype=np.int64)
        else:
            coarse_prep = _ops.truncate(prep, COARSE_MAX_FREQ)
            assignment = assign_groups_sparse(
                pk, pi, ps, n, n_classes,
                lambda li, ok: _coarse_fallback(images, coarse_prep, params, li, ok))
        aligned = np.zeros(n, bool)
        aligned[pi[pk == assignment[pi]]] = True
        decided = (assignment, np.flatnonzero(~aligned))
    assignment, missing = executor.bcast(decided)
    pieces = []
    for g, (score, par) in local.items():
        idx, union = groups[g][:2]
        pos = np.minimum(np.searchsorted(union, assignment[idx]), union.size - 1)
        # aligned to its class: in the group's references and searched (-inf: not an own candidate)
        hit = (union[pos] == assignment[idx]) & np.isfinite(score[np.arange(idx.size), pos])
        pieces.append((idx[hit], par[np.flatnonzero(hit), pos[hit]]))
    del local
    if missing.size:
        # images that ended in a class they were not aligned to: align them to it now
        tasks, where = [], []
        for k in np.unique(assignment[missing]):
            idx = missing[assignment[missing] == k]
            sub = _ops.subset(prep, np.array([k]))
            for s, e in chunk_ranges(idx.size, EQK_CHUNK):
                where.append(idx[s:e])
                tasks.append((images.for_task(idx[s:e]), sub, params[idx[s:e]], p, grid))
        for t, (_score, par) in run_here(executor, _eqk_chunk, tasks, cost=[w.size for w in where]).items():
            pieces.append((where[t], par[:, 0]))
    return assignment, assemble_rows(executor, pieces, n)


def _assign_flat(images, prep, params, p, grid, executor, assign):
    """SPHIRE's EQK search: every image against every reference; scores to the root, parameters kept local."""
    n = len(images)
    ranges = chunk_ranges(n, EQK_CHUNK)
    tasks = ((images.for_task(np.arange(s, e)), params[s:e], p, grid) for s, e in ranges)
    local = run_here(executor, _eqk_all_refs, tasks, shared=prep)          # prep reaches each worker once
    scores = at_root(executor, {t: score for t, (score, _par) in local.items()})
    assignment = None
    if scores is not None:
        full = np.concatenate([scores[t] for t in range(len(ranges))], axis=0)       # (n, K) float32
        del scores
        assignment = np.asarray(assign(full.T), dtype=np.int64)
        del full
    assignment = executor.bcast(assignment)
    pieces = []
    for t, (_score, par) in local.items():
        s, e = ranges[t]
        pieces.append((np.arange(s, e), par[np.arange(e - s), assignment[s:e]]))
    del local
    return assignment, assemble_rows(executor, pieces, n)


# ------------------------------------------------------------------------------------- class sums

#: The exact class sums are reduced for at most this many bytes of accumulator at a time (classes in blocks).
SUM_BLOCK_BYTES = 64 << 20


def _class_sum_chunk(task):
    images, params, labels, n_classes = task
    return (_ops.group_sums(_ops.transform(resolve(images), params), labels, n_classes),), None


def class_sums(images, chosen, assignment, n_classes: int, executor) -> np.ndarray:
    """Sums of the images of each class with their chosen parameters, ``(K, T, T)`` float64.

    Exact and order-independent (:meth:`map_sum`): the same bits on any executor. Each task is one fixed
    chunk of ``EQK_CHUNK`` images (in subset order) restricted to a block of classes; the classes come in
    blocks so that the accumulator stays below :data:`SUM_BLOCK_BYTES`.
    """
    images = as_subset(images)
    n = len(images)
    shape = tuple(images.shape[1:])
    per_class = 24 * int(np.prod(shape))                 # ExactSum: three int64 limbs per element
    block = max(1, SUM_BLOCK_BYTES // per_class)
    sums = np.zeros((n_classes,) + shape, np.float64)
    ranges = chunk_ranges(n, EQK_CHUNK)
    for k0 in range(0, n_classes, block):
        k1 = min(n_classes, k0 + block)

        def tasks(k0=k0, k1=k1):
            for s, e in ranges:
                a = assignment[s:e]
                idx = np.arange(s, e) if (k0 == 0 and k1 == n_classes) else s + np.flatnonzero((a >= k0) & (a < k1))
                if idx.size:
                    yield images.for_task(idx), chosen[idx], assignment[idx] - k0, k1 - k0

        total = executor.map_sum(_class_sum_chunk, tasks())
        if total is not None:
            sums[k0:k1] = total[0]
    return sums


def initial_references(images, n_classes, rng) -> np.ndarray:
    """``K`` distinct random images as the first references (spec §6.1, seeded from the run seed)."""
    images = as_subset(images)
    pick = rng.permutation(len(images))[:n_classes]
    return np.array(images.take(np.sort(pick)), dtype=np.float32)


def eqk_iteration(images, refs, params, fl, p, grid, executor, rng, *, assign=assign_groups, previous=None):
    """One equal-size k-means iteration with alignment (spec §6.2).

    Parameters
    ----------
    images : SubsetImages or ndarray, (n, T, T) float32
        Subset images (an array: the mean inside the mask already subtracted).
    refs : ndarray, (K, T, T) float32
    params : ndarray, (n, 4)
        Current parameters (their particle centres start the translational search).
    fl : float
        Low-pass cut-off of the new references.
    p : Isac2Params
    grid : PolarGrid
    executor : Executor
        Every process of it makes the same call (MPI); the results are the same on all.
    rng : numpy.random.Generator
        For the random start of the reference centring.
    assign : callable, optional
        Assignment rule: ``(K, n)`` scores (larger is better) -> ``(n,)`` class of each image. The
        default is SPHIRE's greedy equal-size rule (:func:`isavar.isac.kmeans.assign_groups`); diagnostics
        (``bench/isac2_eqk_purity.py``) pass other rules, e.g. fixed classes.
    previous : ndarray of int, (n,), optional
        Every image's class in the previous EQK iteration of the generation (the candidate search then
        scores an image only against the references near that class, ``p.eqk_neighbours``).

    Returns
    -------
    refs : ndarray, (K, T, T)
    params : ndarray, (n, 4)
    assignment : ndarray, (n,)
    """
    images = as_subset(images)
    n, n_classes = len(images), len(refs)
    mask = _ops.circle(images.shape[-1], p.target_radius)
    nrefs = normalise_references(refs, mask)
    prep = _ops.prepare(nrefs, grid, band_tol=p.band_tol)
    if p.eqk_search == "candidates" and n_classes > 2 * p.eqk_candidates:
        assignment, chosen = _assign_candidates(images, prep, params, p, grid, executor, assign,
                                                previous=previous, ref_images=nrefs)
    else:
        assignment, chosen = _assign_flat(images, prep, params, p, grid, executor, assign)
    # class sums with the chosen parameters (before re-centring)
    sums = class_sums(images, chosen, assignment, n_classes, executor)
    counts = np.bincount(assignment, minlength=n_classes)
    sign = np.where(chosen[:, 3] > 0.5, -1.0, 1.0)
    eff = np.column_stack([sign * chosen[:, 1], chosen[:, 2]])
    ms = np.zeros((n_classes, 2))
    np.add.at(ms, assignment, eff)
    ms /= np.maximum(counts, 1)[:, None]
    new_params = chosen.copy()
    new_params[:, 1] -= sign * ms[assignment, 0]
    new_params[:, 2] -= ms[assignment, 1]
    new_refs = (sums / np.maximum(counts, 1)[:, None, None]).astype(np.float32)
    del sums
    new_refs = _ops.tanh_lowpass(new_refs, fl, p.FF)
    new_refs = _ops.fshift(new_refs, -ms)
    # "centring": reference-free alignment of the K references to each other (spec §6.2, Q6)
    if n_classes > 1:
        _, g = within_group_refinement(new_refs, np.zeros((n_classes, 4)), p, grid, rng)
        new_refs = _ops.transform(new_refs, g)
        new_params = _ops.compose(new_params, g[assignment])
    return new_refs, new_params, assignment


def _within_task(task):
    """:func:`class_stability_task` on a class whose images the task names (read here)."""
    images, *rest = task
    return class_stability_task((resolve(images), *rest))


def agreement(prev: list, cur: list) -> float:
    """Membership agreement of class k with class k between two checks (spec §6.4)."""
    inter = sum(len(np.intersect1d(a, b)) for a, b in zip(prev, cur))
    total = sum(len(a) for a in prev) + sum(len(b) for b in cur) - inter
    return inter / total if total > 0 else 0.0


def converged(agreement_now: float, agreement_before: float, rule: str = "sphire", level: float = 0.0,
              floor: float = 0.5) -> bool:
    """Whether a generation stops after a stability check (spec §6.4, ``--round_stop``).

    Parameters
    ----------
    agreement_now, agreement_before : float
        Membership agreement (:func:`agreement`) of this check and of the previous one (0 before the second).
    rule : {"sphire", "plateau"}
        "sphire": agreement above 0.5 that rose by more than 0 and less than 0.05. "plateau" (isavar): above
        0.5 and rose by less than 0.05 or fell; SPHIRE's rule runs on to ``init_iter`` rounds after a fall.
    level : float
        isavar (``--round_agreement``): also stop once the agreement reaches this value (0: off).
    floor : float
        The agreement above which ``rule`` may stop (SPHIRE 0.5; isavar's ``--later_round_floor`` for the
        generations after the run's first).

    Returns
    -------
    bool
    """
    change = agreement_now - agreement_before
    if level > 0 and agreement_now >= level:
        return True
    # a plateau needs an earlier agreement (0 before the second check): with a low floor, a first agreement
    # below 0.05 would otherwise count as a rise of less than 0.05
    plateau = agreement_now > floor and agreement_before > 0
    if rule == "sphire":
        return plateau and 0.0 < change < 0.05
    return plateau and change < 0.05


def filter_ramp(fl: float, fh: float, step: float = 0.05) -> list:
    """The EQK cut-offs of one SAC round: ``fl, fl + step, ...`` while below ``fh`` (spec §6.2).

    The sum accumulates in floating point as SPHIRE's does (spec Q3: 6 cut-offs, not 5, for 0.2 -> 0.45).
    """
    out = [fl]
    while fl + step < fh:
        fl += step
        out.append(fl)
    return out


def round_ramp(p, rnd: int) -> list:
    """The EQK cut-offs of SAC round ``rnd`` (0-based) of a generation.

    The generation's first round runs the whole :func:`filter_ramp` (its references are random images), and so
    do the rounds up to ``p.full_ramp_rounds``. Later rounds start from the previous round's class averages;
    with ``p.round_eqk_iterations = m > 0`` they run only the ramp's last ``m`` cut-offs (isavar) instead of
    blurring those averages back to FL.
    """
    ramp = filter_ramp(p.FL, p.FH)
    if rnd >= p.full_ramp_rounds and p.round_eqk_iterations > 0:
        return ramp[-p.round_eqk_iterations:]
    return ramp


def sac_round(images, state: EngineState, p, grid, executor, *, main: int, gen: int, progress=None) -> EngineState:
    """One SAC round: EQK iterations over the filter ramp (:func:`round_ramp`), then the within-group stage."""
    images = as_subset(images)
    rnd = state.rounds_done
    params, refs, assignment = state.params, state.refs, state.assignment
    ramp = round_ramp(p, rnd)
    t0 = time.perf_counter()
    for it, fl in enumerate(ramp):
        rng = task_rngs(p.rand_seed, 1, key=stream_key(main, gen, rnd, it, _CENTRE))[0]
        before = assignment
        refs, params, assignment = eqk_iteration(images, refs, params, fl, p, grid, executor, rng,
                                                 previous=assignment)
        moved = "" if before is None else f", {100 * np.mean(assignment != before):.1f} % of the images moved"
        log.debug("main %d generation %d round %d: EQK iteration %d (cut-off %.2f) done%s", main, gen, rnd + 1,
                  it + 1, fl, moved)
        if progress is not None:
            progress.advance(0)
    n_classes = len(refs)
    t1 = time.perf_counter()
    last_round = rnd + 1 >= p.init_iter
    check = (rnd % p.iter_reali == 0) or last_round        # Q10: the last round is always checked
    rngs = task_rngs(p.rand_seed, n_classes, key=stream_key(main, gen, rnd, 0, _WITHIN))
    groups = members_by_class(assignment, n_classes)
    tasks = ((images.for_task(g), params[g], p, grid, rngs[k], check) for k, g in enumerate(groups))   # lazy
    outs = executor.map(_within_task, tasks)
    log.debug("main %d generation %d round %d: %d EQK iterations %.1f s, within-group stage %.1f s",
              main, gen, rnd + 1, len(ramp), t1 - t0, time.perf_counter() - t1)
    params = params.copy()
    new_refs = np.empty_like(refs)
    for k, (g, o) in enumerate(zip(groups, outs)):
        params[g] = o["params"]
        new_refs[k] = o["average"]
    st = dataclasses.replace(state, params=params, refs=new_refs, rounds_done=rnd + 1, assignment=assignment)
    if check:
        members = [g[o["stable"]] for g, o in zip(groups, outs)]
        st.members = members
        st.pixel_errors = np.array([o["pixel_error"] for o in outs])
        st.mirror_rates = np.array([o["mirror_rate"] for o in outs])
        terminate = False
        if state.prev_members is not None:
            agr = agreement(state.prev_members, members)
            floor = 0.5 if (main, gen) == (1, 1) else p.later_round_floor
            terminate = converged(agr, state.prev_agreement, p.round_stop, p.round_agreement, floor)
            log.debug("generation %d round %d: agreement %.3f", gen, rnd + 1, agr)
            st.prev_agreement = agr
        st.prev_members = members
        n_stable = sum(len(m) for m in members)
        checked_out = sum(int(o["checked_out"]) for o in outs)
        log.info("main %d generation %d round %d: %d classes, %d stable images%s", main, gen, rnd + 1, n_classes,
                 n_stable, f" ({checked_out} more sent back by the member check)" if checked_out else "")
        st.empty_checks = state.empty_checks + 1 if n_stable <= p.minimum_grp_size else 0
        # never the run's first generation (all the data): a hard data set may still stabilise there
        if p.empty_stop and (main, gen) != (1, 1) and st.empty_checks >= p.empty_stop:
            log.info("main %d generation %d: %d checks in a row with too few stable images for one class; "
                     "the generation stops (--empty_stop)", main, gen, st.empty_checks)
            terminate = True
        st.done = terminate or last_round
    else:
        st.done = last_round
    return st


def start_generation(images, p, *, main: int, gen: int) -> EngineState:
    """Initial state: identity parameters and ``K = n // img_per_grp`` random images as references."""
    images = as_subset(images)
    n = len(images)
    n_classes = n // p.img_per_grp
    if n_classes < 1:
        raise ValueError(f"{n} images are fewer than img_per_grp = {p.img_per_grp}")
    rng = task_rngs(p.rand_seed, 1, key=stream_key(main, gen, 0, 0, _INIT))[0]
    return EngineState(params=np.zeros((n, 4)), refs=initial_references(images, n_classes, rng))


def run_generation(images, p, grid, executor, *, main: int, gen: int, state: EngineState | None = None,
                   on_round=None, progress=None) -> GenerationResult:
    """Run (or continue) one generation on the subset ``images``.

    Parameters
    ----------
    images : ndarray, (n, T, T) float32
        The subset's working images, already normalised with :func:`normalise_for_alignment`.
    p : Isac2Params
    grid : PolarGrid
    executor : Executor
    main, gen : int
        Main-iteration and generation numbers (1-based); they key the random streams.
    state : EngineState, optional
        Resume from this state (checkpoint).
    on_round : callable, optional
        Called with the state after every SAC round (checkpointing).
    progress : Progress, optional

    Returns
    -------
    GenerationResult
    """
    images = as_subset(images)
    if state is None:
        state = start_generation(images, p, main=main, gen=gen)
    while not state.done:
        state = sac_round(images, state, p, grid, executor, main=main, gen=gen, progress=progress)
        if on_round is not None:
            on_round(state)
    return GenerationResult(averages=state.refs, members=state.members, params=state.params,
                            pixel_errors=state.pixel_errors, mirror_rates=state.mirror_rates,
                            rounds=state.rounds_done)
