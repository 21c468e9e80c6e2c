"""Pre-alignment: reference-free 2D alignment used only to centre the particles (spec isac2 §1.1).

SPHIRE's ``ali2d_base`` as used by ISAC2: on the shrunken images, a series of
translational steps (coarse to fine), 14 passes each, of averaging, FRC-based
tanh filtering, optional reference centring (``center_method`` -1..7) and one
alignment pass. Only the resulting centring shifts are kept (rotation and
mirror are discarded, Q21).
"""

from __future__ import annotations

import logging

import numpy as np
from scipy.optimize import minimize

from isavar.core.filters import gaussian_lowpass, tanh_profile
from isavar.core.stats import frc, rotational_average
from isavar.isac import _ops
from isavar.isac.stability import discrete_delta

log = logging.getLogger(__name__)


def search_schedule(nxs: int, target_radius: int) -> tuple[list[int], list[int]]:
    """Translational ranges and steps of the pre-alignment (spec §1.1 step 4).

    Examples
    --------
    >>> search_schedule(76, 29)
    ([8, 4], [2, 1])
    >>> search_schedule(74, 29)
    ([4], [1])
    >>> search_schedule(100, 29)
    ([20, 8, 4], [5, 2, 1])
    """
    txrm = (nxs - 2 * (target_radius + 1)) // 2
    if txrm < 0:
        raise ValueError(f"shrunken box {nxs} is too small for target radius {target_radius}")
    if txrm // 4 > 0:
        xr, ts = [], []
        while txrm // 4 > 0:
            step = txrm // 4
            xr.append(4 * step)
            ts.append(step)
            txrm //= 2
        return xr, ts
    return [txrm], [1]


def fit_tanh_to_frc(curve: np.ndarray) -> tuple[float, float]:
    """Tanh low-pass (fl, ff) fitted to an FRC (SPHIRE ``ref_ali2d``), in cycles/pixel.

    The half-set FRC ``r`` is converted to the full set (``2r/(1+r)``); without a
    drop below 0.5 the filter is (0.4, 0.2); else a Nelder-Mead fit starting at the
    last frequency above 0.5, clamped to ``0.12 <= fl <= 0.4``, ``ff <= 0.2``.
    """
    r = np.asarray(curve, dtype=np.float64)
    full = 2 * r / (1 + np.where(r > -0.999, r, -0.999))
    n = len(full)
    freq = np.arange(n) / (2.0 * (n - 1))
    below = np.flatnonzero(full[1:] < 0.5)
    if below.size == 0:
        return 0.4, 0.2
    f0 = freq[max(below[0], 1)]
    target = full.copy()
    low = np.flatnonzero(full[1:] < 0.1)
    if low.size:
        target[low[0] + 1:] = 0.0

    def cost(x):
        fl, ff = x
        if fl <= 0 or ff <= 0:
            return 1e6
        return float(np.sum((tanh_profile(freq, fl, ff) - target) ** 2))

    res = minimize(cost, [f0, 0.1], method="Nelder-Mead", options={"initial_simplex": [[f0, 0.1], [f0 + 0.05, 0.1], [f0, 0.15]], "xatol": 1e-4, "fatol": 1e-6})
    fl, ff = res.x
    return float(np.clip(fl, 0.12, 0.4)), float(min(max(ff, 1e-3), 0.2))


# ------------------------------------------------------------------------------- centring methods

def _gaussian(n, sigma):
    c = n // 2
    y, x = np.mgrid[:n, :n] - c
    g = np.exp(-(x * x + y * y) / (2.0 * sigma * sigma))
    return (g / g.max()).astype(np.float32)


