"""Real- and Fourier-space helpers for the covariance components: band limit, low-pass, automatic mask."""

from __future__ import annotations

import numpy as np

from isavar.core.filters import tanh_profile

__all__ = ["band_limit", "lowpass_profile", "apply_profile", "auto_mask"]

#: Filter value below which frequencies are not used at all.
BAND_THRESHOLD = 1e-3


def band_limit(box: int, fl: float, aa: float) -> float:
    """Largest image frequency index (exclusive) to sample.

    Without a low-pass (``fl <= 0``) this is Nyquist, ``box / 2``; with one, the smallest
    radius beyond which the tanh profile stays below :data:`BAND_THRESHOLD` (plus one
    pixel for the trilinear kernel), at most Nyquist.

    Parameters
    ----------
    box : int
        Image size.
    fl, aa : float
        tanh cut-off and fall-off (cycles/pixel).

    Returns
    -------
    float
    """
    nyq = box / 2.0
    if fl <= 0:
        return nyq
    r = np.arange(0.0, nyq + 0.5, 0.25)
    prof = tanh_profile(r / box, fl, aa)
    above = np.flatnonzero(prof >= BAND_THRESHOLD)
    last = r[above[-1]] if above.size else 1.0
    return float(min(nyq, last + 1.0))


def lowpass_profile(freq: np.ndarray, fl: float, aa: float) -> np.ndarray:
    """tanh low-pass values (float32) at radial frequencies ``freq`` (cycles/pixel)."""
    return tanh_profile(freq, fl, aa).astype(np.float32)


def apply_profile(f: np.ndarray, profile: np.ndarray) -> np.ndarray:
    """Multiply a spectrum by a real profile of the same shape (new array)."""
    return (f * profile).astype(f.dtype)


def auto_mask(volume: np.ndarray, *, threshold: float = 0.1, dilate_px: float = 3.0, soft_px: float = 3.0) -> np.ndarray:
    """Soft mask from a (mean) map: smooth, threshold, dilate, soften.

    Parameters
    ----------
    volume : numpy.ndarray
        ``(N, N, N)`` map.
    threshold : float
        Fraction of the smoothed map's maximum defining the core.
    dilate_px : float
        Dilation radius (pixels).
    soft_px : float
        Width of the cosine edge (pixels).

    Returns
    -------
    numpy.ndarray
        ``(N, N, N)`` float32 in ``[0, 1]``; 1 on the dilated core, falling to 0 over ``soft_px``.
    """
    from scipy.ndimage import distance_transform_edt, gaussian_filter

    v = np.asarray(volume, np.float64)
    n = v.shape[0]
    smooth = gaussian_filter(v, max(1.0, n / 64.0))
    peak = smooth.max()
    core = smooth > threshold * peak if peak > 0 else np.ones_like(smooth, bool)
    if not core.any():
        core = np.ones_like(smooth, bool)
    dist = distance_transform_edt(~core)
    edge = np.clip((dist - dilate_px) / max(soft_px, 1e-6), 0.0, 1.0)
    mask = np.where(dist <= dilate_px, 1.0, 0.5 * (1.0 + np.cos(np.pi * edge)))
    mask[dist > dilate_px + soft_px] = 0.0
    # keep the mask inside the box's inscribed sphere
    c = n // 2
    z, y, x = np.ogrid[:n, :n, :n]
    r = np.sqrt((z - c) ** 2 + (y - c) ** 2 + (x - c) ** 2)
    mask *= np.clip((n // 2 - 1 - r) / 2.0, 0.0, 1.0)
    return mask.astype(np.float32)
