"""Fourier filters for image stacks: tanh and Gaussian low-pass, radial filter tables.

Frequencies are absolute, in cycles/pixel (Nyquist = 0.5); the radius of a
Fourier sample ``(ky, kx)`` is ``sqrt(kx**2 + ky**2)`` with signed DFT
frequencies (numpy's ``fftfreq``). Filters multiply the unpadded FFT and are
real and symmetric, so they do not move the image centre.
"""

from __future__ import annotations

import numpy as np

from isavar.core.fft import as_stack, freq_grid_2d, image_chunks

__all__ = [
    "frequency_radius",
    "apply_fourier_filter",
    "tanh_profile",
    "tanh_lowpass",
    "gaussian_lowpass",
    "radial_filter_values",
    "apply_radial_filter",
]


def frequency_radius(ny: int, nx: int, *, rfft: bool = True) -> np.ndarray:
    """``|k|`` in cycles/pixel on the (r)fft grid of an ``(ny, nx)`` image, float64."""
    ky, kx = freq_grid_2d(ny, nx, rfft=rfft)
    return np.sqrt(kx * kx + ky * ky)


def apply_fourier_filter(images, transfer) -> np.ndarray:
    """Multiply the rfft of each image by a real transfer function.

    Parameters
    ----------
    images : array_like
        ``(ny, nx)`` or ``(n, ny, nx)``.
    transfer : array_like
        ``(ny, nx // 2 + 1)`` (shared) or ``(n, ny, nx // 2 + 1)``, rfft layout.

    Returns
    -------
    numpy.ndarray
        Filtered images, float32, same shape as the input.
    """
    stack, single = as_stack(images)
    ny, nx = stack.shape[1:]
    h = np.asarray(transfer)
    if h.shape[-2:] != (ny, nx // 2 + 1):
        raise ValueError(f"transfer must have rfft shape {(ny, nx // 2 + 1)}, got {h.shape}")
    n = stack.shape[0]
    per_image = h.ndim == 3 and h.shape[0] == n and n > 1
    out = np.empty(stack.shape, dtype=np.float32)
    for sl in image_chunks(n, ny * nx):
        out[sl] = np.fft.irfft2(np.fft.rfft2(stack[sl]) * (h[sl] if per_image else h), s=(ny, nx))
    return out[0] if single else out


def tanh_profile(freq, fl: float, ff: float) -> np.ndarray:
    """Tanh low-pass profile of SPHIRE ``filt_tanl`` (spec isac2.md §5.1).

    ``H(s) = 0.5 [tanh(pi (s + fl) / (2 ff fl)) - tanh(pi (s - fl) / (2 ff fl))]``

    Parameters
    ----------
    freq : array_like
        Radial frequency ``s`` in cycles/pixel (absolute; Nyquist 0.5).
    fl : float
        Cut-off in cycles/pixel (``H(fl) ~ 0.5``); must be > 0.
    ff : float
        Fall-off (relative width of the transition); must be > 0.

    Returns
    -------
    numpy.ndarray
        ``H`` with the shape of ``freq`` (float64).

    Examples
    --------
    >>> round(float(tanh_profile(0.25, 0.25, 0.1)), 3)
    0.5
    """
    if fl <= 0 or ff <= 0:
        raise ValueError(f"tanh filter needs fl > 0 and ff > 0, got fl={fl}, ff={ff}")
    s = np.asarray(freq, dtype=np.float64)
    c = np.pi / (2.0 * ff * fl)
    return 0.5 * (np.tanh(c * (s + fl)) - np.tanh(c * (s - fl)))


def tanh_lowpass(images, fl: float, ff: float) -> np.ndarray:
    """Apply the tanh low-pass :func:`tanh_profile` (SPHIRE ``filt_tanl``) to images.

    Parameters
    ----------
    images : array_like
        ``(ny, nx)`` or ``(n, ny, nx)``.
    fl, ff : float
        Cut-off (cycles/pixel) and fall-off, see :func:`tanh_profile`.

    Returns
    -------
    numpy.ndarray
        float32, same shape.
    """
    stack, _ = as_stack(images)
    ny, nx = stack.shape[1:]
    return apply_fourier_filter(images, tanh_profile(frequency_radius(ny, nx), fl, ff))


def gaussian_lowpass(images, sigma: float) -> np.ndarray:
    """Gaussian low-pass ``H(s) = exp(-s**2 / (2 sigma**2))`` (SPHIRE ``filt_gaussl``).

    Parameters
    ----------
    images : array_like
        ``(ny, nx)`` or ``(n, ny, nx)``.
    sigma : float
        Width in cycles/pixel (``H(sigma) = exp(-1/2)``); must be > 0.
        Equivalent to a real-space Gaussian blur of ``1 / (2 pi sigma)`` pixels.

    Returns
    -------
    numpy.ndarray
        float32, same shape.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    stack, _ = as_stack(images)
    ny, nx = stack.shape[1:]
    s = frequency_radius(ny, nx)
    return apply_fourier_filter(images, np.exp(-(s * s) / (2.0 * sigma * sigma)))


def radial_filter_values(shape, table) -> np.ndarray:
    """Transfer function from a 1-D radial table (SPHIRE ``filt_table``).

    Parameters
    ----------
    shape : tuple of int
        Image shape ``(ny, nx)``.
    table : array_like
        ``(L,)`` filter values at radii ``0, 1, ..., L - 1`` in Fourier pixels
        (radius = ``|k| * nx`` with ``k`` in cycles/pixel).

    Returns
    -------
    numpy.ndarray
        ``(ny, nx // 2 + 1)`` float64 values, linearly interpolated in the
        table; radii beyond ``L - 1`` get 0.
    """
    ny, nx = shape
    t = np.asarray(table, dtype=np.float64).ravel()
    if t.size == 0:
        raise ValueError("radial filter table is empty")
    r = frequency_radius(ny, nx) * nx
    return np.interp(r, np.arange(t.size), t, right=0.0)


def apply_radial_filter(images, table) -> np.ndarray:
    """Multiply each image's Fourier transform by a radial table (SPHIRE ``filt_table``).

    Parameters
    ----------
    images : array_like
        ``(ny, nx)`` or ``(n, ny, nx)``.
    table : array_like
        ``(L,)`` values at integer Fourier radii (see :func:`radial_filter_values`).

    Returns
    -------
    numpy.ndarray
        float32, same shape.
    """
    stack, _ = as_stack(images)
    return apply_fourier_filter(images, radial_filter_values(stack.shape[1:], table))
