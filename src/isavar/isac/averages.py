"""Class averages: working-scale stable-member averages and full-resolution CTF-weighted averages.

Spec isac2 §8.1 (the averages ISAC2 writes are the generations' stable-member
averages, see :mod:`isavar.isac.generation`) and §8.3 (SPHIRE's
``sp_compute_isac_avg.py``: original images, pre-alignment shift combined with
the ISAC parameters, CTF-weighted sums).
"""

from __future__ import annotations

import numpy as np

from isavar.isac import _ops


def _centred_ctf_squared(table, rows, box, apix) -> np.ndarray:
    from isavar.core.ctf import ctf_2d, ctf_params_from_table

    kw = ctf_params_from_table(table, rows)
    kw["bfactor_A2"] = np.zeros(len(rows))
    ctf = ctf_2d(box, apix, rfft=False, **kw)
    return ctf, np.fft.fftshift(ctf.astype(np.float32) ** 2, axes=(-2, -1))


def fullres_averages(stack, result, params, p, *, chunk: int = 1024, eps_fraction: float = 1e-3) -> np.ndarray:
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
        Images read at a time.
    eps_fraction : float
        ``sum CTF^2`` is floored at this fraction of its maximum per class (numerical guard).

    Returns
    -------
    ndarray, (C, box, box) float32
        In class-index order (acceptance order). With CTF: ``F^-1[sum_i R_i(CTF_i F_i) / sum_i R_i(CTF_i^2)]``
        (the CTF-squared images rotated/mirrored like the images; no SNR term, as SPHIRE); without CTF: the mean.
    """
    c = result.n_classes
    box = stack.images.box
    cls_of = result.class_of(len(stack.table))
    sums = np.zeros((c, box, box), np.float64)
    wsum = np.zeros((c, box, box), np.float64) if p.CTF else None
    counts = np.zeros(c, np.int64)
    apix = stack.pixel_size_A
    members = np.flatnonzero(cls_of >= 0)
    for s in range(0, len(members), chunk):
        rows = members[s:s + chunk]
        imgs = stack.images[rows]
        k = cls_of[rows]
        if p.CTF:
            ctf, c2 = _centred_ctf_squared(stack.table, rows, box, apix)
            imgs = np.fft.ifft2(np.fft.fft2(imgs) * ctf).real.astype(np.float32)
            rot = params[rows].copy()
            rot[:, 1:3] = 0.0
            np.add.at(wsum, k, _ops.transform(c2, rot, interpolation="linear"))
        moved = _ops.transform(imgs, params[rows])
        np.add.at(sums, k, moved)
        counts += np.bincount(k, minlength=c)
    if not p.CTF:
        return (sums / np.maximum(counts, 1)[:, None, None]).astype(np.float32)
    denom = np.fft.ifftshift(wsum, axes=(-2, -1))
    floor = eps_fraction * denom.reshape(c, -1).max(axis=1)[:, None, None]
    spec = np.fft.fft2(sums) / np.maximum(denom, np.maximum(floor, 1e-12))
    return np.fft.ifft2(spec).real.astype(np.float32)
