"""3D reconstruction from oriented 2D images by direct Fourier inversion.

Each image is zero-padded ``npad`` times (centre ``N // 2`` at the phase origin), Fourier
transformed, shifted by ``+origin`` (re-centring the particle, see
:mod:`isavar.conventions`), and its samples ``k`` inside the Nyquist disc are inserted at
the 3D frequency ``q = kx * (A S)[0, :] + ky * (A S)[1, :]`` of the padded grid, once per
symmetry element ``S`` (``A S`` projects a symmetric volume to the same image, see
:func:`isavar.core.geometry.symmetry_expand`). Insertion spreads each sample over its 8
trilinear neighbours (or the nearest voxel, as SPHIRE's ``nn4``), accumulating

* without CTF: ``data += w F``, ``weights += w``;
* with CTF: ``data += w CTF F``, ``weights += w CTF**2``;

(``w`` the interpolation weight) on a half-complex grid. :meth:`FourierAccumulator.finish`
makes the self-paired planes Hermitian-consistent, divides ``data / (weights + lambda)``,
inverse transforms, crops the central ``N**3`` box and divides by the real-space transform
of the interpolation kernel (``sinc**2`` for trilinear, ``sinc`` for nearest; gridding
correction). Scale: a reconstruction from projections made by
:func:`isavar.core.projection.project` (ray sums) has the original voxel values.

The accumulators are plain arrays: sum ``.data`` and ``.weights`` over processes (or use
:meth:`FourierAccumulator.merge`) before ``finish``.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft

from isavar.core import _fourier3d as f3
from isavar.core.geometry import parse_symmetry, symmetry_matrices

__all__ = ["FourierAccumulator", "reconstruct", "nn4_level_and_mask"]

_INTERPOLATIONS = ("linear", "nearest")


class FourierAccumulator:
    """Running Fourier-space sums for direct Fourier inversion.

    Parameters
    ----------
    box : int
        Image and volume size ``N``.
    npad : int, optional
        Padding factor of images and of the 3D grid (default 2).
    symmetry : str, optional
        Point group imposed by inserting every image once per element (default ``"c1"``).
    interpolation : {"linear", "nearest"}, optional
        Trilinear spreading (default) or nearest voxel (SPHIRE ``nn4``, 8 times cheaper).

    Attributes
    ----------
    data : numpy.ndarray
        complex64 accumulator, shape :attr:`grid_shape` (centred half-grid layout, private).
    weights : numpy.ndarray
        float32 accumulator, same shape.
    n_inserted : int
        Images inserted (not counting symmetry copies).

    Notes
    -----
    Memory: about ``12 * (npad * N)**3 / 2`` bytes (100 MB for ``N = 128``). Cost per
    image: ``nsym * pi * (npad * N)**2 / 8`` samples, each scattered to 8 voxels
    (linear) or 1 (nearest).
    """

    #: Radius (padded-grid units) inside which trilinear insertion samples every padded-grid frequency.
    dense_radius = 8.0

    def __init__(self, box: int, *, npad: int = 2, symmetry: str = "c1", interpolation: str = "linear"):
        box, npad = int(box), int(npad)
        if box < 2:
            raise ValueError(f"box must be >= 2, got {box}")
        if npad < 1:
            raise ValueError(f"npad must be >= 1, got {npad}")
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {_INTERPOLATIONS}, got {interpolation!r}")
        parse_symmetry(symmetry)
        self.box = box
        self.npad = npad
        self.m = npad * box
        self.symmetry = symmetry
        self.interpolation = interpolation
        self._sym = symmetry_matrices(symmetry)
        self._grid = f3.HalfGrid(self.m)
        self.grid_shape = self._grid.shape
        self.data = np.zeros(self.grid_shape, dtype=np.complex64)
        self.weights = np.zeros(self.grid_shape, dtype=np.float32)
        self.n_inserted = 0
        self._setup_samples()

    def _setup_samples(self) -> None:
        """Choose the 2D frequencies inserted per image (padded-grid units ``k / M``).

        ``nearest`` (as SPHIRE's nn4) uses every padded-grid frequency of the zero-padded
        image. ``linear`` (as RELION's backprojector) uses the image-grid frequencies
        (every ``npad``-th padded-grid one, from an ``N``-point FFT) plus, inside
        :attr:`dense_radius`, every padded-grid frequency (computed by a small separable
        DFT): near the origin the radii of image-grid samples are too coarsely quantised
        for the trilinear kernel and the low-frequency amplitudes would be biased.
        """
        m, r, npad = self.m, self._grid.r, self.npad
        if self.interpolation == "nearest" or npad == 1:
            self._fft_size = m
            kx, ky, flat = f3.half_plane_samples(m, r, unique=True)
            dense_kx = dense_ky = np.zeros(0)
            self._dense_block = None
        else:
            self._fft_size = self.box
            kx, ky, flat = f3.half_plane_samples(self.box, r, scale=npad, unique=True)
            kx, ky = kx * npad, ky * npad
            rd = min(float(self.dense_radius), float(r))
            outside = kx**2 + ky**2 >= rd**2
            kx, ky, flat = kx[outside], ky[outside], flat[outside]
            dkx, dky, _ = f3.half_plane_samples(m, rd, unique=True)
            dense_kx, dense_ky = dkx, dky
            # Separable DFT matrices over the centred pixel coordinates for the dense block.
            rows = np.arange(dky.min(), dky.max() + 1) if dky.size else np.zeros(0)
            cols = np.arange(0, dkx.max() + 1) if dkx.size else np.zeros(0)
            coords = np.arange(self.box) - self.box // 2
            ey = np.exp(-2j * np.pi * np.outer(rows, coords) / m).astype(np.complex64)  # (ny, N)
            ex = np.exp(-2j * np.pi * np.outer(coords, cols) / m).astype(np.complex64)  # (N, nx)
            pos = (dky - rows[0]).astype(np.int64) * cols.size + dkx.astype(np.int64) if dky.size else None
            self._dense_block = (ey, ex, pos)
        self._flat = flat
        self._kx = np.concatenate([kx, dense_kx])
        self._ky = np.concatenate([ky, dense_ky])
        self._k = np.stack([self._kx, self._ky], axis=1).astype(np.float32)  # (S, 2)

    # ------------------------------------------------------------------ insertion
    def insert(self, images, rotations, origins_px=None, ctf=None, *, chunk_size: int | None = None) -> None:
        """Insert images at their orientations.

        Parameters
        ----------
        images : array_like
            ``(n, N, N)`` images (ndarray or anything sliceable to arrays, e.g. LazyImages);
            read ``chunk_size`` at a time.
        rotations : array_like
            ``(n, 3, 3)`` matrices ``A`` of :func:`isavar.conventions.euler_to_matrix`.
        origins_px : array_like, optional
            ``(n, 2)`` RELION origins in pixels (particle centre at ``N // 2 - origin``).
        ctf : array_like, optional
            ``(n, N, N)`` CTF values in FFT layout on the image grid (bilinearly
            interpolated to the padded grid), or ``(n, npad*N, npad*N)`` on the padded
            grid. The images must already carry this CTF (as recorded data do).
        chunk_size : int, optional
            Images per batch (default: about 2 million Fourier samples per batch).
        """
        n = len(images)
        a = np.asarray(rotations, dtype=np.float64)
        if a.shape != (n, 3, 3):
            raise ValueError(f"rotations must have shape ({n}, 3, 3), got {a.shape}")
        if n and np.abs(a @ a.transpose(0, 2, 1) - np.eye(3)).max() > 1e-3:
            raise ValueError("rotations must be orthonormal matrices (|A A^T - I| > 1e-3)")
        origins = None
        if origins_px is not None:
            origins = np.asarray(origins_px, dtype=np.float64)
            if origins.shape != (n, 2):
                raise ValueError(f"origins_px must have shape ({n}, 2), got {origins.shape}")
        if ctf is not None and len(ctf) != n:
            raise ValueError(f"ctf has {len(ctf)} entries for {n} images")
        if chunk_size is None:
            chunk_size = max(1, 2_000_000 // max(self._kx.size, 1))
        for start in range(0, n, chunk_size):
            stop = min(n, start + chunk_size)
            imgs = np.asarray(images[start:stop], dtype=np.float32)
            if imgs.ndim != 3 or imgs.shape[1:] != (self.box, self.box):
                raise ValueError(f"images must have shape (n, {self.box}, {self.box}), got {imgs.shape}")
            if not np.all(np.isfinite(imgs)):
                raise ValueError(f"images {start}..{stop - 1} contain NaN or Inf")
            values = self._image_samples(imgs, None if origins is None else origins[start:stop])
            weights = None
            if ctf is not None:
                c = self._ctf_samples(np.asarray(ctf[start:stop], dtype=np.float32))
                values *= c
                weights = c * c
            for s in self._sym:
                self._scatter(a[start:stop] @ s, values, weights)
            self.n_inserted += stop - start

    def _image_samples(self, imgs: np.ndarray, origins: np.ndarray | None) -> np.ndarray:
        """Fourier samples ``(c, S)`` complex64 of the centred, origin-corrected images."""
        size = self._fft_size
        spec = sfft.rfft2(f3.pad_to_fft_layout(imgs, size, 2), workers=-1).reshape(len(imgs), -1)
        values = spec[:, self._flat]
        if self._dense_block is not None:
            ey, ex, pos = self._dense_block
            half = (imgs @ ex.real) + 1j * (imgs @ ex.imag)  # real GEMMs, (c, N, nx)
            block = ey @ half.astype(np.complex64)  # (c, ny, nx) DFT at k / M
            values = np.concatenate([values, block.reshape(len(imgs), -1)[:, pos]], axis=1)
        if origins is not None:
            # Shift content by +origin: multiply by exp(-2 pi i k . origin / M).
            arg = (-2.0 * np.pi / self.m) * (np.outer(origins[:, 0], self._kx) + np.outer(origins[:, 1], self._ky))
            values = values * (np.cos(arg) + 1j * np.sin(arg)).astype(np.complex64)
        return np.ascontiguousarray(values, dtype=np.complex64)

    def _ctf_samples(self, ctf: np.ndarray) -> np.ndarray:
        """CTF values ``(c, S)`` float32 at the sample frequencies ``k / M``."""
        c = len(ctf)
        size = ctf.shape[-1]
        if ctf.ndim != 3 or ctf.shape[1:] not in ((self.box, self.box), (self.m, self.m)):
            raise ValueError(
                f"ctf must have shape (n, {self.box}, {self.box}) or (n, {self.m}, {self.m}), got {ctf.shape}"
            )
        # Frequency k / M is index k * size / M on the CTF's grid (FFT layout, periodic).
        px, py = self._kx * size / self.m, self._ky * size / self.m
        x0, y0 = np.floor(px), np.floor(py)
        fx, fy = (px - x0).astype(np.float32), (py - y0).astype(np.float32)
        x0i, y0i = x0.astype(np.int64), y0.astype(np.int64)
        flat = ctf.reshape(c, -1)
        out = flat[:, (y0i % size) * size + x0i % size] * ((1.0 - fx) * (1.0 - fy))
        for dy, dx, w in ((0, 1, fx * (1.0 - fy)), (1, 0, (1.0 - fx) * fy), (1, 1, fx * fy)):
            if np.any(w):  # on-grid samples need no neighbours
                out += flat[:, ((y0i + dy) % size) * size + (x0i + dx) % size] * w
        return out.astype(np.float32, copy=False)

    def _scatter(self, rot: np.ndarray, values: np.ndarray, weights: np.ndarray | None) -> None:
        """Scatter-add samples of one batch at orientations ``rot`` (c, 3, 3)."""
        grid = self._grid
        c = rot.shape[0]
        # q = kx * A[0, :] + ky * A[1, :] in padded-grid units, one BLAS call: (S, c, 3).
        rows = np.ascontiguousarray(rot[:, :2, :].astype(np.float32).transpose(1, 0, 2)).reshape(2, c * 3)
        q = (self._k @ rows).reshape(-1, c, 3)
        sign = np.where(q[..., 0] < 0, np.float32(-1.0), np.float32(1.0))
        q *= sign[..., None]
        vals = np.array(values.T, order="C", copy=True)  # never modify the caller's samples
        vals.imag *= sign  # conjugate the reflected samples
        vals = vals.ravel()
        wts = None if weights is None else np.ascontiguousarray(weights.T).ravel()
        # Flat indices are exact integers in float32 below 2**24, else use float64.
        ftype = np.float32 if grid.size < 2**24 else np.float64
        strides = np.array([grid.sx, grid.sy, grid.sz], dtype=ftype)
        data = self.data.reshape(-1)
        acc_w = self.weights.reshape(-1)
        if self.interpolation == "nearest":
            q += np.float32(0.5)  # nn4 rounding: floor(q + 0.5)
            idx = (np.floor(q, out=q) @ strides).astype(np.int64).ravel()
            idx += grid.origin
            np.add.at(data, idx, vals)
            np.add.at(acc_w, idx, np.ones(idx.size, np.float32) if wts is None else wts)
            return
        fl = np.floor(q)
        frac = (q - fl).reshape(-1, 3)
        base = (fl @ strides).astype(np.int64).ravel()
        base += grid.origin
        fx, fy, fz = frac[:, 0], frac[:, 1], frac[:, 2]
        gx = (1.0 - fx, fx)
        gy = (1.0 - fy, fy)
        gz = (1.0 - fz, fz)
        for offset, dx, dy, dz in grid.corner_offsets():
            w = gx[dx] * gy[dy] * gz[dz]
            idx = base + offset
            np.add.at(data, idx, vals * w)
            np.add.at(acc_w, idx, w if wts is None else wts * w)

    # ------------------------------------------------------------------ combining
    def merge(self, other: FourierAccumulator) -> FourierAccumulator:
        """Add another accumulator's sums into this one (in place); returns ``self``.

        Raises
        ------
        ValueError
            If the box, padding, symmetry or interpolation differ.
        """
        same = (self.box, self.npad, self.symmetry, self.interpolation) == (
            other.box,
            other.npad,
            other.symmetry,
            other.interpolation,
        )
        if not same:
            raise ValueError("cannot merge FourierAccumulators with different box, npad, symmetry or interpolation")
        self.data += other.data
        self.weights += other.weights
        self.n_inserted += other.n_inserted
        return self

    # ------------------------------------------------------------------ finishing
    def finish(self, *, regularisation: float = 1e-3, snr: float | None = None) -> np.ndarray:
        """Divide, inverse transform, crop and gridding-correct.

        Parameters
        ----------
        regularisation : float, optional
            ``lambda`` as a fraction of the mean non-zero weight (default 1e-3): the
            voxel estimate is ``data / (weights + lambda)``, so voxels without data give 0
            and poorly sampled ones are damped (Wiener-style with a CTF).
        snr : float, optional
            If given, use the absolute ``lambda = 1 / snr`` instead (SPHIRE ``nn4`` uses
            ``snr = 1`` with nearest interpolation and unit weights, i.e. ``W + 1``).

        Returns
        -------
        numpy.ndarray
            ``(N, N, N)`` float32 volume, centre ``N // 2``.
        """
        grid = self._grid
        f = grid.storage_to_fft(self.data)
        w = grid.storage_to_fft(self.weights)
        f3.hermitian_fix_planes(f, w, self.m)
        if snr is not None:
            if snr <= 0:
                raise ValueError(f"snr must be > 0, got {snr}")
            lam = 1.0 / float(snr)
        else:
            if regularisation < 0:
                raise ValueError(f"regularisation must be >= 0, got {regularisation}")
            positive = w[w > 0]
            lam = float(regularisation) * (float(positive.mean()) if positive.size else 0.0)
        denom = w + np.float32(lam)
        safe = denom > 0
        f = np.where(safe, f / np.where(safe, denom, 1.0), 0).astype(np.complex64)
        vol = f3.irfftn3(f, self.m)
        vol = f3.crop_from_fft_layout(vol, self.box, 3)
        return f3.separable_divide(vol, f3.kernel_profile(self.box, self.m, self.interpolation))


def reconstruct(
    images,
    rotations,
    *,
    origins_px=None,
    ctf=None,
    symmetry: str = "c1",
    npad: int = 2,
    interpolation: str = "linear",
    regularisation: float = 1e-3,
    snr: float | None = None,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Reconstruct a volume from oriented images (direct Fourier inversion).

    Parameters
    ----------
    images : array_like
        ``(n, N, N)`` images (ndarray or LazyImages), pixel = ray sum.
    rotations : array_like
        ``(n, 3, 3)`` matrices ``A`` (:func:`isavar.conventions.euler_to_matrix`).
    origins_px : array_like, optional
        ``(n, 2)`` RELION origins in pixels.
    ctf : array_like, optional
        ``(n, N, N)`` FFT-layout CTF of each image (images must carry it); gives a
        CTF-weighted (Wiener-style) reconstruction.
    symmetry : str, optional
        Point group to impose (default ``"c1"``).
    npad : int, optional
        Padding factor (default 2).
    interpolation : {"linear", "nearest"}, optional
        Fourier-space spreading kernel.
    regularisation, snr : float, optional
        See :meth:`FourierAccumulator.finish`.
    chunk_size : int, optional
        Images per batch.

    Returns
    -------
    numpy.ndarray
        ``(N, N, N)`` float32 volume such that ``project(reconstruct(project(V)))``
        reproduces ``project(V)``.
    """
    shape = getattr(images, "shape", None)
    if shape is None or len(shape) != 3:
        images = np.asarray(images, dtype=np.float32)
        shape = images.shape
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"images must have shape (n, N, N), got {tuple(shape)}")
    acc = FourierAccumulator(shape[1], npad=npad, symmetry=symmetry, interpolation=interpolation)
    acc.insert(images, rotations, origins_px=origins_px, ctf=ctf, chunk_size=chunk_size)
    return acc.finish(regularisation=regularisation, snr=snr)


def nn4_level_and_mask(volume) -> np.ndarray:
    """SPHIRE ``nn4`` finishing: remove the outer-shell mean inside the sphere, zero outside.

    With ``R = N // 2`` and ``r`` the distance from the centre ``N // 2``: the mean of the
    voxels with ``(R - 1)**2 <= r**2 <= R**2`` is subtracted from every voxel with
    ``r**2 <= R**2``, and voxels with ``r**2 > R**2`` are set to 0 (spec variability §3.10).

    Parameters
    ----------
    volume : array_like
        ``(N, N, N)`` volume.

    Returns
    -------
    numpy.ndarray
        ``(N, N, N)`` float32, a new array.
    """
    v = np.array(volume, dtype=np.float32)
    if v.ndim != 3 or not (v.shape[0] == v.shape[1] == v.shape[2]):
        raise ValueError(f"volume must be a cube (N, N, N), got shape {v.shape}")
    n = v.shape[0]
    c, radius = n // 2, n // 2
    z, y, x = np.ogrid[:n, :n, :n]
    r2 = (x - c) ** 2 + (y - c) ** 2 + (z - c) ** 2
    inside = r2 <= radius**2
    shell = inside & (r2 >= (radius - 1) ** 2)
    level = float(v[shell].mean()) if shell.any() else 0.0
    v[inside] -= level
    v[~inside] = 0.0
    return v
