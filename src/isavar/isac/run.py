"""The ISAC2 driver: main iterations over generations, accounted/unaccounted bookkeeping (spec isac2 §7).

The run is a sequence of small steps (start a generation, one SAC round, finish
a generation) applied to a :class:`RunState`; a workflow checkpoints the state
after every step, so an interrupted run resumes exactly where it stopped and
ends with the same result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from isavar.errors import InputError
from isavar.isac.generation import EngineState, sac_round, start_generation
from isavar.isac.working import SubsetImages
from isavar.isac.result import Isac2Result

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------- events
# Each step of the run returns one of these, for the workflow to write files and checkpoint.

@dataclass(frozen=True)
class GenerationStarted:
    """A generation was started: its initial references are made, no SAC round has run yet.

    Attributes
    ----------
    main, gen : int
        Main iteration and generation (1-based).
    n_images : int
        Images in the generation's subset.
    n_classes : int
        Classes it starts with.
    """

    main: int
    gen: int
    n_images: int
    n_classes: int


@dataclass(frozen=True)
class RoundDone:
    """One SAC round of the current generation finished (the generation goes on).

    Attributes
    ----------
    main, gen : int
        Main iteration and generation (1-based).
    rounds_done : int
        SAC rounds completed in this generation so far.
    """

    main: int
    gen: int
    rounds_done: int


@dataclass(frozen=True)
class GenerationFinished:
    """A generation ended: its classes were judged and the next step decided (spec isac2 §7.2).

    Attributes
    ----------
    main, gen : int
        The generation that ended (1-based).
    subset : ndarray of int, (n,)
        Absolute indices the generation processed.
    result : EngineState
        The finished generation (``refs``, ``members`` as local indices, ``params``, ``pixel_errors``).
    good : list of int
        Indices of the accepted classes in ``result``.
    bad : ndarray of int
        Sorted absolute indices of the stable members of rejected classes.
    end_main : bool
        The main iteration ends with this generation.
    finished : bool
        The whole run ends with this generation.
    not_processed : ndarray of int or None
        At the end of a main iteration: the absolute indices still unaccounted (None otherwise).
    """

    main: int
    gen: int
    subset: np.ndarray
    result: EngineState
    good: list
    bad: np.ndarray
    end_main: bool
    finished: bool
    not_processed: np.ndarray | None = None


#: What :func:`step` reports (None when the run had already finished).
RunEvent = GenerationStarted | RoundDone | GenerationFinished


@dataclass
class RunState:
    """Everything needed to continue an ISAC2 run.

    Attributes
    ----------
    n_total : int
    main, gen : int
        Current main iteration and generation (1-based).
    subset : ndarray of int
        Absolute indices processed by the current generation.
    engine : EngineState or None
        The generation in progress (None before it starts).
    params : ndarray, (n_total, 4)
        ``all_parameters`` (mirror -1 = not accounted).
    processed : ndarray of int
        Sorted indices of accounted images.
    averages : list of ndarray (T, T)
    members : list of ndarray
    pixel_errors : list of float
    origin : list of (main, gen)
    finished : bool
    history : list of dict
    """

    n_total: int
    main: int = 1
    gen: int = 1
    subset: np.ndarray = None
    engine: EngineState | None = None
    params: np.ndarray = None
    processed: np.ndarray = None
    averages: list = field(default_factory=list)
    members: list = field(default_factory=list)
    pixel_errors: list = field(default_factory=list)
    origin: list = field(default_factory=list)
    finished: bool = False
    history: list = field(default_factory=list)

    # ---------------------------------------------------------------- (de)serialisation
    def to_arrays(self) -> dict:
        """A flat dict of arrays for ``np.savez`` (the JSON-able history goes separately)."""
        out = {"n_total": self.n_total, "main": self.main, "gen": self.gen, "subset": self.subset,
               "params": self.params, "processed": self.processed, "finished": self.finished,
               "pixel_errors": np.asarray(self.pixel_errors, np.float64),
               "origin": np.asarray(self.origin, np.int64).reshape(-1, 2),
               "member_sizes": np.array([len(m) for m in self.members], np.int64),
               "member_flat": (np.concatenate(self.members) if self.members else np.zeros(0)).astype(np.int64),
               "engine_present": self.engine is not None}
        if self.averages:
            out["averages"] = np.stack(self.averages).astype(np.float32)
        if self.engine is not None:
            out.update({f"engine_{k}": v for k, v in self.engine.to_arrays().items()})
        return out

    @classmethod
    def from_arrays(cls, d, history=None) -> "RunState":
        """Inverse of :meth:`to_arrays`."""
        sizes = d["member_sizes"]
        members = np.split(d["member_flat"], np.cumsum(sizes)[:-1]) if len(sizes) else []
        averages = list(np.array(d["averages"])) if "averages" in d else []
        engine = None
        if bool(d["engine_present"]):
            engine = EngineState.from_arrays({k[7:]: d[k] for k in d if k.startswith("engine_")
                                              and k != "engine_present"})
        return cls(n_total=int(d["n_total"]), main=int(d["main"]), gen=int(d["gen"]),
                   subset=np.array(d["subset"]), engine=engine, params=np.array(d["params"]),
                   processed=np.array(d["processed"]), averages=averages, members=list(members),
                   pixel_errors=list(np.array(d["pixel_errors"])),
                   origin=[tuple(int(v) for v in o) for o in np.array(d["origin"])],
                   finished=bool(d["finished"]), history=list(history or []))


def check_enough_images(n_total: int, p) -> None:
    """Raise InputError when there are too few images for one class (Q19)."""
    if n_total < p.img_per_grp:
        raise InputError(f"{n_total} images are fewer than --img_per_grp={p.img_per_grp}; "
                         "ISAC2 needs at least one full class (lower --img_per_grp or add images)")
    if n_total <= p.minimum_grp_size:
        raise InputError(f"{n_total} images cannot form a class larger than --minimum_grp_size="
                         f"{p.minimum_grp_size}")


def initial_state(n_total: int, p) -> RunState:
    """State of a fresh run: every image in the first generation of main iteration 1."""
    check_enough_images(n_total, p)
    params = np.zeros((n_total, 4))
    params[:, 3] = -1
    return RunState(n_total=n_total, subset=np.arange(n_total), params=params,
                    processed=np.zeros(0, np.int64))


def subset_images(working, subset, p) -> SubsetImages:
    """The subset's working images with the mean inside the alignment mask subtracted, read on demand.

    With a :class:`~isavar.isac.working.MappedStack` each task reads its own rows from the file; with an
    array, tasks get normalised copies of their rows.
    """
    return SubsetImages(working, subset, p.target_radius)


def step(state: RunState, working, p, grid, executor, *, progress=None) -> tuple[RunState, RunEvent | None]:
    """Advance the run by one step.

    Returns
    -------
    state : RunState
    event : GenerationStarted, RoundDone, GenerationFinished or None
        What the step did (None if the run had already finished); a
        :class:`GenerationFinished` carries what the workflow writes to files.
    """
    if state.finished:
        return state, None
    if state.engine is None:
        imgs = subset_images(working, state.subset, p)
        state.engine = start_generation(imgs, p, main=state.main, gen=state.gen)
        log.info("main %d generation %d: %d images, %d classes", state.main, state.gen, len(state.subset),
                 len(state.engine.refs))
        return state, GenerationStarted(main=state.main, gen=state.gen, n_images=int(len(state.subset)),
                                        n_classes=int(len(state.engine.refs)))
    if not state.engine.done:
        imgs = subset_images(working, state.subset, p)
        state.engine = sac_round(imgs, state.engine, p, grid, executor, main=state.main, gen=state.gen,
                                 progress=progress)
        return state, RoundDone(main=state.main, gen=state.gen, rounds_done=int(state.engine.rounds_done))
    return finish_generation(state, p)


def finish_generation(state: RunState, p) -> tuple[RunState, GenerationFinished]:
    """Accept classes with more than ``minimum_grp_size`` stable members; decide what runs next (§7.2)."""
    eng = state.engine
    subset = state.subset
    good, bad = [], []
    new_good_members = []
    for k, local in enumerate(eng.members):
        absolute = subset[local]
        if len(absolute) > p.minimum_grp_size:
            good.append(k)
            state.averages.append(np.asarray(eng.refs[k], np.float32))
            state.members.append(np.sort(absolute).astype(np.int64))
            state.pixel_errors.append(float(eng.pixel_errors[k]))
            state.origin.append((state.main, state.gen))
            state.params[absolute] = eng.params[local]
            new_good_members.append(absolute)
        else:
            bad.append(absolute)
    if new_good_members:
        state.processed = np.union1d(state.processed, np.concatenate(new_good_members)).astype(np.int64)
    bad = np.sort(np.concatenate(bad)).astype(np.int64) if bad else np.zeros(0, np.int64)
    first_gen_poor = state.gen == 1 and (len(good) <= p.delta_good
                                         or (state.main > 1 and len(good) < p.main_stop * len(eng.refs)))
    end_main = bool(bad.size == 0 or int(1.2 * bad.size) < 2 * p.img_per_grp or first_gen_poor)
    finished = False
    result = eng
    info = {"main": state.main, "gen": state.gen, "n_images": int(len(subset)), "n_classes": len(eng.refs),
            "n_good": len(good), "n_accounted": int(sum(len(eng.members[k]) for k in good)),
            "n_bad": int(bad.size), "rounds": eng.rounds_done}
    main, gen = state.main, state.gen
    not_processed = None
    if end_main:
        not_processed = np.setdiff1d(np.arange(state.n_total), state.processed)
        finished = len(not_processed) < 2 * p.img_per_grp or first_gen_poor
        if finished:
            state.finished = True
        else:
            state.main += 1
            state.gen = 1
            state.subset = not_processed
    else:
        state.gen += 1
        state.subset = bad
    state.engine = None
    event = GenerationFinished(main=main, gen=gen, subset=subset, result=result, good=good, bad=bad,
                               end_main=end_main, finished=finished, not_processed=not_processed)
    info.update(end_main=end_main, finished=finished)
    state.history.append(info)
    log.info("main %d generation %d done: %d of %d classes accepted, %d images accounted so far",
             info["main"], info["gen"], len(good), info["n_classes"], len(state.processed))
    return state, event


def result_from_state(state: RunState, prealign_shifts, shrink, *, order=None, order_params=None) -> Isac2Result:
    """Package the final state."""
    t = None
    if state.averages:
        t = np.stack(state.averages).astype(np.float32)
    return Isac2Result(averages=t if t is not None else np.zeros((0, 1, 1), np.float32),
                       members=list(state.members), pixel_errors=np.asarray(state.pixel_errors),
                       origin=np.asarray(state.origin, np.int64).reshape(-1, 2), params=state.params,
                       prealign_shifts=np.asarray(prealign_shifts), shrink=float(shrink), order=order,
                       order_params=order_params, history=list(state.history))


def run_classification(working, p, grid, executor, *, state: RunState | None = None, on_step=None,
                       progress=None) -> RunState:
    """Run (or continue) the generation loops on the working stack until the run finishes.

    Parameters
    ----------
    working : array-like, (N, T, T)
        The working stack (indexable by index arrays).
    p : Isac2Params
    grid : PolarGrid
    executor : Executor
    state : RunState, optional
        Continue from this state.
    on_step : callable, optional
        ``on_step(state, event)`` after every step (checkpointing, files); ``event`` is what
        :func:`step` returned.
    """
    if state is None:
        state = initial_state(len(working), p)
    while not state.finished:
        state, event = step(state, working, p, grid, executor, progress=progress)
        if on_step is not None:
            on_step(state, event)
    return state


def isac2(images, p, *, executor=None, progress=None, table=None, pixel_size_A=None) -> Isac2Result:
    """ISAC2 on images in memory (no files): pre-alignment, working stack, generations, ordering.

    Parameters
    ----------
    images : ndarray, (N, box, box)
        Raw particle images.
    p : Isac2Params
    executor : Executor, optional
        Default serial.
    table : pandas.DataFrame, optional
        Particle table (CTF columns for ``--CTF``/``--VPP``; segment angles for filaments).
    pixel_size_A : float, optional

    Returns
    -------
    Isac2Result
    """
    from isavar.isac.ordering import order_averages
    from isavar.isac.prealign import centring_shifts, prealign
    from isavar.isac.preprocess import correct_and_shrink, finish_working_images, radial_amplitude_sum, vpp_table
    from isavar.parallel.serial import SerialExecutor

    executor = executor or SerialExecutor()
    images = np.asarray(images, dtype=np.float32)
    n = len(images)
    check_enough_images(n, p)
    if table is None:
        import pandas as pd

        table = pd.DataFrame(index=range(n))
    rpw = vpp_table(radial_amplitude_sum(images), n) if p.VPP else None
    shrunk, pre = correct_and_shrink(images, table, p, pixel_size_A, rpw=rpw)
    shrink_eff = shrunk.shape[-1] / images.shape[-1]
    if p.skip_prealignment:
        shifts = np.zeros((n, 2))
    else:
        ali, _ = prealign(pre if pre is not None else shrunk, p, executor, progress=progress)
        shifts = centring_shifts(ali, shrink_eff)
    working = finish_working_images(shrunk, shifts * shrink_eff, table, p)
    grid = make_grid(p)
    state = run_classification(working, p, grid, executor, progress=progress)
    order = order_params = None
    if not p.skip_ordering and state.averages:
        order, order_params = order_averages(np.stack(state.averages), p, executor)
    return result_from_state(state, shifts, shrink_eff, order=order, order_params=order_params)


def make_grid(p):
    """Polar rings ``ir .. target_radius`` step ``rs`` (spec §3)."""
    from isavar.core.polar import polar_grid

    return polar_grid(p.ir, p.target_radius, p.rs)
