"""Compiled (numba) projection and back-projection kernels of the covariance EM.

The same trilinear geometry as :meth:`SliceSampler.geometry` (central-slice position
``q = kx A[0] + ky A[1]`` in padded units, ``qx < 0`` folded to ``-q`` with the value conjugated,
clipped a hair inside the storage, 8 corners), computed on the fly for each sample instead of
materialising ``(8, c * S)`` index and weight arrays:

* :func:`gather_slices` is :meth:`SliceSampler.gather` (the projector) for a batch of rotations;
* :func:`scatter_moments` back-projects the M-step quantities of a batch without forming them:
  ``u[i, s] zz[i, p]`` (real, ``P`` pairs) and ``g[i, s] zhat[i, a]`` (complex, ``J`` latents),
  accumulated in float64 into ``(n_band, P)`` / ``(n_band, J)`` arrays, one pass over the samples.

The NumPy formulations (:meth:`SliceSampler.geometry`, ``gather``, ``scatter``) stay in
:mod:`isavar.covariance.sampling`; the tests compare both. Loops run in a fixed order, so results
are deterministic. Compiled with ``cache=True``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["gather_slices", "scatter_moments"]


@njit(cache=True, nogil=True, inline="always")
def _position(rot, i, kx, ky, lim):  # pragma: no cover - compiled
    """Folded, clipped position of sample ``(kx, ky)`` of image ``i``: (qx, qy, qz, sign)."""
    qx = kx * rot[i, 0, 0] + ky * rot[i, 1, 0]
    qy = kx * rot[i, 0, 1] + ky * rot[i, 1, 1]
    qz = kx * rot[i, 0, 2] + ky * rot[i, 1, 2]
    sign = 1.0
    if qx < 0:
        qx, qy, qz, sign = -qx, -qy, -qz, -1.0
    qx = min(max(qx, 0.0), lim)
    qy = min(max(qy, -lim), lim)
    qz = min(max(qz, -lim), lim)
    return qx, qy, qz, sign


@njit(cache=True, nogil=True, inline="always")
def _band_index(row_start, row_len, r, iz, iy, ix):  # pragma: no cover - compiled
    """Band (compact) index of storage voxel ``(iz, iy, ix)`` (centred indices), -1 outside the band."""
    row = (iz + r) * (2 * r + 1) + (iy + r)
    if ix >= row_len[row]:
        return -1
    return row_start[row] + ix


@njit(cache=True, nogil=True, inline="always")
def _corners(row_start, row_len, r, qx, qy, qz, idx, wt):  # pragma: no cover - compiled
    """The 8 trilinear neighbours of ``(qx, qy, qz)``: band indices (-1 outside the band) and float32 weights.

    Order ``dz``, ``dy``, ``dx`` (outer to inner), which fixes the order of the accumulations.
    """
    fx, fy, fz = np.floor(qx), np.floor(qy), np.floor(qz)
    tx, ty, tz = np.float32(qx - fx), np.float32(qy - fy), np.float32(qz - fz)
    iz, iy, ix = np.int64(fz), np.int64(fy), np.int64(fx)
    c = 0
    for dz in range(2):
        wz = tz if dz else np.float32(1.0) - tz
        for dy in range(2):
            wy = ty if dy else np.float32(1.0) - ty
            for dx in range(2):
                wx = tx if dx else np.float32(1.0) - tx
                idx[c] = _band_index(row_start, row_len, r, iz + dz, iy + dy, ix + dx)
                wt[c] = wx * wy * wz
                c += 1


@njit(cache=True, nogil=True)
def gather_slices(stores, row_start, row_len, r, rot, k2, lim, out):  # pragma: no cover - compiled
    """Central-slice samples of ``V`` volumes for ``c`` images.

    Parameters
    ----------
    stores : (n_band, V) complex64
        Band values of the volumes.
    row_start, row_len : (R2 * R2,) int64, int64
        Band index of the first voxel (``qx = 0``) of each storage row ``(qz, qy)`` (row-major,
        ``R2 = 2 r + 1``) and the number of band voxels in it (the band is a half ball: each
        row holds ``qx = 0 .. row_len - 1``). A table of rows instead of a per-voxel map stays in cache.
    r : int
        Storage radius (``qy, qz`` in ``-r .. r``).
    rot : (c, 3, 3) float32
        Projection matrices.
    k2 : (S, 2) float32
        Sample frequencies in padded units.
    lim : float
        Clip limit (storage radius minus a hair).
    out : (c, S, V) complex64
        Filled with the samples.
    """
    c = rot.shape[0]
    n_s = k2.shape[0]
    n_v = stores.shape[1]
    idx = np.empty(8, np.int64)
    wt = np.empty(8, np.float32)
    for i in range(c):
        for s in range(n_s):
            qx, qy, qz, sign = _position(rot, i, k2[s, 0], k2[s, 1], lim)
            _corners(row_start, row_len, r, qx, qy, qz, idx, wt)
            for v in range(n_v):
                out[i, s, v] = 0
            for k in range(8):
                if idx[k] < 0:
                    continue
                for v in range(n_v):
                    out[i, s, v] += wt[k] * stores[idx[k], v]
            if sign < 0:
                for v in range(n_v):
                    out[i, s, v] = np.conj(out[i, s, v])


@njit(cache=True, nogil=True)
def scatter_moments(u, zz, g, zhat, row_start, row_len, r, rot, k2, lim, h_out, b_out):  # pragma: no cover
    """Back-project ``u[i, s] zz[i, p]`` into ``h_out[:, p]`` and ``g[i, s] zhat[i, a]`` into ``b_out[:, a]``.

    Parameters
    ----------
    u : (c, S) float32
        Real per-sample weights (``|C|^2 / sigma^2``).
    zz : (c, P) float64
        Per-image pair moments.
    g : (c, S) complex64
        Complex per-sample values (``C T / sigma^2``), conjugated where the sample is folded.
    zhat : (c, J) float64
        Per-image latent means.
    row_start, row_len, r, rot, k2, lim
        As :func:`gather_slices`.
    h_out : (n_band, P) float64
        Accumulated in place.
    b_out : (n_band, J) complex128
        Accumulated in place.
    """
    c = rot.shape[0]
    n_s = k2.shape[0]
    n_p = zz.shape[1]
    n_j = zhat.shape[1]
    hv = np.empty(n_p)
    bv = np.empty(n_j, np.complex128)
    idx = np.empty(8, np.int64)
    wt = np.empty(8, np.float32)
    for i in range(c):
        for s in range(n_s):
            qx, qy, qz, sign = _position(rot, i, k2[s, 0], k2[s, 1], lim)
            _corners(row_start, row_len, r, qx, qy, qz, idx, wt)
            us = np.float64(u[i, s])
            gs = np.complex128(g[i, s])
            if sign < 0:
                gs = np.conj(gs)
            for p in range(n_p):
                hv[p] = us * zz[i, p]
            for a in range(n_j):
                bv[a] = gs * zhat[i, a]
            for k in range(8):
                if idx[k] < 0:
                    continue
                w = np.float64(wt[k])
                for p in range(n_p):
                    h_out[idx[k], p] += w * hv[p]
                for a in range(n_j):
                    b_out[idx[k], a] += w * bv[a]


@njit(cache=True, nogil=True)
def spd_solve(mat, rhs, out):  # pragma: no cover - compiled
    """Solve ``mat[v] x = rhs[v]`` for many small symmetric positive definite matrices (Cholesky).

    Parameters
    ----------
    mat : (n, J, J) float64
        Symmetric matrices (only the lower triangle is read).
    rhs : (n, J) complex128
        Right-hand sides.
    out : (n, J) complex128
        Solutions (left untouched where the matrix is not positive definite).

    Returns
    -------
    numpy.ndarray
        ``(n,)`` bool, True where the factorisation failed (the caller solves those otherwise).
    """
    n = mat.shape[0]
    j = mat.shape[1]
    low = np.empty((j, j))
    y = np.empty(j, np.complex128)
    bad = np.zeros(n, np.bool_)
    for v in range(n):
        ok = True
        for a in range(j):
            for b in range(a + 1):
                s = mat[v, a, b]
                for c in range(b):
                    s -= low[a, c] * low[b, c]
                if a == b:
                    if not s > 0.0:
                        ok = False
                        break
                    low[a, a] = np.sqrt(s)
                else:
                    low[a, b] = s / low[b, b]
            if not ok:
                break
        if not ok:
            bad[v] = True
            continue
        for a in range(j):
            t = rhs[v, a]
            for c in range(a):
                t -= low[a, c] * y[c]
            y[a] = t / low[a, a]
        for a in range(j - 1, -1, -1):
            t = y[a]
            for c in range(a + 1, j):
                t -= low[c, a] * out[v, c]
            out[v, a] = t / low[a, a]
    return bad