def _ccf_peak(image, template) -> np.ndarray:
    """Position (x, y) relative to the centre of the peak of the cross-correlation image x template."""
    n = image.shape[-1]
    ccf = np.fft.irfft2(np.fft.rfft2(image) * np.conj(np.fft.rfft2(template)), s=image.shape)
    ccf = np.fft.fftshift(ccf)
    iy, ix = np.unravel_index(np.argmax(ccf), ccf.shape)

    def parab(m1, c0, p1):
        den = m1 - 2 * c0 + p1
        return 0.0 if den == 0 else 0.5 * (m1 - p1) / den

    dx = parab(ccf[iy, (ix - 1) % n], ccf[iy, ix], ccf[iy, (ix + 1) % n])
    dy = parab(ccf[(iy - 1) % n, ix], ccf[iy, ix], ccf[(iy + 1) % n, ix])
    return np.array([ix + dx - n // 2, iy + dy - n // 2])


def _phase_cog(image) -> np.ndarray:
    """Centre (x, y) relative to N//2 from the phase of the first Fourier harmonic of the projections."""
    n = image.shape[-1]
    c = n // 2
    out = []
    for axis in (0, 1):                       # sum over rows -> x profile; over columns -> y profile
        prof = image.sum(axis=axis)
        ph = np.angle(np.sum(prof * np.exp(-2j * np.pi * np.arange(n) / n)))
        pos = (-ph * n / (2 * np.pi)) % n
        out.append(((pos - c + n / 2) % n) - n / 2)
    return np.array(out)


def centre_of(reference, method: int, mask) -> np.ndarray:
    """Position (x, y) of the particle centre in ``reference`` relative to N//2 (methods 1..7)."""
    n = reference.shape[-1]
    ref = reference.astype(np.float64)
    if method == 1:
        return _phase_cog(ref)
    if method == 2:
        return _ccf_peak(ref, _gaussian(n, 2.0))
    if method == 3:
        return _ccf_peak(ref, _gaussian(n, 7.0) - _gaussian(n, 2.0))
    if method == 4:
        return _ccf_peak(ref, mask)
    if method == 5:
        total = np.zeros(2)
        cur = ref
        for _ in range(10):
            prof = rotational_average(cur[None].astype(np.float32))[0]
            y, x = np.mgrid[:n, :n] - n // 2
            r = np.hypot(x, y)
            ravg = np.interp(r, np.arange(len(prof)), prof, right=0.0)
            s = _ccf_peak(cur, ravg)
            total += s
            cur = _ops.fshift(ref.astype(np.float32), -total).astype(np.float64)
            if np.hypot(*s) < 1.0:
                break
        return total
    if method == 6:
        circ = _ops.circle(n, n // 2 - 2) > 0.5
        thr = ref[circ].mean() + ref[circ].std()
        return _phase_cog(np.where(circ & (ref > thr), ref, 0.0))
    if method == 7:
        smooth = gaussian_lowpass(ref.astype(np.float32), 2.0)
        circ = _ops.circle(n, n // 2 - 2) > 0.5
        thr = smooth[circ].mean() + smooth[circ].std()
        binary = ((smooth > thr) & circ).astype(np.float64)
        if binary.sum() == 0:
            return np.zeros(2)
        # the CCF of a small binary blob with the (larger) mask has a flat top; its centre is the
        # blob's centroid, used directly (deviation: SPHIRE takes the first maximum of the plateau)
        y, x = np.mgrid[:n, :n] - n // 2
        return np.array([(binary * x).sum(), (binary * y).sum()]) / binary.sum()
    return np.zeros(2)


# ------------------------------------------------------------------------------- the engine

def _even_odd_sums(images, params, chunk=512):
    se = np.zeros(images.shape[1:], np.float64)
    so = np.zeros(images.shape[1:], np.float64)
    for s in range(0, len(images), chunk):
        moved = _ops.transform(images[s:s + chunk], params[s:s + chunk]).astype(np.float64)
        idx = np.arange(s, min(s + chunk, len(images)))
        se += moved[idx % 2 == 0].sum(0)
        so += moved[idx % 2 == 1].sum(0)
    return se, so


def _masked_frc(a, b, mask):
    inside = mask > 0.5
    a = (a - a[inside].mean()) * mask
    b = (b - b[inside].mean()) * mask
    return frc(a.astype(np.float32), b.astype(np.float32))


def _align_chunk(task):
    images, ref, params, p, grid, xr, ts, delta = task
    return _ops.align_single(images, ref, grid, p, params, delta, xr=xr, yr=xr, ts=ts, reference_side=True)


#: images used to build the pre-alignment reference (all images get the final passes)
PREALIGN_SUBSET = 2000
#: passes per step with the full translational range; later passes search +-1 step around the centre
FULL_RANGE_PASSES = 2


def _align_all(images, ref, params, p, grid, xr, ts, delta, executor, chunk):
    from isavar.parallel.partition import chunk_ranges

    tasks = [(images[s:e], ref, params[s:e], p, grid, xr, ts, delta) for s, e in chunk_ranges(len(images), chunk)]
    return np.concatenate(executor.map(_align_chunk, tasks), axis=0)


def _align_range(images, ref, params, p, grid, xr, ts, delta, executor, chunk):
    """One pass over the translational range ``xr`` (step ``ts``).

    With ``p.prealign_search == "coarse"`` (not the default) a range wider than one step is searched coarse to fine: first on
    the lattice of step ``2 ts`` (range rounded down to a multiple of it), then +-``ts`` around the best
    centre; (2 k + 1)^2 + 9 trial translations instead of (4 k + 1)^2 for ``xr = 2 k ts``.
    """
    coarse = 2 * ts * int(xr // (2 * ts))
    if p.prealign_search != "coarse" or coarse < 2 * ts or xr <= ts:
        return _align_all(images, ref, params, p, grid, xr, ts, delta, executor, chunk)
    params = _align_all(images, ref, params, p, grid, coarse, 2 * ts, delta, executor, chunk)
    return _align_all(images, ref, params, p, grid, ts, ts, delta, executor, chunk)


def prealign(images, p, executor, *, progress=None, chunk=512, subset_size=PREALIGN_SUBSET):
    """Reference-free alignment of the shrunken images (``ali2d_base``), for centring.

    The reference is built as in SPHIRE (steps of 14 passes: average, FRC-fitted tanh filter,
    centring, one alignment pass) on a seeded random subset of at most ``subset_size`` images,
    with the full translational range in the first passes of a step and +-1 step around the current
    centre afterwards; then every image is aligned to the final reference with one full-range pass
    per step (coarse to fine). See docs/deviations.md.

    Parameters
    ----------
    images : ndarray, (n, nxs, nxs) float32
        Shrunken images (CTF-flipped when ``--CTF``).
    p : Isac2Params
    executor : Executor
        Alignment passes are mapped over fixed-size image chunks.

    Returns
    -------
    params : ndarray, (n, 4)
        Final alignment parameters (shrunken pixels).
    reference : ndarray, (nxs, nxs)
        The final reference.
    """
    from isavar.core.polar import polar_grid
    from isavar.isac.working import centred_outside
    from isavar.parallel.partition import task_rngs

    n, nxs, _ = images.shape
    ou = p.target_radius
    mask = _ops.circle(nxs, ou)
    outside = mask <= 0.5
    images = centred_outside(images, outside)      # on demand for a memory-mapped stack (isac.working)
    grid = polar_grid(1, ou, 1)
    xrs, tss = search_schedule(nxs, ou)
    if n > subset_size:
        rng = task_rngs(p.rand_seed, 1, key=99)[0]
        sub_idx = np.sort(rng.choice(n, subset_size, replace=False))
        sub = images[sub_idx]
    else:
        sub = images
    m = len(sub)
    params = np.zeros((m, 4))
    n_steps = len(xrs)
    maxit = p.prealign_maxit
    if progress is not None:
        # the reference passes on the subset (the last one only builds the reference), then one final pass
        # per step over every image, weighted by its share of the images
        progress.stage("pre-alignment", total=(n_steps * maxit - 1) + n_steps * max(1, n // max(m, 1)))
    total = 0
    prev_delta = 0.0
    ref = None
    inside = mask > 0.5
    for step, (xr, ts) in enumerate(zip(xrs, tss)):
        for it in range(maxit):
            total += 1
            se, so = _even_odd_sums(sub, params)
            avg = (se + so) / m
            fl, ff = fit_tanh_to_frc(_masked_frc(se, so, mask))
            ref = _ops.tanh_lowpass(((avg - avg[inside].mean()) * mask).astype(np.float32), fl, ff)
            if p.center_method == -1:
                sign = np.where(params[:, 3] > 0.5, -1.0, 1.0)
                cs = np.array([np.mean(sign * params[:, 1]), np.mean(params[:, 2])])
            elif p.center_method == 0 or prev_delta != 0.0:
                cs = np.zeros(2)
            else:
                cs = centre_of(ref, p.center_method, mask)
            if np.any(cs != 0):
                ref = _ops.fshift(ref, -cs)
            if step == n_steps - 1 and it == maxit - 1:
                break
            if np.any(cs != 0):
                params = _ops.compose(params, np.array([[0.0, -cs[0], -cs[1], 0.0]]))
            delta = discrete_delta(it, total, maxit * n_steps, p.dst)
            rng_x = xr if it < FULL_RANGE_PASSES else ts
            params = _align_range(sub, ref, params, p, grid, rng_x, ts, delta, executor, chunk)
            prev_delta = delta
            log.debug("pre-alignment step %d pass %d: filter %.3f/%.3f", step + 1, it + 1, fl, ff)
            if progress is not None:
                progress.advance(1)
    # every image: one full-range pass per step against the final reference, coarse to fine
    final = np.zeros((n, 4))
    for xr, ts in zip(xrs, tss):
        final = _align_range(images, ref, final, p, grid, xr, ts, 0.0, executor, chunk)
        if progress is not None:
            progress.advance(max(1, n // max(m, 1)))
    return final, ref


def centring_shifts(params, shrink) -> np.ndarray:
    """Pure centring shifts in original pixels: ``R(-alpha) t / shrink`` (rotation/mirror dropped)."""
    p = np.asarray(params, dtype=np.float64)
    a = np.deg2rad(p[:, 0])
    c, s = np.cos(-a), np.sin(-a)
    sx = c * p[:, 1] + s * p[:, 2]
    sy = -s * p[:, 1] + c * p[:, 2]
    return np.column_stack([sx, sy]) / shrink
