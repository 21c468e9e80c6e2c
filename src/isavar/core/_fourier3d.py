"""Private helpers for 3D Fourier-space projection and insertion (half-complex grids).

Layouts
-------
* FFT layout: numpy's unshifted layout. A volume of size ``N`` is zero-padded to ``M``
  with its centre ``N // 2`` moved to index 0 (the phase origin), so no ``(-1)**k``
  factors are needed; the same holds for padded images.
* Centred half grid ("storage"): the rfft half of an ``M**3`` transform kept as an array
  of shape ``(2R + 1, 2R + 1, R + 1)`` with ``R = M // 2``, indexed ``[qz + R, qy + R, qx]``
  for integer frequencies ``-R <= qy, qz <= R`` and ``0 <= qx <= R`` (index units of
  ``1 / M`` cycles per pixel). For even ``M`` the planes ``+-R`` repeat the same FFT-layout
  plane; :func:`storage_to_fft` folds them. Trilinear neighbours of any ``|q| < R`` are
  inside the storage, so flat indices need no wrapping.

Frequency vectors ``q`` are ``(qx, qy, qz)`` in volume coordinates (x fastest axis);
points with ``qx < 0`` are reflected to ``-q`` and their values conjugated (Hermitian
symmetry of the transform of a real volume).
"""

from __future__ import annotations

import itertools

import numpy as np
import scipy.fft as sfft

_EDGE = 1e-3  # keep interpolation positions this far inside the storage edge


