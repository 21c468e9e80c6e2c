"""Compiled (numba) kernels: bilinear polar sampling, the correlation peak search, the band copy of ring spectra,
the image transform (bilinear or quadratic interpolation) and the CTF phase on a frequency grid.

Pure numerics on plain arrays, used by :mod:`isavar.core.polar`, :mod:`isavar.core.align2d` and
:mod:`isavar.core.transform2d`. The NumPy formulations they replace stay in those modules
(``polar._gather_polar_numpy``; the vectorised peak search of ``align2d._curves_peaks`` with
``align2d.USE_KERNELS = False``; the interpolations of ``transform2d`` with ``transform2d.USE_KERNELS = False``;
``ctf.ctf_at`` for the CTF)
and the tests compare both: the polar samples and transformed images are bitwise equal, the peaks equal up to
the last bit of a float64 sum.

The correlation products themselves stay batched BLAS matrix products: a numba loop over the short ring
axes (18-58 terms) measured 1.5-3x slower than OpenBLAS's batched ``sgemm`` for one reference.

Compiled with ``cache=True`` (the first call in a fresh environment compiles for a few seconds; later
processes load the cached machine code).
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["polar_gather", "curve_peaks_t", "to_bands", "rot_shift", "ctf_phase", "preload"]


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
    single = n_kx == 1 and n_ky == 1 and pad == 0
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
            if single:                           # one trial centre inside the image: no clamping needed
                r = iy0 + oy[0]
                c = ix0 + ox[0]
                g00 = img[r, c]
                g10 = img[r + 1, c]
                top = (img[r, c + 1] - g00) * u + g00
                bot = (img[r + 1, c + 1] - g10) * u + g10
                out[i, 0, 0, l] = (bot - top) * v + top
                continue
            if pad == 0:                         # every pixel read lies inside the image
                for a in range(n_ky):
                    r = iy0 + oy[a]
                    for b in range(n_kx):
                        c = ix0 + ox[b]
                        g00 = img[r, c]
                        g10 = img[r + 1, c]
                        top = (img[r, c + 1] - g00) * u + g00
                        bot = (img[r + 1, c + 1] - g10) * u + g10
                        out[i, a, b, l] = (bot - top) * v + top
                continue
            for a in range(n_ky):
                r0 = min(max(iy0 + oy[a], 0), box - 1)
                r1 = min(max(iy0 + oy[a] + 1, 0), box - 1)
                for b in range(n_kx):
                    c0 = min(max(ix0 + ox[b], 0), box - 1)
                    c1 = min(max(ix0 + ox[b] + 1, 0), box - 1)
                    g00 = img[r0, c0]
                    g10 = img[r1, c0]
                    top = (img[r0, c1] - g00) * u + g00
                    bot = (img[r1, c1] - g10) * u + g10
                    out[i, a, b, l] = (bot - top) * v + top


def polar_gather(images, image_index, cx, cy, dx, dy, ox, oy, pad, out):
    """Bilinear polar samples (the arithmetic of :func:`isavar.core.polar._gather_polar_numpy`, element by element).

    Integer offsets share the bilinear weights of a sample. Without a margin (``pad = 0``: every trial centre
    with its rings lies inside the image) no pixel index needs clamping.

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


@njit(cache=True, nogil=True)
def _to_bands(spectra, ring_start, m_lo, m_hi, band_ring, outs):  # pragma: no cover - compiled
    for k in range(len(outs)):
        out = outs[k]
        for g in range(len(spectra)):
            spec = spectra[g]
            n_rows, n_r, _n_m = spec.shape
            off = ring_start[g] - band_ring[k]
            if off < 0:
                continue                                   # the group's rings lie inside the band's first ring
            for q in range(n_rows):
                for r in range(n_r):
                    for m in range(m_lo[k], m_hi[k]):
                        v = spec[q, r, m]
                        out[q, m - m_lo[k], 2 * (off + r)] = v.real
                        out[q, m - m_lo[k], 2 * (off + r) + 1] = v.imag


