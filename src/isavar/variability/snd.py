"""``--SND``: squared normalised differences to reprojections (spec §3.13, SPARX 2013-2015).

1. Reconstruct one volume ``V`` from all (preprocessed, re-centred) images at
   their full orientations (CTF-weighted with ``--CTF``).
2. For each image ``y_j``: reprojection ``r_j = P_{A_j} V`` (times the image's
   CTF with ``--CTF``); inside the disc of radius ``nx // 2 - 2`` fit
   ``y_j ~ a r_j + b`` by least squares and form ``d_j = a r_j + b - y_j``
   (0 outside the disc).
3. Reconstruct the maps ``d_j^2`` at the images' own orientations -> var3D;
   ``V`` is returned as ave3D.

"Normalised" refers to the linear fit, not to a division by a noise variance.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pandas as pd

from isavar._progress import NullProgress
from isavar.core.masks import circular_mask
from isavar.variability import local_stats as ls
from isavar.variability import volume as vol
from isavar.variability.params import VariabilityParams
from isavar.variability.result import VariabilityResult


@dataclasses.dataclass(frozen=True)
class _SndContext:
    """What every task needs (picklable; reaches each worker once per round of tasks).

    Attributes
    ----------
    params : VariabilityParams
    geometry : ParticleGeometry
        Orientations, origins (px) and CTF parameters of every particle.
    grid : WorkingGrid
    images : LazyImages or ndarray, (N, box, box)
    reference : ndarray, (nx, nx, nx) or None
        The reconstruction ``V`` (second pass only).
    """

    params: VariabilityParams
    geometry: object
    grid: object
    images: object
    reference: np.ndarray | None = None


def _prepared(ctx: _SndContext, rows):
    p, geo, grid = ctx.params, ctx.geometry, ctx.grid
    return ls.prepare_images(ctx.images[rows], geo.origins_px[rows], grid, normalize=p.normalize,
                             lowpass_fl=p.lowpass_fl, lowpass_aa=p.lowpass_aa)


def _ctf_full(ctx: _SndContext, rows):
    from isavar.core.ctf import ctf_2d

    c, grid = ctx.geometry.ctf, ctx.grid
    return ctf_2d(grid.nx, grid.working_pixel_size_A, **{k: c[k][rows] for k in c})


def _reference_task(ctx: _SndContext, rows):
    p, geo, grid = ctx.params, ctx.geometry, ctx.grid
    acc = vol.new_accumulator(grid.nx, p.npad, p.symmetry)
    ctf = _ctf_full(ctx, rows) if p.ctf else None
    acc.insert(_prepared(ctx, rows), geo.rotations[rows], ctf=ctf)
    return (acc.data, acc.weights), None


def _difference_task(ctx: _SndContext, rows):
    from isavar.core.projection import Projector

    p, geo, grid = ctx.params, ctx.geometry, ctx.grid
    images = _prepared(ctx, rows)
    ref = Projector(ctx.reference, npad=2).project(geo.rotations[rows])
    if p.ctf:
        ref = np.fft.ifft2(np.fft.fft2(ref) * _ctf_full(ctx, rows)).real.astype(np.float32)
    inside = circular_mask(grid.nx, grid.nx // 2 - 2) > 0.5
    r, y = ref[:, inside].astype(np.float64), images[:, inside].astype(np.float64)
    rm, ym = r.mean(1, keepdims=True), y.mean(1, keepdims=True)
    var_r = ((r - rm) ** 2).sum(1, keepdims=True)
    a = np.where(var_r > 0, ((r - rm) * (y - ym)).sum(1, keepdims=True) / np.where(var_r > 0, var_r, 1), 0.0)
    b = ym - a * rm
    d = np.zeros_like(images)
    d[:, inside] = (a * r + b - y).astype(np.float32)
    acc = vol.new_accumulator(grid.nx, p.npad, p.symmetry)
    acc.insert(d * d, geo.rotations[rows])
    return (acc.data, acc.weights), None


def _accumulate(executor, task, ctx, chunks, grid, params, progress, name):
    """Exact sums of ``task(ctx, chunk)``'s accumulators (:func:`isavar.variability.volume.accumulate_rounds`)."""
    progress.stage(name, total=len(chunks))
    totals = vol.accumulate_rounds(executor, task, chunks, shared=ctx, on_result=lambda _: progress.advance())
    progress.close()
    return vol.accumulators_from(totals, grid.nx, params.npad, params.symmetry)[0]


def squared_normalised_differences(table: pd.DataFrame, images, params: VariabilityParams, *, pixel_size_A: float,
                                   executor=None, progress=None, source=None) -> VariabilityResult:
    """``--SND`` variability volume (module notes).

    Parameters
    ----------
    table, images, params, pixel_size_A, executor, progress, source
        As for :func:`isavar.variability.run.variability`.

    Returns
    -------
    VariabilityResult
        ``var3d`` = reconstruction of the squared differences, ``ave3d`` = the reference ``V``.
    """
    from isavar.parallel.serial import SerialExecutor
    from isavar.variability.run import choose_grid, particle_geometry

    executor = executor or SerialExecutor()
    progress = progress or NullProgress()
    t0 = time.perf_counter()
    n, box = len(images), int(images.shape[-1])
    geo = particle_geometry(table, pixel_size_A, need_ctf=params.ctf, source=source)
    grid = choose_grid(box, pixel_size_A, params)
    ctx = _SndContext(params=params, geometry=geo, grid=grid, images=images)
    from isavar.variability.run import BLOCK          # fixed blocks: the sums do not depend on chunk_size

    chunks = vol.file_order_chunks(images, BLOCK)
    acc = _accumulate(executor, _reference_task, ctx, chunks, grid, params, progress,
                      "reference")
    reference = acc.finish()
    ctx = dataclasses.replace(ctx, reference=reference)
    acc2 = _accumulate(executor, _difference_task, ctx, chunks, grid, params, progress,
                       "differences")
    var3d = vol.finish(acc2, grid, mask_radius_px=params.mask_radius_px)
    ave3d = vol.to_input_grid(reference, grid, mask_radius_px=params.mask_radius_px)
    t1 = time.perf_counter()
    return VariabilityResult(var3d=var3d, ave3d=ave3d, pixel_size_A=float(pixel_size_A), working_box=grid.nx,
                             n_particles=n, n_groups=0, timings_s={"total": t1 - t0})