def fft_positions(n: int, m: int) -> np.ndarray:
    """Indices in an FFT-layout axis of length ``m`` of the ``n`` samples of a centred axis."""
    return (np.arange(n) - n // 2) % m


def _segments(n: int, m: int):
    """(source slice, destination slice) pairs moving centre ``n // 2`` of ``n`` samples to index 0 of ``m``."""
    c = n // 2
    return ((slice(c, n), slice(0, n - c)), (slice(0, c), slice(m - c, m)))


def pad_to_fft_layout(arr: np.ndarray, m: int, ndim: int) -> np.ndarray:
    """Zero-pad the last ``ndim`` axes of ``arr`` (size ``n``) to ``m``, centre ``n//2`` -> index 0."""
    n = arr.shape[-1]
    if m == n:
        return np.fft.ifftshift(arr, axes=tuple(range(-ndim, 0))).astype(np.float32, copy=False)
    out = np.zeros(arr.shape[:-ndim] + (m,) * ndim, dtype=np.float32)
    for combo in itertools.product(_segments(n, m), repeat=ndim):
        src = (Ellipsis,) + tuple(seg[0] for seg in combo)
        dst = (Ellipsis,) + tuple(seg[1] for seg in combo)
        out[dst] = arr[src]
    return out


def crop_from_fft_layout(arr: np.ndarray, n: int, ndim: int) -> np.ndarray:
    """Inverse of :func:`pad_to_fft_layout`: the centred ``n``-box of FFT-layout axes."""
    m = arr.shape[-1]
    pos = fft_positions(n, m)
    index = (Ellipsis,) + tuple(np.ix_(*([pos] * ndim)))
    return np.ascontiguousarray(arr[index])


def kernel_profile(n: int, m: int, interpolation: str) -> np.ndarray:
    """Real-space transform of the Fourier interpolation kernel along one axis.

    Parameters
    ----------
    n : int
        Box size; positions ``x = i - n // 2``.
    m : int
        Padded Fourier grid size (kernel width is one ``1/m`` sample).
    interpolation : str
        ``"linear"`` (tent: ``sinc(x/m)**2``) or ``"nearest"`` (box: ``sinc(x/m)``).

    Returns
    -------
    numpy.ndarray
        ``(n,)`` float64 profile (``np.sinc(t) = sin(pi t) / (pi t)``).
    """
    x = (np.arange(n) - n // 2) / m
    s = np.sinc(x)
    return s * s if interpolation == "linear" else s


def separable_divide(volume: np.ndarray, profile: np.ndarray) -> np.ndarray:
    """Divide a volume by ``profile[z] * profile[y] * profile[x]`` (float32 result)."""
    p = profile.astype(np.float64)
    denom = p[:, None, None] * p[None, :, None] * p[None, None, :]
    return (volume / denom).astype(np.float32)


def half_plane_samples(size: int, r_max: float, scale: float = 1.0, *, unique: bool = True):
    """Integer 2D frequencies of an rfft2 half plane inside a disc.

    Keeps ``(kx**2 + ky**2) * scale**2 < r_max**2`` with ``kx >= 0``; with ``unique`` the
    ``kx = 0`` column keeps only ``ky >= 0`` (one member of each Hermitian pair, as
    insertion needs), otherwise the whole column (as ``irfft2`` needs).

    Parameters
    ----------
    size : int
        Image size (rfft2 shape ``(size, size // 2 + 1)``).
    r_max : float
        Radius limit in units of the 3D grid after multiplying by ``scale``.
    scale : float
        Factor from 2D frequency index to 3D grid index.

    Returns
    -------
    kx, ky : numpy.ndarray
        ``(S,)`` float64 signed frequency indices.
    flat : numpy.ndarray
        ``(S,)`` int64 flat indices into a ``(size, size // 2 + 1)`` rfft2 array.
    """
    h = size // 2 + 1
    ky = np.fft.fftfreq(size, 1.0 / size)
    kx = np.arange(h, dtype=np.float64)
    kyy, kxx = np.meshgrid(ky, kx, indexing="ij")
    keep = (kxx**2 + kyy**2) * scale**2 < r_max**2
    if unique:
        keep &= (kxx > 0) | (kyy >= 0)
    rows, cols = np.nonzero(keep)
    return kxx[keep], kyy[keep], rows * h + cols


class HalfGrid:
    """Geometry of the centred half-grid storage for a padded size ``m``."""

    def __init__(self, m: int):
        self.m = int(m)
        self.r = self.m // 2
        r = self.r
        self.shape = (2 * r + 1, 2 * r + 1, r + 1)
        self.size = int(np.prod(self.shape))
        self.sx = 1
        self.sy = r + 1
        self.sz = (2 * r + 1) * (r + 1)
        self.origin = r * self.sz + r * self.sy  # flat index of q = 0

    # ------------------------------------------------------------------ positions
    def linear_corners(self, q: np.ndarray):
        """Base flat indices and fractional offsets of trilinear interpolation.

        ``q`` must be folded (``qx >= 0``) and inside ``|q| < R``; positions are clipped a
        hair inside the storage to absorb round-off.
        """
        lim = self.r - _EDGE
        qx = np.clip(q[..., 0], 0.0, lim)
        qy = np.clip(q[..., 1], -lim, lim)
        qz = np.clip(q[..., 2], -lim, lim)
        fx, fy, fz = np.floor(qx), np.floor(qy), np.floor(qz)
        base = (
            self.origin + fz.astype(np.int64) * self.sz + fy.astype(np.int64) * self.sy + fx.astype(np.int64)
        )
        return base, (qx - fx).astype(np.float32), (qy - fy).astype(np.float32), (qz - fz).astype(np.float32)

    def corner_offsets(self):
        """The 8 flat-index offsets and their (dx, dy, dz) bits."""
        out = []
        for dz in (0, 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    out.append((dz * self.sz + dy * self.sy + dx * self.sx, dx, dy, dz))
        return out

    # ------------------------------------------------------------------ layouts
    def fft_to_storage(self, f: np.ndarray) -> np.ndarray:
        """Centred storage from an rfftn array of shape ``(m, m, m // 2 + 1)``."""
        j = np.arange(-self.r, self.r + 1) % self.m
        return np.ascontiguousarray(f[np.ix_(j, j, np.arange(self.r + 1))])

    def storage_to_fft(self, s: np.ndarray) -> np.ndarray:
        """Fold centred storage into an rfftn-layout array ``(m, m, m // 2 + 1)`` (sums duplicates)."""
        m, r = self.m, self.r
        j = np.arange(-r, r + 1) % m
        out = np.zeros((m, s.shape[1], s.shape[2]), dtype=s.dtype)
        np.add.at(out, j, s)
        full = np.zeros((m, m, s.shape[2]), dtype=s.dtype)
        np.add.at(full, (slice(None), j), out)
        return full


def hermitian_fix_planes(f: np.ndarray, w: np.ndarray, m: int) -> None:
    """Make the self-paired rfft planes (``kx = 0`` and, for even ``m``, ``kx = m/2``) consistent.

    Each sample was inserted at only one of ``+-q``; on those planes both members of a pair
    are stored, so each receives its partner's conjugated data and weight (in place).
    """
    neg = (-np.arange(m)) % m
    planes = [0] + ([m // 2] if m % 2 == 0 else [])
    for p in planes:
        fp = f[:, :, p]
        wp = w[:, :, p]
        f_partner = np.conj(fp[np.ix_(neg, neg)])
        w_partner = wp[np.ix_(neg, neg)]
        f[:, :, p] = fp + f_partner
        w[:, :, p] = wp + w_partner


def rfftn3(volume: np.ndarray) -> np.ndarray:
    """Single-precision rfftn of a 3D array (complex64)."""
    return sfft.rfftn(volume.astype(np.float32, copy=False), workers=-1)


def irfftn3(f: np.ndarray, m: int) -> np.ndarray:
    """Single-precision irfftn to an ``m**3`` real array."""
    return sfft.irfftn(f.astype(np.complex64, copy=False), s=(m, m, m), workers=-1)
