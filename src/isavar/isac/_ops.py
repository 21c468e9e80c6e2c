"""Thin adapters from the ISAC stages to the core numerics (one place to follow core's API).

Parameters are handled here as ``(n, 4)`` float64 arrays of rows
``[alpha, sx, sy, mirror]`` (spec isac2 §0.1).
"""

from __future__ import annotations

import numpy as np

from isavar.core import params2d as _p2
from isavar.core.stats import group_sums  # noqa: F401  (re-exported: per-class sums of images)


def compose(a, b) -> np.ndarray:
    """Apply ``a`` then ``b`` (rows ``[alpha, sx, sy, mirror]``, broadcast)."""
    return _p2.compose(_p2.Params2D.from_array(a), _p2.Params2D.from_array(b)).to_array()


def inverse(a) -> np.ndarray:
    """Inverse parameters."""
    return _p2.inverse(_p2.Params2D.from_array(a)).to_array()


def particle_centre(a) -> np.ndarray:
    """``-R(-alpha) t`` for each row, (n, 2)."""
    return _p2.particle_centre(_p2.Params2D.from_array(a))


def identity(n: int) -> np.ndarray:
    """``n`` identity rows."""
    return np.zeros((n, 4))


def transform(images, params, *, interpolation="quadratic") -> np.ndarray:
    """Apply parameters to images (content at q moves to T(q)); float32 (n, N, N)."""
    from isavar.core.transform2d import transform_images

    p = np.asarray(params, dtype=np.float64).reshape(-1, 4)
    out = transform_images(np.asarray(images, dtype=np.float32), p[:, 0], p[:, 1], p[:, 2],
                           np.rint(p[:, 3]).astype(np.int64), interpolation=interpolation)
    return np.asarray(out, dtype=np.float32)


def transform_sum(images, params, *, chunk=256, interpolation="quadratic") -> np.ndarray:
    """Sum of the transformed images, in fixed-size chunks (same result whatever the executor)."""
    images = np.asarray(images, dtype=np.float32)
    total = np.zeros(images.shape[1:], dtype=np.float64)
    for s in range(0, len(images), chunk):
        total += transform(images[s:s + chunk], params[s:s + chunk],
                           interpolation=interpolation).sum(0, dtype=np.float64)
    return total.astype(np.float32)


def tanh_lowpass(images, fl, ff) -> np.ndarray:
    """Tanh low-pass at ``fl`` cycles/pixel, fall-off ``ff``."""
    from isavar.core.filters import tanh_lowpass as _tl

    return np.asarray(_tl(np.asarray(images, dtype=np.float32), fl, ff), dtype=np.float32)


def fshift(images, shifts_xy) -> np.ndarray:
    """Fourier shift (content moves by +shift)."""
    from isavar.core.fft import fourier_shift

    return np.asarray(fourier_shift(np.asarray(images, dtype=np.float32), shifts_xy), dtype=np.float32)


def circle(size, radius) -> np.ndarray:
    """Binary circular mask, centre ``size // 2``."""
    from isavar.core.masks import circular_mask

    return np.asarray(circular_mask(size, radius), dtype=np.float32)


def prepare(refs, grid, *, mirror=True, band_tol=0.0, translations=None):
    """References prepared once for many image chunks (band-limited with ``band_tol > 0``, ``--band_tol``;
    with ``translations = (xr, yr, ts)`` the search's translations on the reference side, ``--shift_search``)."""
    from isavar.core.align2d import band_limit, prepare_references

    return band_limit(prepare_references(np.asarray(refs, dtype=np.float32), grid, mirror=mirror,
                                         translations=translations), band_tol)


def search_translations(p, xr=None, yr=None, ts=None):
    """``(xr, yr, ts)`` of a search (the run's unless given) when ``--shift_search references``, else None."""
    if p.shift_search != "references":
        return None
    return (float(p.xr if xr is None else xr), float(p.yr_eff if yr is None else yr),
            float(p.ts if ts is None else ts))