def to_bands(spectra, ring_start, bands, outs):
    """Copy ring spectra into the frequency-band layout of the aligner, every band in one call.

    Parameters
    ----------
    spectra : sequence of complex64 arrays (rows, rings_g, freqs_g)
        Ring spectra per group of equal-length rings.
    ring_start : (n_groups,) int
        First ring (index) of every group.
    bands : sequence of (m_lo, m_hi, first_ring)
        Frequencies ``m_lo:m_hi`` of a band and its first ring; its rings run from there to the last.
    outs : sequence of float32 arrays (rows, m_hi - m_lo, 2 * band_rings)
        Filled with (Re, Im) interleaved per ring.
    """
    spectra = tuple(np.ascontiguousarray(x, np.complex64) for x in spectra)
    bands = np.asarray(bands, dtype=np.int64).reshape(-1, 3)
    _to_bands(spectra, np.asarray(ring_start, np.int64), np.ascontiguousarray(bands[:, 0]),
              np.ascontiguousarray(bands[:, 1]), np.ascontiguousarray(bands[:, 2]), tuple(outs))


@njit(cache=True, nogil=True)
def _wrap(i, n):  # pragma: no cover - compiled
    # i mod n for the (rare) indices outside [0, n): an integer division only where it is needed
    if i < 0 or i >= n:
        return i % n
    return i


@njit(cache=True, nogil=True)
def _rot_shift(stack, cos_a, sin_a, sx, sy, mirror, border, quadratic, out):  # pragma: no cover - compiled
    n, ny, nx = stack.shape
    cy, cx = ny // 2, nx // 2
    fcx, fcy = np.float32(cx), np.float32(cy)
    half, one = np.float32(0.5), np.float32(1.0)
    flipped = np.empty(nx, np.int64)                   # output column of input column ix under the mirror
    for ix in range(nx):
        flipped[ix] = _wrap(2 * cx - ix, nx)
    dxs = np.empty(nx, np.float32)
    for k in range(n):
        img = stack[k]
        c, s = cos_a[k], sin_a[k]
        mirrored = mirror[k] == 1
        for ix in range(nx):
            dxs[ix] = np.float32((ix - cx) - sx[k])
        for iy in range(ny):
            dy = np.float32((iy - cy) - sy[k])
            dys = dy * s
            dyc = dy * c
            for ix in range(nx):
                dx = dxs[ix]
                xs = dx * c - dys + fcx
                ys = dx * s + dyc + fcy
                bx = np.float32(np.floor(xs))
                by = np.float32(np.floor(ys))
                fx = xs - bx
                fy = ys - by
                col = flipped[ix] if mirrored else ix
                if bx >= 1 and bx <= nx - 2 and by >= 1 and by <= ny - 2:
                    # interior: every neighbour lies inside and the sample is inside (no wrap, no border test)
                    i = int(bx)
                    j = int(by)
                    f0 = img[j, i]
                    if quadratic:
                        c1 = img[j, i + 1] - f0
                        c2 = (c1 - f0 + img[j, i - 1]) * half
                        c3 = img[j + 1, i] - f0
                        c4 = (c3 - f0 + img[j - 1, i]) * half
                        c5 = img[j + 1, i + 1] - f0 - c1 - c3
                        out[k, iy, col] = f0 + fx * (c1 + (fx - one) * c2 + fy * c5) + fy * (c3 + (fy - one) * c4)
                    else:
                        top = f0 + fx * (img[j, i + 1] - f0)
                        f10 = img[j + 1, i]
                        bottom = f10 + fx * (img[j + 1, i + 1] - f10)
                        out[k, iy, col] = top + fy * (bottom - top)
                    continue
                i = _wrap(int(bx), nx)
                j = _wrap(int(by), ny)
                ip = i + 1 if i + 1 < nx else i + 1 - nx
                jp = j + 1 if j + 1 < ny else j + 1 - ny
                f0 = img[j, i]
                if quadratic:
                    im = i - 1 if i >= 1 else i - 1 + nx
                    jm = j - 1 if j >= 1 else j - 1 + ny
                    c1 = img[j, ip] - f0
                    c2 = (c1 - f0 + img[j, im]) * half
                    c3 = img[jp, i] - f0
                    c4 = (c3 - f0 + img[jm, i]) * half
                    c5 = img[jp, ip] - f0 - c1 - c3
                    v = f0 + fx * (c1 + (fx - one) * c2 + fy * c5) + fy * (c3 + (fy - one) * c4)
                else:
                    top = f0 + fx * (img[j, ip] - f0)
                    f10 = img[jp, i]
                    bottom = f10 + fx * (img[jp, ip] - f10)
                    v = top + fy * (bottom - top)
                if border != 2 and (xs < 0 or xs >= nx or ys < 0 or ys >= ny):
                    v = img[iy, ix] if border == 0 else np.float32(0.0)
                out[k, iy, col] = v


