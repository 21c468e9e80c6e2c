"""3D volumes from 2D statistics maps (spec §3.10-3.11) via :mod:`isavar.core.reconstruct`.

The 2D maps (group means and standard deviations) are inserted into Fourier
accumulators at their group frames ``R(rot_c, tilt_c, 0)`` with no shift and no
CTF (the means are already CTF-corrected in the CTF branch). Insertion uses
nearest-voxel gridding on an ``npad``-times padded grid, as SPHIRE's ``nn4``.
The finished volume is brought back to the input grid:

* a working grid smaller than the input window (decimation) is Fourier
  up-sampled, and its voxel values multiplied by ``nx / window``: a ray sum over
  ``nx`` coarse voxels equals the sum over ``window`` fine voxels, so this
  restores voxel values on the input scale (SPHIRE left them ``1/decimate`` too
  large, §9 Q9);
* a window smaller than the box is zero-padded back to the box (not magnified,
  §9 Q8);
* voxels outside the spherical mask are set to 0.
"""

from __future__ import annotations

import numpy as np

from isavar.core.reconstruct import FourierAccumulator
from isavar.variability.local_stats import WorkingGrid

#: Fourier-space gridding of the 2D maps (SPHIRE nn4 uses nearest; 8x cheaper than trilinear).
INSERT_INTERPOLATION = "nearest"


def subtract_edge_level(maps: np.ndarray, *, width: float = 2.0) -> np.ndarray:
    """Remove each map's level at the edge of its disc before insertion (SPHIRE nn4 step 1).

    The mean over the ring ``nx//2 - 1 - width < r <= nx//2 - 1`` is subtracted inside the disc of
    radius ``nx//2 - 1`` and the map is set to 0 outside it. A constant offset in the 2D maps (e.g.
    the noise floor ``sigma_e`` of noise-dominated standard deviations) would otherwise reconstruct
    into an edge-peaked 3D shell rather than a constant; SPHIRE removed it by subtracting the mean of
    the corners of every map.

    Parameters
    ----------
    maps : numpy.ndarray
        ``(k, nx, nx)``.
    width : float
        Ring width in pixels.

    Returns
    -------
    numpy.ndarray
        ``(k, nx, nx)`` float32 (a new array).
    """
    k, nx, _ = maps.shape
    c, r = nx // 2, nx // 2 - 1
    yy, xx = np.mgrid[0:nx, 0:nx]
    rr = np.hypot(yy - c, xx - c)
    disc = rr <= r
    ring = disc & (rr > r - width)
    level = maps[:, ring].mean(axis=1, dtype=np.float64).astype(np.float32)
    return np.where(disc, maps - level[:, None, None], np.float32(0)).astype(np.float32)


def new_accumulator(nx: int, npad: int, symmetry: str) -> FourierAccumulator:
    """An empty accumulator for ``nx``-pixel maps (nearest-voxel gridding)."""
    return FourierAccumulator(nx, npad=npad, symmetry=symmetry, interpolation=INSERT_INTERPOLATION)


#: Rounds a run's tasks are cut into (checkpoints fall between rounds), at most; fewer when the rounds are
#: widened to give every process a share of each (:func:`round_bounds`). The sums over the rounds are exact,
#: so the totals are the same bits however the run is cut, spread or interrupted.
ROUNDS = 8


