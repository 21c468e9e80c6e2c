"""Fourier helpers for image stacks: frequency grids, sub-pixel shifts, resampling, window/pad.

Conventions (see :mod:`isavar.conventions`)
-------------------------------------------
* Images are ``(ny, nx)`` or stacks ``(n, ny, nx)``; every function accepts both
  and returns the same number of dimensions. Computation is batched over the
  leading axis and results are float32.
* Fourier arrays use numpy's unshifted layout (zero frequency at ``[0, 0]``);
  frequencies are in cycles/pixel, Nyquist = 0.5. ``rfft=True`` layouts keep the
  non-negative x frequencies only (``nx // 2 + 1`` columns).
* The grid centre (phase origin) is index ``N // 2``; ``window`` and ``pad`` keep
  pixel ``N // 2`` of the input at ``n // 2`` of the output.
* Even sizes have a Nyquist sample at ``-0.5`` cycles/pixel that represents
  both ``+0.5`` and ``-0.5``. Phase ramps and spectrum resizing treat it
  Hermitian-correctly: its shift factor is ``cos(pi d)`` (the real part of the
  ramp) so that the output stays real and integer shifts equal ``numpy.roll``.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

__all__ = [
    "as_stack",
    "image_chunks",
    "freq_grid_2d",
    "fourier_shift",
    "resample_fourier",
    "window",
    "pad",
    "fft2",
    "ifft2",
    "rfft2",
    "irfft2",
]


def as_stack(images) -> tuple[np.ndarray, bool]:
    """Return images as a float32 ``(n, ny, nx)`` array and whether the input was a single image.

    Parameters
    ----------
    images : array_like
        ``(ny, nx)`` image or ``(n, ny, nx)`` stack.

    Returns
    -------
    stack : numpy.ndarray
        ``(n, ny, nx)`` float32 (a view when the input is already float32).
    single : bool
        True if the input was 2-D (callers drop the leading axis again).

    Raises
    ------
    ValueError
        If the input is not 2-D or 3-D.
    """
    arr = np.asarray(images)
    if arr.ndim == 2:
        return arr.astype(np.float32, copy=False)[None], True
    if arr.ndim == 3:
        return arr.astype(np.float32, copy=False), False
    raise ValueError(f"expected an image (ny, nx) or a stack (n, ny, nx), got shape {arr.shape}")


#: Pixels per batch of FFT work: bounds the temporary complex arrays to a few hundred MB.
CHUNK_PIXELS = 1 << 22


def image_chunks(n: int, pixels_per_image: int, budget: int | None = None) -> list[slice]:
    """Split ``n`` images into consecutive slices of at most ``budget`` pixels (at least one image each).

    Parameters
    ----------
    n : int
        Number of images.
    pixels_per_image : int
        Pixels (or Fourier samples) per image in the largest temporary array.
    budget : int, optional
        Maximum pixels per chunk (default: the module constant ``CHUNK_PIXELS``).

    Returns
    -------
    list of slice
    """
    budget = CHUNK_PIXELS if budget is None else budget
    step = max(1, int(budget) // max(1, int(pixels_per_image)))
    return [slice(i, min(n, i + step)) for i in range(0, n, step)]


def _restore(stack: np.ndarray, single: bool) -> np.ndarray:
    out = stack.astype(np.float32, copy=False)
    return out[0] if single else out


def fft2(images) -> np.ndarray:
    """Unnormalised 2-D FFT over the last two axes (complex64, numpy layout)."""
    return np.fft.fft2(np.asarray(images, dtype=np.float32)).astype(np.complex64)


def ifft2(spectrum) -> np.ndarray:
    """Inverse of :func:`fft2`; returns the real part as float32."""
    return np.fft.ifft2(spectrum).real.astype(np.float32)


def rfft2(images) -> np.ndarray:
    """Unnormalised real 2-D FFT over the last two axes, ``(..., ny, nx // 2 + 1)`` complex64."""
    return np.fft.rfft2(np.asarray(images, dtype=np.float32)).astype(np.complex64)


def irfft2(spectrum, shape) -> np.ndarray:
    """Inverse of :func:`rfft2` for real images of ``shape = (ny, nx)``; float32."""
    return np.fft.irfft2(spectrum, s=tuple(shape)).astype(np.float32)


def freq_grid_2d(ny: int, nx: int, *, rfft: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Frequency coordinates of a 2-D FFT in cycles/pixel.

    Parameters
    ----------
    ny, nx : int
        Image size (rows, columns).
    rfft : bool, optional
        If True, return the half-plane grid of ``numpy.fft.rfft2``
        (``nx // 2 + 1`` columns of non-negative ``kx``).

    Returns
    -------
    ky, kx : numpy.ndarray
        float64 arrays of shape ``(ny, nx)`` (or ``(ny, nx // 2 + 1)``) in
        numpy's unshifted layout; the Nyquist sample of an even axis is ``-0.5``
        (``+0.5`` for the rfft x axis).

    Examples
    --------
    >>> ky, kx = freq_grid_2d(4, 4)
    >>> kx[0]
    array([ 0.  ,  0.25, -0.5 , -0.25])
    """
    fy = np.fft.fftfreq(ny)
    fx = np.fft.rfftfreq(nx) if rfft else np.fft.fftfreq(nx)
    ky, kx = np.meshgrid(fy, fx, indexing="ij")
    return ky, kx


def _shift_phase_1d(n: int, shift: np.ndarray, *, rfft: bool) -> np.ndarray:
    """Phase factors ``exp(-2 pi i k d)`` for shifts ``d`` (shape ``(m,)``), Hermitian-safe at Nyquist.

    Returns ``(m, len(k))`` complex128.
    """
    k = np.fft.rfftfreq(n) if rfft else np.fft.fftfreq(n)
    phase = np.exp(-2j * np.pi * shift[:, None] * k[None, :])
    if n % 2 == 0:
        nyq = n // 2
        phase[:, nyq] = np.cos(np.pi * shift)
    return phase


def _shifts_array(shifts_xy, n: int) -> np.ndarray:
    s = np.asarray(shifts_xy, dtype=np.float64)
    if s.shape == (2,):
        s = np.broadcast_to(s, (n, 2))
    if s.shape != (n, 2):
        raise ValueError(f"shifts must have shape (2,) or ({n}, 2), got {np.shape(shifts_xy)}")
    return s


def fourier_shift(images, shifts_xy) -> np.ndarray:
    """Shift images cyclically by a phase ramp: content moves by ``+(dx, dy)`` pixels.

    Parameters
    ----------
    images : array_like
        ``(ny, nx)`` or ``(n, ny, nx)``.
    shifts_xy : array_like
        ``(2,)`` shift ``(dx, dy)`` in pixels applied to every image, or
        ``(n, 2)`` one per image. ``dx`` moves content towards larger column
        index, ``dy`` towards larger row index.

    Returns
    -------
    numpy.ndarray
        Shifted images, float32, same shape as the input.

    Notes
    -----
    Exact band-limited (sinc) interpolation with periodic boundaries (SPHIRE
    ``fshift``). Integer shifts equal ``numpy.roll``. For even sizes the
    Nyquist row/column is multiplied by ``cos(pi d)``, so a fractional shift
    followed by its opposite is the identity except for the Nyquist component.

    Examples
    --------
    >>> img = np.zeros((4, 4), np.float32); img[2, 2] = 1
    >>> np.argwhere(fourier_shift(img, (1, 0)) > 0.5).tolist()
    [[2, 3]]
    """
    stack, single = as_stack(images)
    n, ny, nx = stack.shape
    s = _shifts_array(shifts_xy, n)
    out = np.empty((n, ny, nx), dtype=np.float32)
    for sl in image_chunks(n, ny * nx):
        phase_y = _shift_phase_1d(ny, s[sl, 1], rfft=False)[:, :, None]
        phase = phase_y * _shift_phase_1d(nx, s[sl, 0], rfft=True)[:, None, :]
        out[sl] = np.fft.irfft2(np.fft.rfft2(stack[sl]) * phase, s=(ny, nx))
    return _restore(out, single)


def _resize_axis(spec: np.ndarray, axis: int, new: int) -> np.ndarray:
    """Crop or zero-pad a full (unshifted) spectrum along ``axis`` to ``new`` samples, Hermitian-correct."""
    old = spec.shape[axis]
    if new == old:
        return spec
    src = np.moveaxis(spec, axis, -1)
    out = np.zeros(src.shape[:-1] + (new,), dtype=spec.dtype)
    m = min(old, new)
    h = (m - 1) // 2
    k = np.arange(-h, h + 1)  # frequencies both grids hold unambiguously
    out[..., k % new] = src[..., k % old]
    if m % 2 == 0:
        q = m // 2
        if new < old:
            # +q and -q alias onto the new Nyquist sample: sum them (what sampling would do).
            out[..., (-q) % new] = src[..., q] + src[..., (-q) % old]
        else:
            # The old Nyquist sample represents +-q: split it evenly between the two new samples.
            out[..., q] = 0.5 * src[..., (-q) % old]
            out[..., (-q) % new] = 0.5 * src[..., (-q) % old]
    return np.moveaxis(out, -1, axis)


def resample_fourier(images, new_size, *, preserve: str = "values") -> np.ndarray:
    """Resample images to a new box by cropping or zero-padding their spectrum.

    Parameters
    ----------
    images : array_like
        ``(ny, nx)`` or ``(n, ny, nx)``.
    new_size : int or tuple of int
        New box ``m`` (square) or ``(my, mx)``. The pixel size changes by
        ``old / new`` (e.g. 128 -> 64 doubles the pixel size).
    preserve : {"values", "sum"}, optional
        ``"values"`` (default): pixel values are preserved (a constant image
        stays the same constant, like interpolation; SPHIRE's ``resample``).
        ``"sum"``: the sum over the image (integrated density) is preserved,
        so pixel values scale by ``(old/new)**2``.

    Returns
    -------
    numpy.ndarray
        ``(..., my, mx)`` float32.

    Notes
    -----
    Band-limited (sinc) resampling about the centre ``N // 2`` (which maps to
    ``m // 2``). Downsampling discards frequencies above the new Nyquist.
    The Nyquist sample of an even grid is handled Hermitian-correctly: when
    cropping, the old ``+h`` and ``-h`` coefficients alias onto the new
    Nyquist sample and are summed (for a real image this keeps the cosine
    part, the only part the coarser samples can see); when padding, an old
    Nyquist coefficient is split half/half between ``+h`` and ``-h`` (the
    real, symmetric interpretation). Hence padding then cropping back is the
    identity for any input, and outputs of real inputs are real.

    Examples
    --------
    >>> img = np.ones((8, 8), np.float32)
    >>> float(resample_fourier(img, 4).mean())
    1.0
    """
    if preserve not in ("values", "sum"):
        raise ValueError(f"preserve must be 'values' or 'sum', got {preserve!r}")
    stack, single = as_stack(images)
    n, ny, nx = stack.shape
    my, mx = (int(new_size), int(new_size)) if np.ndim(new_size) == 0 else (int(new_size[0]), int(new_size[1]))
    if my < 1 or mx < 1:
        raise ValueError(f"new size must be positive, got {(my, mx)}")
    scale = (my * mx) / (ny * nx) if preserve == "values" else 1.0
    out = np.empty((n, my, mx), dtype=np.float32)
    for sl in image_chunks(n, max(ny, my) * max(nx, mx)):
        # Phase origin at N//2: move the centre to index 0, resize, move it back to m//2.
        centred = np.roll(stack[sl], (-(ny // 2), -(nx // 2)), axis=(1, 2))
        spec = _resize_axis(_resize_axis(scipy.fft.fft2(centred.astype(np.float32)), 1, my), 2, mx)
        out[sl] = np.roll(scipy.fft.ifft2(spec).real * np.float32(scale), (my // 2, mx // 2), axis=(1, 2))
    return _restore(out, single)


def _size2(size) -> tuple[int, int]:
    if np.ndim(size) == 0:
        return int(size), int(size)
    return int(size[0]), int(size[1])


def window(images, size) -> np.ndarray:
    """Centre-crop images, keeping pixel ``N // 2`` at ``size // 2`` (SPHIRE ``Util.window``).

    Parameters
    ----------
    images : array_like
        ``(ny, nx)`` or ``(n, ny, nx)``.
    size : int or tuple of int
        Output box ``m`` or ``(my, mx)``, each no larger than the input.

    Returns
    -------
    numpy.ndarray
        ``(..., my, mx)`` float32 copy; the crop starts at ``N // 2 - m // 2``.
    """
    stack, single = as_stack(images)
    _, ny, nx = stack.shape
    my, mx = _size2(size)
    if my > ny or mx > nx or my < 1 or mx < 1:
        raise ValueError(f"window size {(my, mx)} must be within 1..{(ny, nx)}")
    y0, x0 = ny // 2 - my // 2, nx // 2 - mx // 2
    return _restore(stack[:, y0 : y0 + my, x0 : x0 + mx].copy(), single)


def pad(images, size, value: float = 0.0) -> np.ndarray:
    """Centre-pad images with a constant, keeping pixel ``N // 2`` at ``size // 2``.

    Parameters
    ----------
    images : array_like
        ``(ny, nx)`` or ``(n, ny, nx)``.
    size : int or tuple of int
        Output box ``m`` or ``(my, mx)``, each no smaller than the input.
    value : float or array_like, optional
        Fill value (default 0.0), a scalar or one value per image ``(n,)``.

    Returns
    -------
    numpy.ndarray
        ``(..., my, mx)`` float32; the input sits at offset ``m // 2 - N // 2``.
    """
    stack, single = as_stack(images)
    n, ny, nx = stack.shape
    my, mx = _size2(size)
    if my < ny or mx < nx:
        raise ValueError(f"pad size {(my, mx)} must be at least the image size {(ny, nx)}")
    fill = np.broadcast_to(np.asarray(value, dtype=np.float32).reshape(-1, 1, 1), (n, 1, 1))
    out = np.empty((n, my, mx), dtype=np.float32)
    out[...] = fill
    y0, x0 = my // 2 - ny // 2, mx // 2 - nx // 2
    out[:, y0 : y0 + ny, x0 : x0 + nx] = stack
    return _restore(out, single)
