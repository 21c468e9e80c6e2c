"""Mask-based normalisation of image stacks (SPHIRE ``infomask`` semantics).

A pixel is *inside* a mask when ``mask > 0.5`` and *outside* otherwise. Means
and standard deviations are per image; the standard deviation uses the
``n - 1`` denominator (SPHIRE ``infomask``).
"""

from __future__ import annotations

import warnings

import numpy as np

from isavar.core.fft import as_stack, image_chunks

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
    n = stack.shape[0]
    sel = _region(mask, region, stack.shape)
    mean = np.empty(n)
    var = np.empty(n)
    count = np.empty(n)
    shared = np.ndim(mask) == 2
    idx = np.flatnonzero(sel[0]) if shared else None
    flat = stack.reshape(n, -1)
    for sl in image_chunks(n, flat.shape[1]):
        if shared:
            data = flat[sl][:, idx].astype(np.float64)
            cnt = np.full(data.shape[0], float(idx.size))
            with np.errstate(invalid="ignore", divide="ignore"):
                m = data.sum(axis=1) / cnt
            dev = data - m[:, None]
            ss = np.einsum("ij,ij->i", dev, dev)
        else:
            chunk_sel = sel[sl].reshape(sl.stop - sl.start, -1)
            data = flat[sl].astype(np.float64)
            cnt = chunk_sel.sum(axis=1).astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                m = np.where(chunk_sel, data, 0.0).sum(axis=1) / cnt
            dev = np.where(chunk_sel, data - m[:, None], 0.0)
            ss = np.einsum("ij,ij->i", dev, dev)
        mean[sl], count[sl] = m, cnt
        var[sl] = ss / np.maximum(cnt - 1.0, 1.0)
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
    n = stack.shape[0]
    shift = np.zeros(n)
    if mean_region is not None:
        mean, _ = region_stats(stack, mask, mean_region)
        shift = np.nan_to_num(mean)
    scaled = np.ones(n, dtype=bool)
    scale = np.ones(n)
    if std_region is not None:
        # The standard deviation does not depend on the subtracted constant.
        _, std = region_stats(stack, mask, std_region)
        scaled = np.isfinite(std) & (std > 0)
        scale = np.where(scaled, std, 1.0)
        if not return_flags and not scaled.all():
            warnings.warn(
                f"{int((~scaled).sum())} image(s) have zero standard deviation in the {std_region!r} region; "
                "left unscaled",
                ZeroStdWarning,
                stacklevel=2,
            )
    out = (stack - shift[:, None, None].astype(np.float32)) * (1.0 / scale)[:, None, None].astype(np.float32)
    result = out.astype(np.float32)
    if single:
        result = result[0]
    return (result, scaled) if return_flags else result