def align_multi(images, refs, grid, p, params, *, xr=None, yr=None, normalize=True, shift_candidates=0, pairs=None):
    """EQK-means search: every image against every reference (ring-normalised images, centres reset).

    ``shift_candidates > 0``: only that many trial translations per image, chosen by a coarse score against
    every reference, are searched exactly (``--eqk_shift_candidates``). ``pairs`` ``(n, K)`` bool: only those
    (image, reference) pairs are searched, the others score -inf (``--eqk_pairs own``).

    Returns
    -------
    score : ndarray, (n, K) float32
    params : ndarray, (n, K, 4) float64
        Parameters aligning each image to each reference.
    """
    from isavar.core.align2d import align_to_references

    res = align_to_references(np.asarray(images, dtype=np.float32), refs, grid,
                              x_range=p.xr if xr is None else xr, y_range=p.yr_eff if yr is None else yr,
                              step=p.ts, mirror=True, delta=0.0, normalize_images=normalize,
                              initial_params=np.asarray(params, dtype=np.float64), out_of_range="reset",
                              shift_candidates=shift_candidates, pairs=pairs)
    return res.score, res.params


def align_single(images, ref, grid, p, params, delta, *, xr=None, yr=None, ts=None, cache=None, coarse_rows=0,
                 reference_side=False):
    """One ``ali2d_single_iter`` pass against one reference (centres clamped); returns (n, 4) parameters.

    ``coarse_rows > 0``: only that many trial translations per image, chosen by a coarse score, are searched
    exactly (needs ``cache``). ``reference_side``: an unprepared ``ref`` is prepared with the translations on
    the reference side when ``p.shift_search`` asks for it (:func:`search_translations`)."""
    from isavar.core.align2d import PreparedReferences, align_to_reference, band_limit

    xr, yr, ts = (p.xr if xr is None else xr), (p.yr_eff if yr is None else yr), (p.ts if ts is None else ts)
    translations = search_translations(p, xr, yr, ts) if reference_side else None
    if translations is not None and not isinstance(ref, PreparedReferences):
        ref = prepare(ref, grid, band_tol=p.band_tol, translations=translations)
    elif p.band_tol > 0:
        ref = band_limit(ref if isinstance(ref, PreparedReferences) else prepare(ref, grid), p.band_tol)
    res = align_to_reference(np.asarray(images, dtype=np.float32), ref, grid,
                             x_range=xr, y_range=yr, step=ts, mirror=True, delta=float(delta),
                             normalize_images=False, initial_params=np.asarray(params, dtype=np.float64),
                             out_of_range="clamp", cache=cache, coarse_rows=coarse_rows)
    return res.params


def new_cache():
    """A ring-spectra cache for repeated passes over one image set."""
    from isavar.core.align2d import SpectraCache

    return SpectraCache()


def polar_mean(images, params, grid, cache=None) -> np.ndarray:
    """Mean of the aligned images from their ring spectra (zero beyond the last ring)."""
    from isavar.core.align2d import aligned_average

    return aligned_average(np.asarray(images, dtype=np.float32), np.asarray(params, dtype=np.float64), grid,
                           cache=cache)


def subset(prep, indices):
    """Prepared references ``indices`` of ``prep`` (no recomputation)."""
    from isavar.core.align2d import subset_references

    return subset_references(prep, indices)


def truncate(prep, max_freq):
    """``prep`` keeping only the ring frequencies ``m <= max_freq`` (all that the coarse scores read)."""
    import dataclasses

    bands = tuple((m_lo, min(m_hi, max_freq + 1), r, w[:min(m_hi, max_freq + 1) - m_lo])
                  for m_lo, m_hi, r, w in prep.bands if m_lo <= max_freq)
    return dataclasses.replace(prep, bands=bands, blocks=())


def coarse_scores(images, prep, params, max_freq=None):
    """Coarse image-reference scores for choosing candidates, (n, K) float32 (centres reset as in EQK)."""
    from isavar.core.align2d import coarse_scores as _cs

    kw = {} if max_freq is None else {"max_freq": max_freq}
    return _cs(np.asarray(images, dtype=np.float32), prep, initial_params=np.asarray(params, dtype=np.float64),
               out_of_range="reset", **kw)
