"""Class averages: working-scale stable-member averages and full-resolution CTF-weighted averages.

Spec isac2 §8.1 (the averages ISAC2 writes are the generations' stable-member
averages, see :mod:`isavar.isac.generation`) and §8.3 (SPHIRE's
``sp_compute_isac_avg.py``: original images, pre-alignment shift combined with
the ISAC parameters, CTF-weighted sums).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from isavar.isac import _ops


def _centred_ctf_squared(table, rows, box, apix) -> np.ndarray:
    from isavar.core.ctf import ctf_2d, ctf_params_from_table

    kw = ctf_params_from_table(table, rows)
    kw["bfactor_A2"] = np.zeros(len(rows))
    ctf = ctf_2d(box, apix, rfft=False, **kw)
    return ctf, np.fft.fftshift(ctf.astype(np.float32) ** 2, axes=(-2, -1))


@dataclass(frozen=True)
class FullresChunk:
    """One task of :func:`fullres_averages`: a chunk of class members (picklable, sent to workers).

    Attributes
    ----------
    images : ndarray, (m, box, box)
        The members' original images.
    table : pandas.DataFrame or None
        Their particle-table rows (CTF columns; None without ``--CTF``).
    rows : ndarray of int, (m,)
        Positions of the members in ``table``.
    classes : ndarray of int, (m,)
        Class index of each member.
    params : ndarray, (m, 4)
        Parameters taking each image into its class frame (original pixels).
    n_classes : int
    ctf : bool
        Weight by the CTF (``--CTF``).
    pixel_size_A : float or None
    """

    images: np.ndarray
    table: object
    rows: np.ndarray
    classes: np.ndarray
    params: np.ndarray
    n_classes: int
    ctf: bool
    pixel_size_A: float | None


def _fullres_chunk(task: FullresChunk):
    """Per-class sums of one chunk of members: ``((sums, counts[, CTF^2 sums]), None)`` (a map_sum task)."""
    import scipy.fft

    imgs, table, rows, k = np.asarray(task.images, np.float32), task.table, task.rows, task.classes
    params, c, ctf_on, apix = task.params, task.n_classes, task.ctf, task.pixel_size_A
    box = imgs.shape[-1]
    wsum = None
    if ctf_on:
        ctf, c2 = _centred_ctf_squared(table, rows, box, apix)
        # the CTF is even in k, so the half-plane transforms give the full ones' real part (to rounding)
        half = ctf[..., :box // 2 + 1].astype(np.float32)
        imgs = scipy.fft.irfft2(scipy.fft.rfft2(imgs) * half, s=(box, box)).astype(np.float32)
        rot = params.copy()
        rot[:, 1:3] = 0.0
        wsum = _ops.group_sums(_ops.transform(c2, rot, interpolation="linear"), k, c)
    sums = _ops.group_sums(_ops.transform(imgs, params), k, c)
    counts = np.bincount(k, minlength=c).astype(np.float64)
    return ((sums, counts) if wsum is None else (sums, counts, wsum)), None


#: The exact sums are reduced for at most this many bytes of accumulator at a time (classes in blocks).
SUM_BLOCK_BYTES = 64 << 20


def fullres_averages(stack, result, params, p, *, chunk: int = 1024, eps_fraction: float = 1e-3,
                     executor=None) -> np.ndarray:
    """Full-size class averages from the original images (CTF-weighted with ``--CTF``).

    Parameters
    ----------
    stack : ParticleStack
        The input particles (``.images``, ``.table``, ``.pixel_size_A``).
    result : Isac2Result
        Memberships.
    params : ndarray, (N, 4)
        Parameters taking each original image into its class frame (original pixels).
    p : Isac2Params
    chunk : int
        Members per task (in input order within a block of classes).
    eps_fraction : float
        ``sum CTF^2`` is floored at this fraction of its maximum per class (numerical guard).
    executor : Executor, optional
        Runs the chunks (serial, pool or MPI: every process makes the call, each reads only the images of its
        tasks). The sums are exact and order-independent (:meth:`map_sum`), so the answer does not depend on
        it; classes are summed in blocks whose accumulator stays below :data:`SUM_BLOCK_BYTES`.

    Returns
    -------
    ndarray, (C, box, box) float32
        In class-index order (acceptance order). With CTF: ``F^-1[sum_i R_i(CTF_i F_i) / sum_i R_i(CTF_i^2)]``
        (the CTF-squared images rotated/mirrored like the images; no SNR term, as SPHIRE); without CTF: the mean.
    """
    from isavar.isac.working import PickRows
    from isavar.parallel.serial import SerialExecutor

    executor = executor or SerialExecutor()
    c = result.n_classes
    box = stack.images.box
    cls_of = result.class_of(len(stack.table))
    apix = stack.pixel_size_A
    members = np.flatnonzero(cls_of >= 0)
    per_class = 24 * box * box * (2 if p.CTF else 1)
    block = max(1, SUM_BLOCK_BYTES // per_class)
    out = np.zeros((c, box, box), np.float32)
    for k0 in range(0, c, block):
        k1 = min(c, k0 + block)
        mine = members[(cls_of[members] >= k0) & (cls_of[members] < k1)]

        def tasks(mine=mine, k0=k0, k1=k1):
            for s in range(0, len(mine), chunk):
                rows = mine[s:s + chunk]
                yield FullresChunk(images=PickRows(stack.images, rows),
                                   table=stack.table.iloc[rows] if p.CTF else None,
                                   rows=np.arange(len(rows)), classes=cls_of[rows] - k0, params=params[rows],
                                   n_classes=k1 - k0, ctf=bool(p.CTF), pixel_size_A=apix)

        total = executor.map_sum(_fullres_chunk, tasks())
        if total is None:
            continue
        sums, counts = total[0], total[1]
        if not p.CTF:
            out[k0:k1] = (sums / np.maximum(counts, 1)[:, None, None]).astype(np.float32)
            continue
        wsum = total[2]
        denom = np.fft.ifftshift(wsum, axes=(-2, -1))
        floor = eps_fraction * denom.reshape(k1 - k0, -1).max(axis=1)[:, None, None]
        spec = np.fft.fft2(sums) / np.maximum(denom, np.maximum(floor, 1e-12))
        out[k0:k1] = np.fft.ifft2(spec).real.astype(np.float32)
    return out