def round_bounds(n_items: int, rounds: int | None = None, *, processes: int = 1,
                 start: int = 0) -> list[tuple[int, int]]:
    """Item ranges ``[(start, stop), ...]`` of the rounds of a run of ``n_items`` tasks.

    ``ceil(n_items / rounds)`` tasks per round, rounded up to a multiple of ``processes`` so that every
    process (MPI rank, pool worker) has the same share of every round, none waits idle while another works
    (the last round may be shorter). ``start``: the first item of the first round (a resumed run).
    """
    rounds = ROUNDS if rounds is None else int(rounds)
    processes = max(1, int(processes))
    step = max(1, -(-int(n_items) // max(1, rounds)))
    step = processes * -(-step // processes)
    return [(s, min(int(n_items), s + step)) for s in range(int(start), int(n_items), step)]


def executor_processes(executor) -> int:
    """The processes that run an executor's tasks at once: MPI ranks, pool workers, or 1."""
    return max(1, int(getattr(executor, "workers", None) or getattr(executor, "size", 1) or 1))


def file_order_chunks(images, size: int) -> list[np.ndarray]:
    """The rows of ``images`` in file order, cut into chunks of ``size`` (the tasks of a pass over every image).

    Each file is read once, front to back, over the whole pass even when the particle table is shuffled
    (the order of ``images.file_order()``, :meth:`isavar.io.stack.LazyImages.file_order`; images without
    it, e.g. an array, are taken in row order); a task sums its chunk's images, wherever their rows are. A
    table already in file order gives the consecutive chunks ``arange(s, s + size)``; a shuffled copy of it
    gives the same chunks of the same images, so the same sums, bit for bit.
    """
    file_order = getattr(images, "file_order", None)
    order = np.asarray(file_order(), np.int64) if callable(file_order) else np.arange(len(images), dtype=np.int64)
    return [order[s:s + int(size)] for s in range(0, order.size, int(size))]


def accumulate_rounds(executor, task, items, *, shared=None, total=None, items_done: int = 0, on_result=None,
                      on_round=None) -> list | None:
    """Sum the arrays the tasks return, one exact reduction per round (the one accumulation loop of 3D sums).

    The items are cut into the rounds of :func:`round_bounds`, widened to a multiple of the executor's
    processes (:func:`executor_processes`) so that no MPI rank or pool worker idles during a round; each
    round is one ``executor.map_sum``: every process runs its share of the round's tasks (reading only
    their images) and the arrays are summed exactly (fixed point, :mod:`isavar.parallel.reduction`), with
    one ``Allreduce`` under MPI. The rounds' exact sums are added exactly (their limbs) and rounded to
    float64 once at the end, so the totals depend neither on the rounds nor on the executor or the number of
    processes: bit-identical for serial, pool and MPI runs, and for a run resumed after any round, even on
    another number of processes.

    Parameters
    ----------
    executor : Executor
        Provides ``map_sum``.
    task : callable
        ``task(item) -> (arrays, extra)``: a tuple of arrays of fixed shapes to sum, and any per-task
        value, which stays on the process that ran the task (picklable for a pool or MPI);
        ``task(shared, item)`` with ``shared``.
    items : sequence
        One task each (e.g. fixed blocks of particle rows).
    shared : object, optional
        A read-only context every task needs (per-particle tables, the image source): it reaches each
        pool worker once per round instead of once per task (``map_sum(..., shared=)``).
    total : ExactSum, optional
        The exact sum of the tasks ``items[:items_done]`` (resuming); None when starting.
    items_done : int
        Tasks already summed in ``total``; the run continues with ``items[items_done:]``.
    on_result : callable, optional
        ``on_result(extra)`` on the process that ran the task, in task order there (progress,
        per-particle values, 2D maps).
    on_round : callable, optional
        ``on_round(items_done, n_items, total)`` on every process after each round, ``total`` the
        :class:`~isavar.parallel.reduction.ExactSum` of the tasks done (checkpoints: save
        ``total.to_arrays()``).

    Returns
    -------
    list of numpy.ndarray or None
        The float64 (complex128) totals, identical on every process; None without any task.
    """
    bounds = round_bounds(len(items), processes=executor_processes(executor), start=int(items_done))
    for start, stop in bounds:
        part = executor.map_sum(task, items[start:stop], on_result=on_result, shared=shared, exact=True)
        if part is not None:
            total = part if total is None else total.merge(part)
        if on_round is not None:
            on_round(stop, len(items), total)
    return None if total is None else total.values()


def accumulators_from(totals, nx: int, npad: int, symmetry: str) -> list[FourierAccumulator]:
    """Accumulators holding summed ``(data, weights, data, weights, ...)`` totals (cast to their dtypes)."""
    out = []
    for k in range(0, len(totals), 2):
        acc = new_accumulator(nx, npad, symmetry)
        acc.data[...] = totals[k]
        acc.weights[...] = totals[k + 1]
        out.append(acc)
    return out


def resample_volume(volume: np.ndarray, size: int) -> np.ndarray:
    """Fourier-resample a cubic volume to ``size`` voxels per side (values preserved).

    The centred spectrum is cropped or zero-padded about the zero frequency and
    rescaled so that a constant volume keeps its value.

    Parameters
    ----------
    volume : numpy.ndarray
        ``(n, n, n)``.
    size : int
        New edge length.

    Returns
    -------
    numpy.ndarray
        ``(size, size, size)`` float32, centre ``size // 2``.
    """
    n = volume.shape[0]
    if size == n:
        return volume.astype(np.float32, copy=True)
    spec = np.fft.fftshift(np.fft.fftn(np.fft.ifftshift(volume.astype(np.float64))))
    out = np.zeros((size, size, size), np.complex128)
    m = min(n, size)
    src = slice(n // 2 - m // 2, n // 2 - m // 2 + m)
    dst = slice(size // 2 - m // 2, size // 2 - m // 2 + m)
    out[dst, dst, dst] = spec[src, src, src]
    res = np.fft.fftshift(np.fft.ifftn(np.fft.ifftshift(out))).real * (size / n) ** 3
    return res.astype(np.float32)


def spherical_mask(box: int, radius_px: float) -> np.ndarray:
    """Binary ball of ``radius_px`` about the centre ``box // 2`` (``(box,)*3`` bool)."""
    c = box // 2
    z, y, x = np.ogrid[0:box, 0:box, 0:box]
    return (z - c) ** 2 + (y - c) ** 2 + (x - c) ** 2 <= float(radius_px) ** 2


def default_mask_radius(box: int) -> float:
    """Default 3D mask radius: half the box minus 2 pixels."""
    return box / 2.0 - 2.0


def to_input_grid(volume: np.ndarray, grid: WorkingGrid, *, mask_radius_px: float = -1.0) -> np.ndarray:
    """Bring a working-grid volume to the input box and scale, then mask it (module notes).

    Parameters
    ----------
    volume : numpy.ndarray
        ``(nx, nx, nx)`` reconstruction on the working grid.
    grid : WorkingGrid
        The working grid.
    mask_radius_px : float
        Mask radius in input pixels; negative = :func:`default_mask_radius`.

    Returns
    -------
    numpy.ndarray
        ``(box, box, box)`` float32.
    """
    v = np.asarray(volume, np.float32)
    if grid.nx != grid.window:
        v = resample_volume(v, grid.window) * np.float32(grid.nx / grid.window)
    if grid.window != grid.box:
        out = np.zeros((grid.box,) * 3, np.float32)
        lo = grid.box // 2 - grid.window // 2
        sl = slice(lo, lo + grid.window)
        out[sl, sl, sl] = v
        v = out
    radius = default_mask_radius(grid.box) if mask_radius_px is None or mask_radius_px < 0 else mask_radius_px
    v = np.where(spherical_mask(grid.box, radius), v, np.float32(0)).astype(np.float32)
    return v


def finish(acc: FourierAccumulator, grid: WorkingGrid, *, mask_radius_px: float = -1.0) -> np.ndarray:
    """Finish an accumulator and return the volume on the input grid (masked)."""
    return to_input_grid(acc.finish(), grid, mask_radius_px=mask_radius_px)


def upsample_maps(maps: np.ndarray, grid: WorkingGrid, *, workers: int | None = None) -> np.ndarray:
    """Bring working-grid 2D maps to the input box (Fourier up-sampling, zero padding of a window).

    Parameters
    ----------
    maps : numpy.ndarray
        ``(k, nx, nx)``.
    grid : WorkingGrid
        The working grid.
    workers : int, optional
        FFT threads.

    Returns
    -------
    numpy.ndarray
        ``(k, box, box)`` float32 (pixel values on the input scale).
    """
    from isavar.core.fft import pad
    from isavar.variability.local_stats import upsample

    x = np.asarray(maps, np.float32)
    if grid.nx != grid.window:
        x = upsample(x, grid.window, workers=workers)
    if grid.window != grid.box:
        x = pad(x, grid.box)
    return np.asarray(x, np.float32)
