"""Compiled (numba) kernels of the polar aligner: cross-spectra, peak search, spectra averages.

Pure numerics on plain arrays, used by :mod:`isavar.core.align2d`. Every kernel has the NumPy
formulation it replaces next to its call site (the batched matrix products and vectorised peak search
of ``align2d``); the two agree to float32 rounding (``tests/core/test_align2d.py`` compares them).

Layouts (see :class:`isavar.core.align2d.PreparedReferences`):

* band spectra of image rows: per frequency band ``b`` a float32 array ``(rows, m_b, 2 * R_b)`` whose last
  axis interleaves (Re, Im) of the band's rings;
* band weights of references: per band float32 ``(m_b, 2 * R_b, n_refs * n_cols)``, columns reference-major,
  then (Re, Im) of the straight and, with ``n_cols = 4``, of the mirrored cross-spectrum.

Compiled with ``cache=True`` (the first call in a fresh environment compiles for a few seconds; later
processes load the cached machine code).
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["cross_spectra", "curve_peaks", "rotated_spectra_sum"]


@njit(cache=True, nogil=True, fastmath=True)
def _cross_spectra(src, extra, index, weights, m_lo, out):  # pragma: no cover - compiled
    n_rows = index.shape[0]
    n_bands = len(src)
    n_col = weights[0].shape[2]
    for q in range(n_rows):
        iq = index[q]
        for b in range(n_bands):
            w = weights[b]
            if iq >= 0:
                spec = src[b][iq]
            else:
                spec = extra[b][-iq - 1]
            m_b = w.shape[0]
            two_r = w.shape[1]
            m0 = m_lo[b]
            for m in range(m_b):
                sp = spec[m]
                wm = w[m]
                for c in range(0, n_col, 4):
                    a0 = np.float32(0.0)
                    a1 = np.float32(0.0)
                    a2 = np.float32(0.0)
                    a3 = np.float32(0.0)
                    for j in range(two_r):
                        v = sp[j]
                        a0 += v * wm[j, c]
                        a1 += v * wm[j, c + 1]
                        a2 += v * wm[j, c + 2]
                        a3 += v * wm[j, c + 3]
                    k = c >> 1
                    out[q, k, m0 + m, 0] = a0
                    out[q, k, m0 + m, 1] = a1
                    out[q, k + 1, m0 + m, 0] = a2
                    out[q, k + 1, m0 + m, 1] = a3


def cross_spectra(src, extra, index, weights, m_lo, n_freq):
    """Cross-spectra of image rows against prepared references, read straight from a spectra store.

    Parameters
    ----------
    src : tuple of float32 arrays ``(cap, m_b, 2 R_b)``
        Band spectra store (e.g. a :class:`~isavar.core.align2d.SpectraCache`).
    extra : tuple of float32 arrays ``(n_extra, m_b, 2 R_b)``
        Rows not in the store.
    index : (rows,) int64
        Row ``q`` reads ``src[b][index[q]]`` when ``index[q] >= 0``, else ``extra[b][-index[q] - 1]``.
    weights : tuple of float32 arrays ``(m_b, 2 R_b, n_col)``
        Reference band weights.
    m_lo : (n_bands,) int64
        First ring frequency of every band.
    n_freq : int
        ``maxrin // 2 + 1``.

    Returns
    -------
    numpy.ndarray
        complex64 ``(rows, n_col // 2, n_freq)``: per row and curve (reference-major; straight, mirror) the
        cross-spectrum whose inverse real FFT of length ``maxrin`` is the correlation curve.
    """
    n_col = weights[0].shape[2]
    out = np.zeros((index.shape[0], n_col // 2, n_freq, 2), np.float32)
    if n_col % 4:                                     # no mirror: pad the columns to a multiple of 4
        weights = tuple(np.concatenate([w, np.zeros_like(w)], axis=2) for w in weights)
        out = np.zeros((index.shape[0], n_col, n_freq, 2), np.float32)
    _cross_spectra(src, extra, np.ascontiguousarray(index, dtype=np.int64), weights,
                   np.ascontiguousarray(m_lo, dtype=np.int64), out)
    return out.view(np.complex64)[:, :n_col // 2, :, 0]


@njit(cache=True, nogil=True)
def _curve_peaks(curves, cols, peak, pos):  # pragma: no cover - compiled
    n_curves, maxrin = curves.shape
    n_cols = cols.shape[0]
    for q in range(n_curves):
        c = curves[q]
        if n_cols == 0:
            best = c[0]
            last = 0
            for k in range(1, maxrin):
                if c[k] >= best:
                    best = c[k]
                    last = k
            lin = 0.0
            quad = 0.0
            for d in range(-3, 4):
                v = np.float64(c[(last + d) % maxrin])
                lin += d * v
                quad += (d * d - 4.0) * v
            lin /= 28.0
            quad /= 84.0
            off = -lin / (2.0 * quad) if quad != 0.0 else 0.0
            peak[q] = best
            pos[q] = last + off
        else:
            best = c[cols[0]]
            last = 0
            for k in range(1, n_cols):
                v = c[cols[k]]
                if v >= best:
                    best = v
                    last = k
            peak[q] = best
            pos[q] = cols[last]


def curve_peaks(curves, cols=None):
    """Peak value and refined position of correlation curves (SPHIRE ``Crosrng_ms`` + ``prb1d``).

    Parameters
    ----------
    curves : (Q, maxrin) float32
        Correlation curves.
    cols : (n,) int array, optional
        Discrete-angle pass: only these samples are candidates and positions are not refined.

    Returns
    -------
    peak, pos : (Q,) float64
        Maximum (the *last* sample reaching it wins ties) and its position in samples, refined by the
        7-point least-squares parabola (:func:`isavar.core.align2d.peak_offset`).
    """
    curves = np.ascontiguousarray(curves, dtype=np.float32)
    peak = np.empty(curves.shape[0])
    pos = np.empty(curves.shape[0])
    c = np.zeros(0, np.int64) if cols is None else np.ascontiguousarray(cols, dtype=np.int64)
    _curve_peaks(curves, c, peak, pos)
    return peak, pos


@njit(cache=True, nogil=True)
def _rotated_sum(src, extra, index, m_lo, alpha, mirror, sums):  # pragma: no cover - compiled
    n_rows = index.shape[0]
    n_bands = len(src)
    for q in range(n_rows):
        iq = index[q]
        a = alpha[q]
        mir = mirror[q]
        for b in range(n_bands):
            if iq >= 0:
                spec = src[b][iq]
            else:
                spec = extra[b][-iq - 1]
            acc = sums[b]
            m_b, two_r = spec.shape
            for m in range(m_b):
                ang = -(m_lo[b] + m) * a
                cr = np.cos(ang)
                ci = np.sin(ang)
                for r in range(two_r // 2):
                    br = np.float64(spec[m, 2 * r])
                    bi = np.float64(spec[m, 2 * r + 1])
                    pr = cr * br - ci * bi            # exp(-i m a) B
                    pi = cr * bi + ci * br
                    acc[m, r, 0] += pr
                    if mir:
                        acc[m, r, 1] -= pi            # conj
                    else:
                        acc[m, r, 1] += pi


def rotated_spectra_sum(src, extra, index, m_lo, alpha_rad, mirror):
    """Sum over rows of band spectra rotated by ``alpha`` (``B(m) exp(-i m alpha)``, conjugated if mirrored).

    Parameters
    ----------
    src, extra, index, m_lo
        As :func:`cross_spectra`.
    alpha_rad : (rows,) float64
        Rotation of every row (radians).
    mirror : (rows,) bool
        Conjugate the rotated spectrum (x-mirror).

    Returns
    -------
    list of complex128 arrays ``(m_b, R_b)``
    """
    sums = [np.zeros((s.shape[1], s.shape[2] // 2, 2)) for s in src]
    _rotated_sum(src, extra, np.ascontiguousarray(index, dtype=np.int64),
                 np.ascontiguousarray(m_lo, dtype=np.int64), np.ascontiguousarray(alpha_rad, dtype=np.float64),
                 np.ascontiguousarray(mirror, dtype=np.bool_), tuple(sums))
    return [s.view(np.complex128)[..., 0] for s in sums]


@njit(cache=True, nogil=True)
def _polar_gather(images, image_index, cx, cy, dx, dy, ox, oy, pad, out):  # pragma: no cover - compiled
    n_c = image_index.shape[0]
    box = images.shape[1]
    box_p = box + 2 * pad
    n_s = dx.shape[0]
    ox_min, ox_max = ox.min(), ox.max()
    oy_min, oy_max = oy.min(), oy.max()
    x_hi = box_p - 1 - ox_max - 1e-6
    y_hi = box_p - 1 - oy_max - 1e-6
    n_kx = ox.shape[0]
    n_ky = oy.shape[0]
    for i in range(n_c):
        img = images[image_index[i]]
        xc = cx[i] + pad
        yc = cy[i] + pad
        for l in range(n_s):
            x = xc + dx[l]
            y = yc + dy[l]
            if x < -ox_min:
                x = -ox_min
            elif x > x_hi:
                x = x_hi
            if y < -oy_min:
                y = -oy_min
            elif y > y_hi:
                y = y_hi
            x0 = np.floor(x)
            y0 = np.floor(y)
            u = np.float32(x - x0)
            v = np.float32(y - y0)
            ix0 = int(x0) - pad
            iy0 = int(y0) - pad
            for a in range(n_ky):
                r0 = min(max(iy0 + oy[a], 0), box - 1)
                r1 = min(max(iy0 + oy[a] + 1, 0), box - 1)
                for b in range(n_kx):
                    c0 = min(max(ix0 + ox[b], 0), box - 1)
                    c1 = min(max(ix0 + ox[b] + 1, 0), box - 1)
                    g00 = img[r0, c0]
                    g01 = img[r0, c1]
                    g10 = img[r1, c0]
                    g11 = img[r1, c1]
                    top = (g01 - g00) * u + g00
                    bot = (g11 - g10) * u + g10
                    out[i, a, b, l] = (bot - top) * v + top


def polar_gather(images, image_index, cx, cy, dx, dy, ox, oy, pad, out):
    """Bilinear polar samples (the arithmetic of :func:`isavar.core.polar._gather_polar_numpy`, element by element).

    Parameters
    ----------
    images : (n, N, N) float32
    image_index : (c,) int64
    cx, cy : (c,) float64
        Sampling centres (pixels).
    dx, dy : (L,) float64
        Sample offsets of the rings.
    ox, oy : (kx,), (ky,) int64
        Integer offsets added to every centre.
    pad : int
        Edge-replication margin of the reference formulation (coordinates are clipped as on a padded image).
    out : (c, ky, kx, L) float32
    """
    _polar_gather(images, np.ascontiguousarray(image_index, dtype=np.int64), np.ascontiguousarray(cx, np.float64),
                  np.ascontiguousarray(cy, np.float64), dx, dy, np.ascontiguousarray(ox, np.int64),
                  np.ascontiguousarray(oy, np.int64), int(pad), out)
    return out


@njit(cache=True, nogil=True)
def _curve_peaks_t(corr, cols, peak, pos):  # pragma: no cover - compiled
    maxrin, n_q = corr.shape
    n_cols = cols.shape[0]
    last = np.zeros(n_q, np.int64)
    if n_cols == 0:
        for q in range(n_q):
            peak[q] = corr[0, q]
        for k in range(1, maxrin):
            row = corr[k]
            for q in range(n_q):
                if row[q] >= peak[q]:
                    peak[q] = row[q]
                    last[q] = k
        for q in range(n_q):
            lk = last[q]
            lin = 0.0
            quad = 0.0
            for d in range(-3, 4):
                v = np.float64(corr[(lk + d) % maxrin, q])
                lin += d * v
                quad += (d * d - 4.0) * v
            lin /= 28.0
            quad /= 84.0
            pos[q] = lk + (-lin / (2.0 * quad) if quad != 0.0 else 0.0)
    else:
        for q in range(n_q):
            peak[q] = corr[cols[0], q]
        for k in range(1, n_cols):
            row = corr[cols[k]]
            for q in range(n_q):
                if row[q] >= peak[q]:
                    peak[q] = row[q]
                    last[q] = k
        for q in range(n_q):
            pos[q] = cols[last[q]]


def curve_peaks_t(corr, cols=None):
    """:func:`curve_peaks` for curves stored along axis 0, ``corr`` (maxrin, Q) float32 (C order)."""
    corr = np.ascontiguousarray(corr, dtype=np.float32)
    peak = np.empty(corr.shape[1], np.float32)
    pos = np.empty(corr.shape[1])
    c = np.zeros(0, np.int64) if cols is None else np.ascontiguousarray(cols, dtype=np.int64)
    _curve_peaks_t(corr, c, peak, pos)
    return peak.astype(np.float64), pos
