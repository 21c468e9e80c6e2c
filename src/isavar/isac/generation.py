"""One ISAC generation: EQK-means rounds alternating with within-group stability stages.

Spec isac2 §6. The generation works on a subset of the working stack, starts
from ``K = n // img_per_grp`` single images as references, and ends after at
most ``init_iter`` SAC rounds (6 EQK iterations + one within-group stage each by
default) or when the stable memberships stop changing.

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
from isavar.parallel.partition import chunk_ranges, task_rngs

log = logging.getLogger(__name__)

#: Images per task of the multi-reference (EQK) alignment; fixed, so results never depend on workers.
EQK_CHUNK = 512
#: Highest ring frequency of the coarse scores that choose an image's candidate references.
COARSE_MAX_FREQ = 8
#: A group of images is aligned exactly to at most this many times ``eqk_candidates`` references (3 measured
#: 0.03-0.04 lower EQK purity than the flat search at 10,000 particles, 5 the same: bench/isac2.md).
UNION_FACTOR = 5

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

    def to_arrays(self) -> dict:
        """Flatten into a dict of arrays (for ``np.savez``)."""
        out = {"params": self.params, "refs": self.refs, "rounds_done": self.rounds_done,
               "prev_agreement": self.prev_agreement, "done": self.done}
        for name in ("prev_members", "members"):
            lst = getattr(self, name)
            out[f"{name}_present"] = lst is not None
            if lst is not None:
                out[f"{name}_sizes"] = np.array([len(m) for m in lst], np.int64)
                out[f"{name}_flat"] = np.concatenate([np.asarray(m, np.int64) for m in lst]) if lst else np.zeros(0, np.int64)
        for name in ("pixel_errors", "mirror_rates"):
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
                   done=bool(d["done"]))


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


def normalise_for_alignment(images, mask) -> np.ndarray:
    """Subtract the mean inside the mask from every image (spec §5.2, images)."""
    inside = mask > 0.5
    means = images[:, inside].mean(axis=1, dtype=np.float64).astype(np.float32)
    return images - means[:, None, None]


def normalise_references(refs, mask) -> np.ndarray:
    """Zero mean and unit standard deviation inside the mask (spec §5.2, references)."""
    inside = mask > 0.5
    vals = refs[:, inside].astype(np.float64)
    mean = vals.mean(axis=1)
    std = vals.std(axis=1, ddof=1)
    std = np.where(std > 0, std, 1.0)
    return ((refs - mean[:, None, None]) / std[:, None, None]).astype(np.float32)


def _eqk_chunk(task):
    images, refs, params, p, grid = task
    return _ops.align_multi(images, refs, grid, p, params)


def _coarse_chunk(task):
    images, prep, params = task
    return _ops.coarse_scores(images, prep, params, COARSE_MAX_FREQ)


def eqk_search_candidates(images, prep, params, p, grid, executor):
    """The EQK search against a few candidate references per image (linear cost in the number of images).

    1. Coarse scores of every image against every reference (:func:`isavar.core.align2d.coarse_scores`: low
       ring frequencies, current centre only; about 1/40 of the full search per pair).
    2. The ``p.eqk_candidates`` (C) best references of every image by coarse score are its candidates.
       Images are grouped by their best candidate; each group is aligned exactly (the full search of
       :func:`_ops.align_multi`) against the references most often among its members' candidates (the
       group's own first, at most ``UNION_FACTOR * C``), so every image gets exact scores and parameters
       for its best candidate and, usually, for all of them.

    With ``K`` references the cost per image is ``K`` coarse pairs (about 1/100 of an exact one each) plus at
    most ``UNION_FACTOR * C`` exact ones, instead of ``K`` exact ones.

    Returns
    -------
    pair_image, pair_class : ndarray of int, (P,)
        The (image, reference) pairs aligned exactly, grouped by image group.
    pair_score : ndarray of float32, (P,)
    pair_params : ndarray, (P, 4)
    coarse : ndarray of float32, (n, K)
        The coarse scores.
    """
    n, n_classes = len(images), prep.n_refs
    coarse_prep = _ops.truncate(prep, COARSE_MAX_FREQ)
    tasks = [(images[s:e], coarse_prep, params[s:e]) for s, e in chunk_ranges(n, EQK_CHUNK)]
    coarse = np.concatenate(list(executor.map(_coarse_chunk, tasks)), axis=0)       # (n, K)
    n_cand = min(int(p.eqk_candidates), n_classes)
    order = np.argsort(-coarse, axis=1, kind="stable")[:, :n_cand]                   # (n, C), best first
    groups = []
    for k in range(n_classes):
        members = np.flatnonzero(order[:, 0] == k)
        if members.size == 0:
            continue
        # the references most often among the members' candidates, at most UNION_FACTOR x C of them (the
        # group's own reference always first): bounds the exact work per image whatever K is
        refs_, counts = np.unique(order[members], return_counts=True)
        counts[refs_ == k] = members.size * n_cand + 1
        keep = np.argsort(-counts, kind="stable")[:UNION_FACTOR * n_cand]
        union = np.sort(refs_[keep])
        for s, e in chunk_ranges(members.size, EQK_CHUNK):
            groups.append((members[s:e], union))
    # lazy: image copies and reference subsets are made as the executor takes the tasks
    tasks = ((images[idx], _ops.subset(prep, union), params[idx], p, grid) for idx, union in groups)
    pair_image, pair_class, pair_score, pair_params = [], [], [], []
    for (idx, union), (score, par) in zip(groups, executor.map(_eqk_chunk, tasks)):
        pair_image.append(np.repeat(idx, union.size))
        pair_class.append(np.tile(union, idx.size))
        pair_score.append(score.reshape(-1))
        pair_params.append(par.reshape(-1, 4))
    return (np.concatenate(pair_image), np.concatenate(pair_class), np.concatenate(pair_score),
            np.concatenate(pair_params), coarse)


def _assign_candidates(images, prep, params, p, grid, executor, assign):
    """Assignment and chosen parameters of the candidate search (see :func:`eqk_search_candidates`)."""
    n, n_classes = len(images), prep.n_refs
    pi, pk, ps, pp, coarse = eqk_search_candidates(images, prep, params, p, grid, executor)
    if assign is not assign_groups:
        # a diagnostic rule needs the full (K, n) matrix: exact scores where known, coarse ones elsewhere
        full = coarse.T.astype(np.float64).copy()
        full[pk, pi] = ps
        assignment = np.asarray(assign(full), dtype=np.int64)
    else:
        assignment = assign_groups_sparse(pk, pi, ps, n, n_classes, lambda li, ok: coarse[np.ix_(li, ok)])
    chosen = np.full((n, 4), np.nan)
    hit = pk == assignment[pi]
    chosen[pi[hit]] = pp[hit]
    missing = np.flatnonzero(np.isnan(chosen[:, 0]))
    if missing.size:
        # images that ended in a class they were not aligned to: align them to it now
        tasks, where = [], []
        for k in np.unique(assignment[missing]):
            idx = missing[assignment[missing] == k]
            sub = _ops.subset(prep, np.array([k]))
            for s, e in chunk_ranges(idx.size, EQK_CHUNK):
                where.append(idx[s:e])
                tasks.append((images[idx[s:e]], sub, params[idx[s:e]], p, grid))
        for idx, (_score, par) in zip(where, executor.map(_eqk_chunk, tasks)):
            chosen[idx] = par[:, 0]
    return assignment, chosen


def _class_sum_chunk(task):
    images, params, assignment, n_classes = task
    return _ops.group_sums(_ops.transform(images, params), assignment, n_classes)


def initial_references(images, n_classes, rng) -> np.ndarray:
    """``K`` distinct random images as the first references (spec §6.1, seeded from the run seed)."""
    pick = rng.permutation(len(images))[:n_classes]
    return np.array(images[np.sort(pick)], dtype=np.float32)


def eqk_iteration(images, refs, params, fl, p, grid, executor, rng, *, assign=assign_groups):
    """One equal-size k-means iteration with alignment (spec §6.2).

    Parameters
    ----------
    images : ndarray, (n, T, T) float32
        Subset images (mean inside the mask already subtracted).
    refs : ndarray, (K, T, T) float32
    params : ndarray, (n, 4)
        Current parameters (their particle centres start the translational search).
    fl : float
        Low-pass cut-off of the new references.
    p : Isac2Params
    grid : PolarGrid
    executor : Executor
    rng : numpy.random.Generator
        For the random start of the reference centring.
    assign : callable, optional
        Assignment rule: ``(K, n)`` scores (larger is better) -> ``(n,)`` class of each image. The
        default is SPHIRE's greedy equal-size rule (:func:`isavar.isac.kmeans.assign_groups`); diagnostics
        (``bench/isac2_eqk_purity.py``) pass other rules, e.g. fixed classes.

    Returns
    -------
    refs : ndarray, (K, T, T)
    params : ndarray, (n, 4)
    assignment : ndarray, (n,)
    """
    n, n_classes = len(images), len(refs)
    mask = _ops.circle(images.shape[-1], p.target_radius)
    prep = _ops.prepare(normalise_references(refs, mask), grid)
    if p.eqk_search == "candidates" and n_classes > 2 * p.eqk_candidates:
        assignment, chosen = _assign_candidates(images, prep, params, p, grid, executor, assign)
    else:
        tasks = [(images[s:e], prep, params[s:e], p, grid) for s, e in chunk_ranges(n, EQK_CHUNK)]
        results = executor.map(_eqk_chunk, tasks)
        scores = np.concatenate([r[0] for r in results], axis=0)      # (n, K)
        cand = np.concatenate([r[1] for r in results], axis=0)        # (n, K, 4)
        assignment = np.asarray(assign(scores.T), dtype=np.int64)
        chosen = cand[np.arange(n), assignment]
    # class sums with the chosen parameters (before re-centring)
    tasks = [(images[s:e], chosen[s:e], assignment[s:e], n_classes) for s, e in chunk_ranges(n, EQK_CHUNK)]
    sums = np.zeros((n_classes,) + images.shape[1:], dtype=np.float64)
    for part in executor.map(_class_sum_chunk, tasks):
        sums += part
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
    new_refs = _ops.tanh_lowpass(new_refs, fl, p.FF)
    new_refs = _ops.fshift(new_refs, -ms)
    # "centring": reference-free alignment of the K references to each other (spec §6.2, Q6)
    if n_classes > 1:
        _, g = within_group_refinement(new_refs, np.zeros((n_classes, 4)), p, grid, rng)
        new_refs = _ops.transform(new_refs, g)
        new_params = _ops.compose(new_params, g[assignment])
    return new_refs, new_params, assignment


def agreement(prev: list, cur: list) -> float:
    """Membership agreement of class k with class k between two checks (spec §6.4)."""
    inter = sum(len(np.intersect1d(a, b)) for a, b in zip(prev, cur))
    total = sum(len(a) for a in prev) + sum(len(b) for b in cur) - inter
    return inter / total if total > 0 else 0.0


def sac_round(images, state: EngineState, p, grid, executor, *, main: int, gen: int, progress=None) -> EngineState:
    """One SAC round: EQK iterations over the filter ramp FL -> FH, then the within-group stage."""
    rnd = state.rounds_done
    params, refs = state.params, state.refs
    fl, it = p.FL, 0
    t0 = time.perf_counter()
    while True:
        rng = task_rngs(p.rand_seed, 1, key=stream_key(main, gen, rnd, it, _CENTRE))[0]
        refs, params, assignment = eqk_iteration(images, refs, params, fl, p, grid, executor, rng)
        it += 1
        if progress is not None:
            progress.advance(0)
        fl += 0.05
        if fl >= p.FH:
            break
    n_classes = len(refs)
    t1 = time.perf_counter()
    last_round = rnd + 1 >= p.init_iter
    check = (rnd % p.iter_reali == 0) or last_round        # Q10: the last round is always checked
    rngs = task_rngs(p.rand_seed, n_classes, key=stream_key(main, gen, rnd, 0, _WITHIN))
    groups = [np.flatnonzero(assignment == k) for k in range(n_classes)]
    tasks = ((images[g], params[g], p, grid, rngs[k], check) for k, g in enumerate(groups))   # lazy copies
    outs = executor.map(class_stability_task, tasks)
    log.debug("main %d generation %d round %d: %d EQK iterations %.1f s, within-group stage %.1f s",
              main, gen, rnd + 1, it, t1 - t0, time.perf_counter() - t1)
    params = params.copy()
    new_refs = np.empty_like(refs)
    for k, (g, o) in enumerate(zip(groups, outs)):
        params[g] = o["params"]
        new_refs[k] = o["average"]
    st = dataclasses.replace(state, params=params, refs=new_refs, rounds_done=rnd + 1)
    if check:
        members = [g[o["stable"]] for g, o in zip(groups, outs)]
        st.members = members
        st.pixel_errors = np.array([o["pixel_error"] for o in outs])
        st.mirror_rates = np.array([o["mirror_rate"] for o in outs])
        terminate = False
        if state.prev_members is not None:
            agr = agreement(state.prev_members, members)
            terminate = agr > 0.5 and 0.0 < agr - state.prev_agreement < 0.05
            log.debug("generation %d round %d: agreement %.3f", gen, rnd + 1, agr)
            st.prev_agreement = agr
        st.prev_members = members
        n_stable = sum(len(m) for m in members)
        log.info("main %d generation %d round %d: %d classes, %d stable images", main, gen, rnd + 1,
                 n_classes, n_stable)
        st.done = terminate or last_round
    else:
        st.done = last_round
    return st


def start_generation(images, p, *, main: int, gen: int) -> EngineState:
    """Initial state: identity parameters and ``K = n // img_per_grp`` random images as references."""
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
    if state is None:
        state = start_generation(images, p, main=main, gen=gen)
    while not state.done:
        state = sac_round(images, state, p, grid, executor, main=main, gen=gen, progress=progress)
        if on_round is not None:
            on_round(state)
    return GenerationResult(averages=state.refs, members=state.members, params=state.params,
                            pixel_errors=state.pixel_errors, mirror_rates=state.mirror_rates,
                            rounds=state.rounds_done)
