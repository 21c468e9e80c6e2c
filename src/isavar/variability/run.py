"""3D variability (SPHIRE ``sx3dvariability``): the pipeline on in-memory tables and lazy images.

Stages (spec §2): angular groups around every particle
(:mod:`~isavar.variability.neighbourhoods`) -> members brought into the group
frame, group mean and variance (:mod:`~isavar.variability.local_stats`) -> both
reconstructed into volumes (:mod:`~isavar.variability.volume`).

Memory and parallelism: centres are ordered so that consecutive ones are
angular neighbours and cut into fixed blocks of :data:`BLOCK` centres; one task
= one block. A task works through its block ``params.chunk_size`` centres at a
time (the memory bound): it reads only the images those groups need (indexed
reads of the lazy stack), preprocesses each once and computes the groups' 2D
maps; it then inserts the whole block's maps at once into its own Fourier
accumulators, which it returns for summing. The blocks are run in the fixed
rounds of :func:`isavar.variability.volume.accumulate_rounds`, one exact
reduction (``executor.map_sum``) per round: under MPI each rank runs only its
share of a round's blocks, reads only their images and keeps their per-particle
values and 2D maps (sent to the root, or written into the shared scratch files,
never to every rank). Since neither the blocks, the rounds nor any sum depend on
``chunk_size``, the executor or the number of processes, the maps are
bit-identical whatever they are. A run can be checkpointed after every round
(``checkpoint``) and resumed from the last checkpoint (``resume``) with the same
result. Cost is linear in ``N * img_per_grp``.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from isavar._progress import NullProgress
from isavar.conventions import euler_to_matrix
from isavar.core.geometry import symmetry_matrices
from isavar.errors import InputError
from isavar.io.particles import CTF_COLUMNS, ORIENTATION_COLUMNS, missing_columns
from isavar.parallel.reduction import ExactSum
from isavar.variability import local_stats as ls
from isavar.variability import volume as vol
from isavar.variability.neighbourhoods import NeighbourSearch, centre_order
from isavar.variability.params import VariabilityParams
from isavar.variability.result import VariabilityResult

log = logging.getLogger(__name__)

#: Images read and preprocessed at a time inside a task.
_READ_BLOCK = 256

#: Group centres (or images, in the --VAR and --SND modes) per task. Fixed: the sums over the blocks, and so
#: the results, do not depend on ``chunk_size``, the executor or the number of processes.
BLOCK = 1024

#: Callback receiving 2D maps on the root process: (input rows, ave maps or None, stat maps or None).
MapSink = Callable[[np.ndarray, "np.ndarray | None", "np.ndarray | None"], None]


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParticleGeometry:
    """Per-particle arrays taken from the table (input order).

    Attributes
    ----------
    rotations : numpy.ndarray
        ``(N, 3, 3)`` matrices ``A``.
    rot_deg, tilt_deg : numpy.ndarray
        ``(N,)`` Euler angles (degrees).
    origins_px : numpy.ndarray
        ``(N, 2)`` RELION origins in input pixels (0 when absent).
    ctf : dict or None
        ``(N,)`` arrays of the CTF parameters (``ctf_2d`` keyword names), or None.
    """

    rotations: np.ndarray
    rot_deg: np.ndarray
    tilt_deg: np.ndarray
    origins_px: np.ndarray
    ctf: dict | None


def particle_geometry(table: pd.DataFrame, pixel_size_A: float, *, need_ctf: bool, source=None) -> ParticleGeometry:
    """Extract orientations, origins and (optionally) CTF parameters from a particle table.

    Parameters
    ----------
    table : pandas.DataFrame
        Canonical particle table.
    pixel_size_A : float
        Pixel size (Å) to convert origins to pixels.
    need_ctf : bool
        Require the CTF columns.
    source : path-like, optional
        File name for error messages.

    Returns
    -------
    ParticleGeometry

    Raises
    ------
    InputError
        If orientations (or, with ``need_ctf``, CTF parameters) are missing.
    """
    missing = missing_columns(table, ORIENTATION_COLUMNS)
    if missing:
        raise InputError("particles have no 3D orientations (missing " + ", ".join(missing)
                         + "); 3D variability needs refined projection directions", path=source)
    rot = table["angle_rot_deg"].to_numpy(np.float64)
    tilt = table["angle_tilt_deg"].to_numpy(np.float64)
    psi = table["angle_psi_deg"].to_numpy(np.float64)
    origins = np.zeros((len(table), 2))
    for i, col in enumerate(("origin_x_A", "origin_y_A")):
        if col in table.columns:
            values = table[col].to_numpy(np.float64)
            unknown = int(np.isnan(values).sum())
            if unknown:
                hint = ("the file gives shifts in pixels but no pixel size: set it with --apix"
                        if f"origin_{'xy'[i]}_px" in table.columns else "every particle needs its origin")
                raise InputError(f"{col} is unknown for {unknown} of {len(table)} particles ({hint})", path=source)
            origins[:, i] = values / pixel_size_A
    ctf = None
    if need_ctf:
        missing = missing_columns(table, CTF_COLUMNS)
        if missing:
            raise InputError("--CTF needs CTF parameters for every particle (missing " + ", ".join(missing) + ")",
                             path=source)
        ctf = {c: table[c].to_numpy(np.float64) for c in CTF_COLUMNS}
        ctf["phase_shift_deg"] = (table["phase_shift_deg"].fillna(0.0).to_numpy(np.float64)
                                  if "phase_shift_deg" in table.columns else np.zeros(len(table)))
        ctf["bfactor_A2"] = (table["ctf_bfactor_A2"].fillna(0.0).to_numpy(np.float64)
                             if "ctf_bfactor_A2" in table.columns else np.zeros(len(table)))
    return ParticleGeometry(euler_to_matrix(rot, tilt, psi), rot, tilt, origins, ctf)


def choose_grid(box: int, pixel_size_A: float, params: VariabilityParams) -> ls.WorkingGrid:
    """Working grid for these parameters (see :func:`isavar.variability.local_stats.working_grid`)."""
    if params.window > box:
        raise InputError(f"--window {params.window} is larger than the box {box}")
    return ls.working_grid(box, pixel_size_A, decimate=params.decimate, window=params.window,
                           lowpass_fl=params.lowpass_fl, lowpass_aa=params.lowpass_aa,
                           auto=params.auto_decimate)


# --------------------------------------------------------------------------------------
# Group task (runs in worker processes)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    images: object
    geometry: ParticleGeometry
    params: VariabilityParams
    grid: ls.WorkingGrid
    sym: np.ndarray
    keep_maps: bool
    token: str = ""


@dataclass(frozen=True)
class _TaskExtra:
    """What a group task keeps besides its summed accumulators (stays on the process that ran it)."""

    centres: np.ndarray
    ave_maps: np.ndarray | None
    stat_maps: np.ndarray | None
    group_angle: np.ndarray
    group_mean_var: np.ndarray
    n_images_read: int


#: The neighbour search of the last context seen by this process (a KD-tree over all directions, built
#: once per process and run instead of once per chunk).
_SEARCH_CACHE: dict = {}


def _neighbour_search(ctx: "_Context") -> NeighbourSearch:
    key = ctx.token
    search = _SEARCH_CACHE.get(key) if key else None
    if search is None:
        search = NeighbourSearch(ctx.geometry.rotations, ctx.sym)
        if key:
            _SEARCH_CACHE.clear()
            _SEARCH_CACHE[key] = search
    return search


def _member_ctf(geo: ParticleGeometry, members: np.ndarray, alpha: np.ndarray, mirror: np.ndarray) -> ls.CtfMembers:
    c = geo.ctf
    return ls.CtfMembers(
        defocus_u_A=c["defocus_u_A"][members], defocus_v_A=c["defocus_v_A"][members],
        defocus_angle_deg=ls.aligned_ctf_angle(c["defocus_angle_deg"][members], alpha, mirror),
        voltage_kV=c["voltage_kV"][members], cs_mm=c["cs_mm"][members],
        amplitude_contrast=c["amplitude_contrast"][members], phase_shift_deg=c["phase_shift_deg"][members],
        bfactor_A2=c["bfactor_A2"][members])


def _levelled(maps: np.ndarray, p) -> np.ndarray:
    """Maps as they are inserted: edge level subtracted when ``p.subtract_edge_level``."""
    return vol.subtract_edge_level(maps) if p.subtract_edge_level else maps


def _group_maps(ctx: _Context, centres: np.ndarray):
    """2D group maps of some centres: (ave, var, max group angle, mean 2D variance, images read)."""
    p, geo, grid = ctx.params, ctx.geometry, ctx.grid
    groups = _neighbour_search(ctx).groups(centres, p.img_per_grp)
    uniq, inverse = np.unique(groups.members, return_inverse=True)
    rows = inverse.reshape(groups.members.shape)
    prepared = np.empty((uniq.size, grid.nx, grid.nx), np.float32)
    for s in range(0, uniq.size, _READ_BLOCK):  # read and preprocess in blocks: bounded transient memory
        sel = uniq[s:s + _READ_BLOCK]
        prepared[s:s + sel.size] = ls.prepare_images(ctx.images[sel], geo.origins_px[sel], grid,
                                                     normalize=p.normalize, lowpass_fl=p.lowpass_fl,
                                                     lowpass_aa=p.lowpass_aa)
    frames = ls.centre_frames(geo.rot_deg[centres], geo.tilt_deg[centres])
    mats = geo.rotations[groups.members] @ ctx.sym[groups.sym_ops]
    alpha = ls.inplane_alignment(frames, mats, groups.mirror)
    ctf = _member_ctf(geo, groups.members, alpha, groups.mirror) if p.ctf else None
    rotator = ls.DiscRotator(grid.nx)
    ave, var = ls.group_statistics(prepared, rows, alpha, groups.mirror, rotator, ctf=ctf,
                                   pixel_size_A=grid.working_pixel_size_A, wiener_snr=p.wiener_snr)
    del prepared
    np.maximum(var, 0.0, out=var)
    disc = rotator.flat_index
    mean_var = var.reshape(len(centres), -1)[:, disc].mean(axis=1)
    return ave, var, groups.angle_deg.max(axis=1), mean_var, int(uniq.size)


def _group_task(ctx: _Context, centres: np.ndarray):
    """Process one block of centres: groups and 2D statistics (``chunk_size`` at a time), insertion.

    Returns ``((ave_data, ave_weights, var_data, var_weights), _TaskExtra)`` for ``executor.map_sum``.
    """
    p, geo, grid = ctx.params, ctx.geometry, ctx.grid
    step = max(1, int(p.chunk_size))
    parts = [_group_maps(ctx, centres[s:s + step]) for s in range(0, len(centres), step)]
    ave = np.concatenate([x[0] for x in parts]) if len(parts) > 1 else parts[0][0]
    var = np.concatenate([x[1] for x in parts]) if len(parts) > 1 else parts[0][1]
    stat = np.sqrt(var) if p.var3d_stat == "std" else var
    frames = ls.centre_frames(geo.rot_deg[centres], geo.tilt_deg[centres])
    acc_ave = vol.new_accumulator(grid.nx, p.npad, p.symmetry)
    acc_var = vol.new_accumulator(grid.nx, p.npad, p.symmetry)
    acc_ave.insert(_levelled(ave, p), frames)             # the whole block at once: the same sums for any step
    acc_var.insert(_levelled(stat, p), frames)
    extra = _TaskExtra(centres, ave if ctx.keep_maps else None, stat if ctx.keep_maps else None,
                       np.concatenate([x[2] for x in parts]), np.concatenate([x[3] for x in parts]),
                       sum(x[4] for x in parts))
    return (acc_ave.data, acc_ave.weights, acc_var.data, acc_var.weights), extra


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------


def variability(table: pd.DataFrame, images, params: VariabilityParams, *, pixel_size_A: float,
                executor=None, progress=None, map_sink: MapSink | None = None,
                source=None, resume: dict | None = None, checkpoint=None) -> VariabilityResult:
    """3D variability of a particle set with known orientations.

    Parameters
    ----------
    table : pandas.DataFrame
        Canonical particle table (orientations; CTF parameters with ``params.ctf``).
    images : LazyImages or numpy.ndarray
        ``(N, box, box)`` images in table order; only indexed reads are used.
    params : VariabilityParams
        Settings (``var_input`` / ``snd`` select the other modes).
    pixel_size_A : float
        Input pixel size (Å).
    executor : Executor, optional
        How chunks are spread (default serial).
    progress : Progress, optional
        Progress reporter.
    map_sink : callable, optional
        Receives ``(input_rows, ave_maps, stat_maps)`` per block (working-grid
        maps) on the process that computed the block (under MPI every rank
        needs one, e.g. writing into a shared file); without it the 2D maps
        are discarded.
    source : path-like, optional
        Input file name for error messages.
    resume : dict, optional
        A state passed to ``checkpoint`` by an interrupted run with the same
        input and parameters: the blocks it lists as done are not computed again
        (their 2D maps must already be in the sink's storage).
    checkpoint : callable, optional
        Called on every process after every round of blocks with the state to
        resume from (``blocks_done``, ``n_blocks``, the exact sums of the
        accumulators of the blocks done, ``total_limbs``, ``total_count``,
        ``total_layout`` (:meth:`ExactSum.to_arrays`), and, complete on the root
        only, ``angle``, ``mean_var``, ``n_read``); only in the group-statistics mode.

    Returns
    -------
    VariabilityResult
    """
    from isavar.parallel.serial import SerialExecutor

    executor = executor or SerialExecutor()
    progress = progress or NullProgress()
    if params.var_input:
        return reconstruct_maps(table, images, params, pixel_size_A=pixel_size_A, executor=executor,
                                progress=progress, source=source)
    if params.snd:
        from isavar.variability.snd import squared_normalised_differences

        return squared_normalised_differences(table, images, params, pixel_size_A=pixel_size_A,
                                              executor=executor, progress=progress, source=source)
    t0 = time.perf_counter()
    n, box = len(images), int(images.shape[-1])
    geo = particle_geometry(table, pixel_size_A, need_ctf=params.ctf, source=source)
    sym = symmetry_matrices(params.symmetry)
    if params.img_per_grp > n * sym.shape[0]:
        raise InputError(f"--img_per_grp {params.img_per_grp} is larger than the number of (symmetry-expanded) "
                         f"particles, {n * sym.shape[0]}", path=source)
    grid = choose_grid(box, pixel_size_A, params)
    log.info("3D variability: %d particles, box %d, working box %d (%.3f Å/px), G = %d, symmetry %s, %s",
             n, box, grid.nx, grid.working_pixel_size_A, params.img_per_grp, params.symmetry,
             "CTF (Wiener mean, CTF-corrected variance)" if params.ctf else "no CTF")
    order = centre_order(geo.rotations, BLOCK)
    blocks = [order[s:s + BLOCK] for s in range(0, n, BLOCK)]
    ctx = _Context(images, geo, params, grid, sym, keep_maps=map_sink is not None, token=uuid.uuid4().hex)
    root = executor.is_root()
    angle = np.zeros(n)                                   # per-particle values: complete on the root only
    mean_var = np.zeros(n)
    n_read = 0
    total = None
    first = 0
    if resume is not None:
        first = int(resume["blocks_done"])
        total = ExactSum.from_arrays(resume, "total")
        angle[:], mean_var[:], n_read = resume["angle"], resume["mean_var"], int(resume["n_read"])
        log.info("continuing an interrupted run: %d of %d blocks of groups were done", first, len(blocks))
    progress.stage("groups", total=n)
    if first:
        progress.advance(sum(len(b) for b in blocks[:first]))
    pending: list = []                                    # this process's per-task values of the current round

    def add(extra: _TaskExtra) -> None:
        pending.append((extra.centres, extra.group_angle, extra.group_mean_var, extra.n_images_read))
        if map_sink is not None:
            map_sink(extra.centres, extra.ave_maps, extra.stat_maps)
        progress.advance(len(extra.centres))
        if params.verbose:
            _log_groups(extra)

    def end_round(done: int, n_blocks: int, tot) -> None:
        nonlocal n_read
        gathered = executor.gather(list(pending))          # per-particle values go to the root only
        pending.clear()
        if root:
            for part in gathered:
                for centres, a, v, k in part:
                    angle[centres], mean_var[centres] = a, v
                    n_read += k
        if checkpoint is not None:
            state = {"blocks_done": done, "n_blocks": n_blocks, "angle": angle, "mean_var": mean_var,
                     "n_read": n_read}
            state.update(tot.to_arrays("total"))
            checkpoint(state)

    totals = vol.accumulate_rounds(executor, _group_task, blocks, shared=ctx, total=total, items_done=first,
                                   on_result=add, on_round=end_round)
    acc_ave, acc_var = vol.accumulators_from(totals, grid.nx, params.npad, params.symmetry)
    progress.close()
    t1 = time.perf_counter()
    log.info("groups done in %.1f s (%.2f image reads per particle)", t1 - t0, n_read / max(n, 1))
    progress.stage("reconstruction", total=2)
    var3d = vol.finish(acc_var, grid, mask_radius_px=params.mask_radius_px)
    progress.advance()
    ave3d = vol.finish(acc_ave, grid, mask_radius_px=params.mask_radius_px)
    progress.advance()
    progress.close()
    t2 = time.perf_counter()
    return VariabilityResult(var3d=var3d, ave3d=ave3d, pixel_size_A=float(pixel_size_A), working_box=grid.nx,
                             n_particles=n, n_groups=n, group_angle_deg=angle, group_mean_var=mean_var,
                             timings_s={"groups": t1 - t0, "reconstruction": t2 - t1, "total": t2 - t0})


def _log_groups(res: _TaskExtra) -> None:
    for c, a, v in zip(res.centres, res.group_angle, res.group_mean_var):
        log.debug("group of particle %d: radius %.2f deg, mean 2D variance %.4g", int(c), float(a), float(v))


def _insert_task(ctx: _Context, rows: np.ndarray):
    p, geo, grid = ctx.params, ctx.geometry, ctx.grid
    step = max(1, int(p.chunk_size))
    maps = np.concatenate([ls.prepare_images(ctx.images[rows[s:s + step]], geo.origins_px[rows[s:s + step]], grid,
                                             normalize=False) for s in range(0, rows.size, step)])
    acc = vol.new_accumulator(grid.nx, p.npad, p.symmetry)
    acc.insert(_levelled(maps, p), geo.rotations[rows])
    return (acc.data, acc.weights), rows.size


def reconstruct_maps(table: pd.DataFrame, images, params: VariabilityParams, *, pixel_size_A: float,
                     executor=None, progress=None, source=None) -> VariabilityResult:
    """``--VAR`` mode: the images already are 2D variance (or std) maps; reconstruct them as given.

    Each map is inserted at its own full orientation (and origin, normally 0)
    with the requested symmetry; no grouping, normalisation or square root.

    Parameters
    ----------
    table, images, params, pixel_size_A, executor, progress, source
        As for :func:`variability`.

    Returns
    -------
    VariabilityResult
        ``ave3d`` is None.
    """
    from isavar.parallel.serial import SerialExecutor

    executor = executor or SerialExecutor()
    progress = progress or NullProgress()
    t0 = time.perf_counter()
    n, box = len(images), int(images.shape[-1])
    geo = particle_geometry(table, pixel_size_A, need_ctf=False, source=source)
    grid = choose_grid(box, pixel_size_A, params.replace(lowpass_fl=0.0, lowpass_aa=0.0))
    ctx = _Context(images, geo, params, grid, symmetry_matrices(params.symmetry), keep_maps=False)
    chunks = vol.file_order_chunks(images, BLOCK)
    progress.stage("reconstruction", total=n)
    totals = vol.accumulate_rounds(executor, _insert_task, chunks, shared=ctx, on_result=progress.advance)
    (acc,) = vol.accumulators_from(totals, grid.nx, params.npad, params.symmetry)
    progress.close()
    var3d = vol.finish(acc, grid, mask_radius_px=params.mask_radius_px)
    t1 = time.perf_counter()
    return VariabilityResult(var3d=var3d, ave3d=None, pixel_size_A=float(pixel_size_A), working_box=grid.nx,
                             n_particles=n, n_groups=0, timings_s={"reconstruction": t1 - t0, "total": t1 - t0})
