"""Fourier samples of oriented images and the 3D grid they touch (projection and back-projection).

The covariance EM works on the image-grid Fourier samples of each particle: the
``N``-point rfft2 of the image (centre ``N // 2`` moved to the phase origin, the
origin shift removed), one member of each Hermitian pair, inside a disc of radius
``r_max`` (image frequency index, ``< N / 2``). A sample at integer frequency
``k = (kx, ky)`` of image ``i`` lies at ``q = npad (kx A_i[0, :] + ky A_i[1, :])`` of the
padded 3D grid (:mod:`isavar.core._fourier3d` layout, ``M = npad N``), exactly as in
:class:`isavar.core.reconstruct.FourierAccumulator` (insertion) and
:class:`isavar.core.projection.Projector` (central slices): trilinear weights over
the 8 neighbours, ``qx < 0`` folded to ``-q`` with the value conjugated. Gathering
with these weights is the projector; scattering with them is the reconstructor's
insertion. Units: unnormalised DFTs, so a sample of a projection equals the 3D DFT of
the ``M``-padded volume at ``q`` (no scale factor).
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft

from isavar.core import _fourier3d as f3
from isavar.core.ctf import ctf_at

__all__ = ["SliceSampler", "SliceGeometry"]


def _fold(s: np.ndarray, m: int, axis: int) -> np.ndarray:
    """Centred storage axis of length ``2R + 1`` -> FFT-layout axis of length ``m`` (duplicate ``+-R`` summed)."""
    r = (s.shape[axis] - 1) // 2
    j = np.arange(-r, r + 1) % m
    shape = list(s.shape)
    shape[axis] = m
    out = np.zeros(shape, dtype=s.dtype)
    src = np.moveaxis(s, axis, 0)
    dst = np.moveaxis(out, axis, 0)
    dst[j[1:]] = src[1:]  # -R+1 .. R are distinct modulo m
    dst[j[0]] += src[0]
    return out


class SliceGeometry:
    """Trilinear neighbours of one batch of central slices.

    Attributes
    ----------
    index : numpy.ndarray
        ``(8, c * S)`` int64 compact (band) indices, see :attr:`SliceSampler.band`.
    weight : numpy.ndarray
        ``(8, c * S)`` float32 trilinear weights.
    sign : numpy.ndarray
        ``(c * S,)`` float32, ``-1`` where the sample was folded (value conjugated).
    """

    def __init__(self, index: np.ndarray, weight: np.ndarray, sign: np.ndarray, shape: tuple[int, int]):
        self.index, self.weight, self.sign, self.shape = index, weight, sign, shape


class SliceSampler:
    """Sample set and 3D grid geometry shared by the E-step (gather) and the M-step (scatter).

    Parameters
    ----------
    box : int
        Image and volume size ``N``.
    r_max : float
        Largest image frequency index used (exclusive; at most ``N / 2``).
    npad : int, optional
        Padding factor of the 3D grid (default 2).
    """

    def __init__(self, box: int, r_max: float, *, npad: int = 2):
        self.box = int(box)
        self.npad = int(npad)
        self.m = self.npad * self.box
        self.grid = f3.HalfGrid(self.m)
        r_max = float(min(r_max, self.box / 2.0))
        kx, ky, flat = f3.half_plane_samples(self.box, r_max, unique=True)
        # The zero frequency is left out: it holds the image offset, which background
        # normalisation changes per image (a spurious "variability" of the volume's mean level).
        keep = (kx != 0) | (ky != 0)
        kx, ky, flat = kx[keep], ky[keep], flat[keep]
        self.kx, self.ky, self.flat = kx, ky, flat
        self.n_samples = kx.size
        self._k = (self.npad * np.stack([kx, ky], axis=1)).astype(np.float32)  # (S, 2) padded units
        #: Hermitian multiplicity of each sample in the full-plane likelihood (each stands for itself and -k).
        self.multiplicity = np.full(kx.size, 2.0, dtype=np.float32)
        #: Integer shell (image frequency index, rounded radius) of each sample.
        self.shell = np.rint(np.hypot(kx, ky)).astype(np.int64)
        self.n_shells = int(self.shell.max()) + 1 if self.shell.size else 1
        self.r_max = r_max
        # Storage voxels any sample's trilinear neighbours can reach: |q| <= npad * r_max + 2.
        g = self.grid
        r = g.r
        qz, qy, qx = np.meshgrid(np.arange(-r, r + 1), np.arange(-r, r + 1), np.arange(r + 1), indexing="ij")
        reach = (qx**2 + qy**2 + qz**2).ravel() <= (self.npad * r_max + 2.0) ** 2
        #: Flat storage indices of the band (the compact index of a voxel is its position here).
        self.band = np.flatnonzero(reach)
        self.n_band = self.band.size
        self._compact = np.full(g.size, -1, dtype=np.int64)
        self._compact[self.band] = np.arange(self.n_band)
        # The same map as a table of storage rows (qz, qy): the band holds qx = 0 .. len - 1 of each row.
        rows = self.band // g.sy
        self._row_len = np.bincount(rows, minlength=g.shape[0] * g.shape[1]).astype(np.int64)
        self._row_start = np.concatenate([[0], np.cumsum(self._row_len)[:-1]]).astype(np.int64)
        if not np.array_equal(self.band % g.sy, np.arange(self.n_band) - self._row_start[rows]):
            raise AssertionError("band rows must start at qx = 0")  # a half ball always does

    # ------------------------------------------------------------------ image side
    def image_samples(self, images: np.ndarray, origins_px: np.ndarray | None = None) -> np.ndarray:
        """``(c, S)`` complex64 samples of centred images, origin shift removed (content moved by +origin)."""
        x = np.asarray(images, dtype=np.float32)
        spec = sfft.rfft2(f3.pad_to_fft_layout(x, self.box, 2), workers=-1).reshape(len(x), -1)
        values = spec[:, self.flat]
        if origins_px is not None:
            o = np.asarray(origins_px, dtype=np.float64)
            arg = (-2.0 * np.pi / self.box) * (np.outer(o[:, 0], self.kx) + np.outer(o[:, 1], self.ky))
            values = values * (np.cos(arg) + 1j * np.sin(arg)).astype(np.complex64)
        return np.ascontiguousarray(values, dtype=np.complex64)

    def ctf_samples(self, pixel_size_A: float, params: dict) -> np.ndarray:
        """``(c, S)`` float32 CTF at the sample frequencies (RELION convention, :func:`~isavar.core.ctf.ctf_at`)."""
        cols = {k: np.asarray(v, dtype=np.float64)[:, None] for k, v in params.items()}
        scale = 1.0 / (self.box * float(pixel_size_A))
        return ctf_at(self.kx[None] * scale, self.ky[None] * scale, **cols).astype(np.float32)

    # ------------------------------------------------------------------ 3D side
    def geometry(self, rotations: np.ndarray) -> SliceGeometry:
        """Trilinear neighbours of the samples of images at orientations ``rotations`` (c, 3, 3)."""
        a = np.asarray(rotations, dtype=np.float32)
        c = a.shape[0]
        q = np.matmul(self._k[None], a[:, :2, :]).reshape(-1, 3)  # (c*S, 3)
        sign = np.where(q[:, 0] < 0, np.float32(-1.0), np.float32(1.0))
        q *= sign[:, None]
        base, fx, fy, fz = self.grid.linear_corners(q)
        gx, gy, gz = (1.0 - fx, fx), (1.0 - fy, fy), (1.0 - fz, fz)
        index = np.empty((8, base.size), dtype=np.int64)
        weight = np.empty((8, base.size), dtype=np.float32)
        for j, (offset, dx, dy, dz) in enumerate(self.grid.corner_offsets()):
            index[j] = self._compact[base + offset]
            weight[j] = gx[dx] * gy[dy] * gz[dz]
        return SliceGeometry(index, weight, sign, (c, self.n_samples))

    def gather(self, stores: np.ndarray, geo: SliceGeometry) -> np.ndarray:
        """Central-slice samples of several volumes: ``stores`` (n_band, V) complex64 -> (c, S, V)."""
        out = np.zeros((geo.index.shape[1], stores.shape[1]), dtype=np.complex64)
        for j in range(8):
            out += geo.weight[j][:, None] * stores[geo.index[j]]
        out.imag *= geo.sign[:, None]
        return out.reshape(geo.shape + (stores.shape[1],))

    def scatter(self, values: np.ndarray, geo: SliceGeometry) -> np.ndarray:
        """Back-project per-sample quantities: ``values`` (Q, c, S) real or complex -> (Q, n_band) float64/complex128.

        Complex values are conjugated where the sample was folded. Sums are taken
        in a fixed order (``numpy.bincount``), so the result is deterministic.
        """
        size = self.n_band
        idx = geo.index.ravel()
        w = geo.weight
        q = values.shape[0]
        flat = values.reshape(q, -1)
        cplx = np.iscomplexobj(values)
        out = np.zeros((q, size), dtype=np.complex128 if cplx else np.float64)
        for j in range(q):
            v = flat[j]
            if cplx:
                re = (w * v.real).ravel()
                im = (w * (v.imag * geo.sign)).ravel()
                out[j] = np.bincount(idx, re, minlength=size) + 1j * np.bincount(idx, im, minlength=size)
            else:
                out[j] = np.bincount(idx, (w * v).ravel(), minlength=size)
        return out

    def gather_at(self, stores: np.ndarray, rotations: np.ndarray) -> np.ndarray:
        """:meth:`gather` at :meth:`geometry` ``(rotations)``, compiled: ``stores`` (n_band, V) -> (c, S, V)."""
        from isavar.covariance._kernels import gather_slices

        rot = np.ascontiguousarray(rotations, dtype=np.float32)
        st = np.ascontiguousarray(stores, dtype=np.complex64)
        out = np.empty((rot.shape[0], self.n_samples, st.shape[1]), dtype=np.complex64)
        g = self.grid
        gather_slices(st, self._row_start, self._row_len, g.r, rot, self._k, float(g.r - f3._EDGE), out)
        return out

    def scatter_moments(self, u, zz, g, zhat, rotations, h_out: np.ndarray, b_out: np.ndarray) -> None:
        """Add the back-projection of ``u zz`` and ``g zhat`` (see :func:`em.batch_factors`) in place.

        ``h_out`` is ``(n_band, P)`` float64 and ``b_out`` ``(n_band, J)`` complex128 (voxel-major); equal,
        up to float64 rounding, to :meth:`scatter` of the formed values at :meth:`geometry` ``(rotations)``.
        """
        from isavar.covariance._kernels import scatter_moments

        rot = np.ascontiguousarray(rotations, dtype=np.float32)
        grid = self.grid
        scatter_moments(np.ascontiguousarray(u, np.float32), np.ascontiguousarray(zz, np.float64),
                        np.ascontiguousarray(g, np.complex64), np.ascontiguousarray(zhat, np.float64),
                        self._row_start, self._row_len, grid.r, rot, self._k, float(grid.r - f3._EDGE), h_out, b_out)

    # ------------------------------------------------------------------ volumes <-> storage
    def volumes_to_storage(self, volumes: np.ndarray) -> np.ndarray:
        """``(V, N, N, N)`` real volumes -> ``(n_band, V)`` complex64 padded half spectra (gridding pre-corrected)."""
        prof = f3.kernel_profile(self.box, self.m, "linear")
        out = np.empty((self.n_band, len(volumes)), dtype=np.complex64)
        for j, v in enumerate(volumes):
            corrected = f3.separable_divide(np.asarray(v, np.float32), prof)
            spec = f3.rfftn3(f3.pad_to_fft_layout(corrected, self.m, 3))
            out[:, j] = self.grid.fft_to_storage(spec).ravel()[self.band]
        return out

    def storage_to_fft(self, acc: np.ndarray, *, conjugate: bool) -> np.ndarray:
        """Accumulated band values ``(n_band,)`` -> rfftn-layout ``(M, M, M//2+1)``, self-paired planes completed.

        ``conjugate`` is True for data (partners conjugated) and False for real weights.
        """
        m = self.m
        full = np.zeros(self.grid.size, dtype=acc.dtype)
        full[self.band] = acc
        f = _fold(_fold(full.reshape(self.grid.shape), m, 0), m, 1)
        neg = (-np.arange(m)) % m
        for p in [0] + ([m // 2] if m % 2 == 0 else []):
            plane = f[:, :, p]
            partner = plane[np.ix_(neg, neg)]
            f[:, :, p] = plane + (np.conj(partner) if conjugate else partner)
        return f

    def fft_to_volume(self, f: np.ndarray) -> np.ndarray:
        """rfftn-layout padded spectrum -> ``(N, N, N)`` float32 volume (crop + gridding correction)."""
        vol = f3.irfftn3(f, self.m)
        vol = f3.crop_from_fft_layout(vol, self.box, 3)
        return f3.separable_divide(vol, f3.kernel_profile(self.box, self.m, "linear"))

    def fft_radius(self) -> np.ndarray:
        """``(M, M, M//2+1)`` radius of each rfftn voxel in image-frequency units (padded index / npad)."""
        m = self.m
        fz = np.fft.fftfreq(m, 1.0 / m)
        fx = np.arange(m // 2 + 1)
        r = np.sqrt(fz[:, None, None] ** 2 + fz[None, :, None] ** 2 + fx[None, None, :] ** 2)
        return (r / self.npad).astype(np.float32)