def rot_shift(stack, cos_a, sin_a, sx, sy, mirror, border: int, quadratic: bool, out):
    """Rotate, shift, then mirror images with bilinear or SPIDER's ``quadri`` interpolation (the arithmetic of
    :func:`isavar.core.transform2d.transform_images` with ``interpolation="linear"`` or ``"quadratic"``, pixel
    by pixel).

    Parameters
    ----------
    stack : (n, ny, nx) float32
    cos_a, sin_a : (n,) float32
        Cosine and sine of the angles, rounded to float32 as the NumPy formulation does.
    sx, sy : (n,) float64
        Shifts (pixels, already wrapped).
    mirror : (n,) int64
        0/1: mirror the result about column ``nx // 2``.
    border : int
        0 "background" (the input pixel), 1 "zero", 2 "wrap" (no border test).
    quadratic : bool
        SPIDER's ``quadri`` (True) or bilinear (False); both take periodic neighbours.
    out : (n, ny, nx) float32
    """
    _rot_shift(stack, cos_a, sin_a, sx, sy, mirror, int(border), bool(quadratic), out)
    return out


@njit(cache=True, nogil=True)
def _ctf_phase(k2, cos2phi, sin2phi, mean_dz, half_dz, cos_a2, sin_a2, lam, cs, phase, out):  # pragma: no cover
    c0 = 0.5 * np.pi
    for i in range(out.shape[0]):
        for q in range(k2.shape[0]):
            dz = mean_dz[i] + half_dz[i] * (cos2phi[q] * cos_a2[i] + sin2phi[q] * sin_a2[i])
            lam_k2 = lam[i] * k2[q]
            out[i, q] = np.pi * lam_k2 * dz - c0 * cs[i] * lam_k2 * lam_k2 * lam[i] + phase[i]


def ctf_phase(k2, cos2phi, sin2phi, mean_dz, half_dz, cos_a2, sin_a2, lam, cs, phase, out):
    """CTF phase ``gamma`` of many parameter sets on one frequency grid (the arithmetic of
    :func:`isavar.core.ctf.ctf_at`, operation by operation, so that ``sin(gamma)`` is its value bit for bit).

    Parameters
    ----------
    k2, cos2phi, sin2phi : (P,) float64
        ``k^2`` (1/Å^2), ``cos 2 phi`` and ``sin 2 phi`` of every grid frequency.
    mean_dz, half_dz : (n,) float64
        ``(U + V) / 2`` and ``(U - V) / 2`` (Å).
    cos_a2, sin_a2 : (n,) float64
        Cosine and sine of twice the astigmatism angle.
    lam, cs : (n,) float64
        Wavelength (Å) and spherical aberration (Å).
    phase : (n,) float64
        Phase shift plus the amplitude-contrast phase (radians).
    out : (n, P) float64
        Filled with ``gamma``.
    """
    _ctf_phase(k2, cos2phi, sin2phi, mean_dz, half_dz, cos_a2, sin_a2, lam, cs, phase, out)
    return out


def preload() -> None:
    """Load the compiled kernels the image stages use into this process (from numba's cache).

    The first kernel a process calls costs about a quarter of a CPU second (numba's and LLVM's start-up), the
    others a few milliseconds each. Called before a pool forks its workers, the workers inherit the loaded
    code instead of each loading it again. The arguments match the types of the real calls, so nothing new
    is compiled.
    """
    images = np.zeros((1, 8, 8), np.float32)
    one = np.zeros(1, np.int64)
    polar_gather(images, one, np.full(1, 4.0), np.full(1, 4.0), np.ones(1), np.zeros(1), one, one, 0,
                 np.empty((1, 1, 1, 1), np.float32))
    curve_peaks_t(np.zeros((4, 2), np.float32))
    curve_peaks_t(np.zeros((4, 2), np.float32), one)
    rot_shift(images, np.ones(1, np.float32), np.zeros(1, np.float32), np.zeros(1), np.zeros(1), one, 0, True,
              np.empty_like(images))
    values = np.ones(1)
    ctf_phase(values, values, values, values, values, values, values, values, values, values, np.empty((1, 1)))
