"""Mask-based normalisation of image stacks (SPHIRE ``infomask`` semantics).

A pixel is *inside* a mask when ``mask > 0.5`` and *outside* otherwise. Means
and standard deviations are per image; the standard deviation uses the
``n - 1`` denominator (SPHIRE ``infomask``).
"""

from __future__ import annotations

import warnings

import numpy as np

from isavar.core.fft import as_stack

__all__ = ["normalize_images", "region_stats", "ZeroStdWarning"]

_REGIONS = ("inside", "outside", "all")


class ZeroStdWarning(UserWarning):
    """Some images have zero standard deviation in the scaling region; they were left unscaled."""


def _region(mask: np.ndarray, region: str, shape) -> np.ndarray:
    if region not in _REGIONS:
        raise ValueError(f"region must be one of {_REGIONS} or None, got {region!r}")
    m = np.broadcast_to(np.asarray(mask) > 0.5, shape)
    if region == "inside":
        return m
    if region == "outside":
        return ~m
    return np.ones(shape, dtype=bool)


def region_stats(images, mask, region: str = "inside") -> tuple[np.ndarray, np.ndarray]:
    """Per-image mean and standard deviation (``n - 1``) over a mask region.

    Parameters
    ----------
    images : array_like
        ``(ny, nx)`` or ``(n, ny, nx)``.
    mask : array_like
        ``(ny, nx)`` or ``(n, ny, nx)``; inside = ``mask > 0.5``.
    region : {"inside", "outside", "all"}
        Which pixels to use.

    Returns
    -------
    mean, std : numpy.ndarray
        ``(n,)`` float64 (``std`` is 0 for regions of fewer than 2 pixels;
        ``mean`` is NaN for empty regions).
    """
    stack, _ = as_stack(images)
    sel = _region(mask, region, stack.shape)
    count = sel.sum(axis=(1, 2)).astype(np.float64)
    data = stack.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(sel, data, 0.0).sum(axis=(1, 2)) / count
        dev = np.where(sel, data - mean[:, None, None], 0.0)
        var = (dev * dev).sum(axis=(1, 2)) / np.maximum(count - 1.0, 1.0)
    return mean, np.sqrt(np.where(count > 1, var, 0.0))


def normalize_images(
    images,
    mask,
    *,
    mean_region: str | None = "outside",
    std_region: str | None = "inside",
    return_flags: bool = False,
):
    """Subtract a per-image mean and divide by a per-image standard deviation, each over a mask region.

    Parameters
    ----------
    images : array_like
        ``(ny, nx)`` or ``(n, ny, nx)``.
    mask : array_like
        ``(ny, nx)`` (shared) or ``(n, ny, nx)``; inside = ``mask > 0.5``.
    mean_region : {"outside", "inside", "all", None}, optional
        Region whose mean is subtracted (None: no subtraction). Default
        "outside", as ISAC's ``normalize_particle_images``.
    std_region : {"inside", "outside", "all", None}, optional
        Region whose standard deviation (``n - 1``) divides the image
        (None: no scaling). It is computed after the mean subtraction (which
        does not change it).
    return_flags : bool, optional
        If True, also return a boolean ``(n,)`` array, True where the image
        was scaled. Images whose standard deviation is 0 (or not finite) are
        left unscaled. Without ``return_flags`` such images raise a
        :class:`ZeroStdWarning`; with it the caller is trusted to check.

    Returns
    -------
    images : numpy.ndarray
        float32, same shape as the input. The whole image is normalised.
    scaled : numpy.ndarray, optional
        Only if ``return_flags``.

    Examples
    --------
    >>> img = np.arange(16, dtype=np.float32).reshape(4, 4)
    >>> out = normalize_images(img, np.ones((4, 4)), mean_region="inside", std_region="inside")
    >>> round(float(out.std(ddof=1)), 6)
    1.0
    """
    stack, single = as_stack(images)
    out = stack.astype(np.float64)
    if mean_region is not None:
        mean, _ = region_stats(stack, mask, mean_region)
        out -= np.nan_to_num(mean)[:, None, None]
    scaled = np.zeros(stack.shape[0], dtype=bool)
    if std_region is not None:
        _, std = region_stats(out, mask, std_region)
        scaled = np.isfinite(std) & (std > 0)
        out /= np.where(scaled, std, 1.0)[:, None, None]
        if not return_flags and not scaled.all():
            warnings.warn(
                f"{int((~scaled).sum())} image(s) have zero standard deviation in the {std_region!r} region; "
                "left unscaled",
                ZeroStdWarning,
                stacklevel=2,
            )
    else:
        scaled[:] = True
    result = out.astype(np.float32)
    if single:
        result = result[0]
    return (result, scaled) if return_flags else result
