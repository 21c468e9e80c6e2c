"""Polar (ring) resampling and rotational cross-correlation (SPHIRE's Numrinit/ringwe/Polar2Dm/Crosrng_ms).

This module holds the ring geometry and the per-ring numerics of the 2-D
polar aligner (spec isac2 §3-§4); :mod:`isavar.core.align2d` builds the
batched translational/rotational/mirror search on top of it.

Conventions
-----------
* Images are square float32 stacks ``(n, N, N)`` indexed ``img[y, x]``; the
  image centre is pixel ``(N // 2, N // 2)`` (0-based).
* Ring ``r`` is sampled at ``n_r`` angles ``phi_j = 2 pi j / n_r`` at the point
  ``x = cx + r sin(phi_j)``, ``y = cy + r cos(phi_j)`` (angle measured from +y
  towards +x) with bilinear interpolation.
* Rings are stored back to back in one flat axis of length ``lcirc = sum n_r``
  (ring ``i`` occupies ``grid.offsets[i]:grid.offsets[i + 1]``).
* A rotation by ``alpha`` in the §0.1 sense moves the content found at polar
  angle ``phi`` to ``phi + alpha``; the x-mirror maps ``phi`` to ``-phi``.

The rotational correlation of reference rings ``a_r`` and image rings ``b_r``
is (spec §4.4)::

    c(alpha)   = sum_r r (2 pi / n_r) sum_j a_r(phi_j) b_r(phi_j - alpha)
    c_m(alpha) = sum_r r (2 pi / n_r) sum_j a_r(phi_j) b_r(-phi_j - alpha)

evaluated at ``alpha_k = 360 k / maxrin`` degrees, ``k = 0 .. maxrin - 1``
(shorter rings are trigonometrically interpolated). It is computed in Fourier
space: per ring frequency ``m``, ``X(m) = sum_r w_r A_r(m) conj(B_r(m))``; for
the mirror ``X_m(m) = sum_r w_r conj(A_r(m) B_r(m))`` (the mirrored real ring
``b(-phi)`` has the conjugate spectrum, and ``c_m`` correlates it with the
angle running backwards: ``c_m(alpha) = c'(-alpha)``), with
``w_r = r (2 pi / n_r) (maxrin / n_r)`` and half that
weight on the Nyquist coefficient of rings shorter than ``maxrin``; one
inverse real FFT of length ``maxrin`` gives the curve.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import scipy.fft
import scipy.sparse

__all__ = [
    "PolarGrid",
    "polar_grid",
    "check_fits",
    "polar_transform",
    "ring_spectra",
    "ring_statistics",
    "normalize_rings",
    "reference_spectra",
    "rotational_correlation",
    "rings_from_spectra",
    "polar_to_image",
]


@dataclass(frozen=True, eq=False)
class PolarGrid:
    """Ring geometry of the polar aligner (SPHIRE ``Numrinit`` + ``ringwe``), with precomputed arrays.

    Build it with :func:`polar_grid`. All arrays are read-only.

    Attributes
    ----------
    radii : numpy.ndarray
        ``(n_rings,)`` int ring radii in pixels (``first_ring, first_ring + ring_step, ... <= last_ring``).
    n_samples : numpy.ndarray
        ``(n_rings,)`` int samples per ring ``n_r`` (smallest power of two strictly greater
        than ``round(2 pi r)``, ``round(pi r)`` for mode "H").
    offsets : numpy.ndarray
        ``(n_rings + 1,)`` int start of every ring in the flat sample axis; ``offsets[-1] = lcirc``.
    weights : numpy.ndarray
        ``(n_rings,)`` float64 SPHIRE ``ringwe`` weights ``w_r = r (2 pi / n_r) (maxrin / n_r)``
        (arc length times the FFT-length compensation).
    maxrin : int
        ``n_r`` of the last (longest) ring = length of the correlation curves.
    mode : str
        "F" (full circle) or "H" (half circle; angles ``pi j / n_r``).
    sample_dx, sample_dy : numpy.ndarray
        ``(lcirc,)`` float64 sample positions relative to the sampling centre, in pixels
        (``r sin(phi_j)``, ``r cos(phi_j)``).
    sample_weights : numpy.ndarray
        ``(lcirc,)`` float64 per-sample arc-length weights ``2 pi r / n_r`` (ring normalisation, §4.2).
    """

    radii: np.ndarray
    n_samples: np.ndarray
    offsets: np.ndarray
    weights: np.ndarray
    maxrin: int
    mode: str
    sample_dx: np.ndarray
    sample_dy: np.ndarray
    sample_weights: np.ndarray
    # ring groups of equal length: tuples (n_r, first ring index, stop ring index, sample start, sample stop)
    groups: tuple = field(repr=False)

    @property
    def n_rings(self) -> int:
        """Number of rings."""
        return int(self.radii.size)

    @property
    def lcirc(self) -> int:
        """Total number of polar samples ``sum_r n_r``."""
        return int(self.offsets[-1])

    @property
    def last_ring(self) -> int:
        """Radius of the outermost ring (SPHIRE ``ou``)."""
        return int(self.radii[-1])

    @property
    def n_freq(self) -> int:
        """Length ``maxrin // 2 + 1`` of a correlation spectrum."""
        return self.maxrin // 2 + 1


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def polar_grid(first_ring: int, last_ring: int, ring_step: int = 1, mode: str = "F") -> PolarGrid:
    """Ring geometry for radii ``first_ring .. last_ring`` (SPHIRE ``Numrinit(ir, ou, rs, mode)`` + ``ringwe``).

    Parameters
    ----------
    first_ring, last_ring : int
        Innermost and outermost ring radius in pixels (SPHIRE ``ir``, ``ou``); ``1 <= first_ring <= last_ring``.
    ring_step : int
        Radius increment (SPHIRE ``rs``), >= 1.
    mode : {"F", "H"}
        Full circle (ISAC) or half circle.

    Returns
    -------
    PolarGrid
        With the defaults of ISAC (1, 29, 1, "F"): ``n_r`` = 8, 16, 32×3, 64×5, 128×10, 256×9,
        ``lcirc = 4024``, ``maxrin = 256``.
    """
    first_ring, last_ring, ring_step = int(first_ring), int(last_ring), int(ring_step)
    if first_ring < 1 or last_ring < first_ring or ring_step < 1:
        raise ValueError(
            f"invalid rings: first_ring={first_ring}, last_ring={last_ring}, ring_step={ring_step} "
            "(need 1 <= first_ring <= last_ring, ring_step >= 1)"
        )
    if mode not in ("F", "H"):
        raise ValueError(f"mode must be 'F' or 'H', got {mode!r}")
    radii = np.arange(first_ring, last_ring + 1, ring_step, dtype=np.int64)
    span = 2.0 * np.pi if mode == "F" else np.pi
    jp = np.floor(span * radii + 0.5).astype(np.int64)
    n_samples = (2 ** (np.floor(np.log2(jp)).astype(np.int64) + 1)).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(n_samples)]).astype(np.int64)
    maxrin = int(n_samples[-1])
    weights = radii * (2.0 * np.pi / n_samples) * (maxrin / n_samples)
    phis = np.concatenate([span * np.arange(n) / n for n in n_samples])
    rr = np.repeat(radii.astype(np.float64), n_samples)
    sample_dx = rr * np.sin(phis)
    sample_dy = rr * np.cos(phis)
    sample_weights = np.repeat(2.0 * np.pi * radii / n_samples, n_samples)
    groups = []
    start = 0
    for i in range(1, radii.size + 1):
        if i == radii.size or n_samples[i] != n_samples[start]:
            groups.append((int(n_samples[start]), start, i, int(offsets[start]), int(offsets[i])))
            start = i
    return PolarGrid(
        radii=_readonly(radii),
        n_samples=_readonly(n_samples),
        offsets=_readonly(offsets),
        weights=_readonly(weights),
        maxrin=maxrin,
        mode=mode,
        sample_dx=_readonly(sample_dx),
        sample_dy=_readonly(sample_dy),
        sample_weights=_readonly(sample_weights),
        groups=tuple(groups),
    )


def _as_square_stack(images) -> tuple[np.ndarray, bool]:
    arr = np.asarray(images)
    single = arr.ndim == 2
    if single:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1] != arr.shape[2]:
        raise ValueError(f"images must be (n, N, N) or (N, N) square, got shape {np.shape(images)}")
    return np.ascontiguousarray(arr, dtype=np.float32), single


def check_fits(grid: PolarGrid, box: int) -> None:
    """Raise ValueError if the outermost ring (plus the interpolation neighbour) leaves a ``box``-pixel image."""
    if grid.last_ring + 1 > box // 2 or grid.last_ring + 1 > box - 1 - box // 2:
        raise ValueError(
            f"last ring radius {grid.last_ring} does not fit a {box}-pixel box "
            f"(need last_ring <= {min(box // 2, box - 1 - box // 2) - 1})"
        )


def _gather_polar(flat: np.ndarray, box: int, image_index: np.ndarray, cx: np.ndarray, cy: np.ndarray,
                  grid: PolarGrid, ox: np.ndarray, oy: np.ndarray, out: np.ndarray | None = None,
                  sub_chunk: int = 2) -> np.ndarray:
    """Bilinear polar samples around centres ``(cx + ox[kx], cy + oy[ky])`` (compiled kernel).

    Same arguments, result and arithmetic as :func:`_gather_polar_numpy` (the NumPy formulation, kept as
    the reference the tests compare with).
    """
    from isavar.core import _kernels

    ox = np.asarray(ox, dtype=np.int64)
    oy = np.asarray(oy, dtype=np.int64)
    n_c = image_index.size
    if out is None:
        out = np.empty((n_c, oy.size, ox.size, grid.lcirc), dtype=np.float32)
    if n_c == 0:
        return out
    reach = grid.last_ring + 1
    inside = (cx.min() + ox.min() - reach >= 0 and cx.max() + ox.max() + reach <= box - 1
              and cy.min() + oy.min() - reach >= 0 and cy.max() + oy.max() + reach <= box - 1)
    pad = 0 if inside else int(max(np.abs(ox).max(), np.abs(oy).max())) + 2
    images = np.ascontiguousarray(flat, dtype=np.float32).reshape(-1, box, box)
    return _kernels.polar_gather(images, image_index, cx, cy, grid.sample_dx, grid.sample_dy, ox, oy, pad, out)


def _gather_polar_numpy(flat: np.ndarray, box: int, image_index: np.ndarray, cx: np.ndarray, cy: np.ndarray,
                        grid: PolarGrid, ox: np.ndarray, oy: np.ndarray, out: np.ndarray | None = None,
                        sub_chunk: int = 2) -> np.ndarray:
    """Bilinear polar samples around centres ``(cx + ox[kx], cy + oy[ky])`` for a grid of integer offsets.

    Parameters
    ----------
    flat : (n_img * box * box,) float32
        Flattened image stack.
    image_index : (c,) int
        Image of every centre.
    cx, cy : (c,) float64
        Sampling centres (0-based pixel coordinates, fractional allowed).
    ox, oy : (kx,), (ky,) int
        Integer offsets added to every centre. All ``ky * kx`` combinations are sampled. Because the
        offsets are integers the bilinear weights are shared by all of them, so each sample needs one
        gather per distinct row: the pixels ``x0 + min(ox) .. x0 + max(ox) + 1`` of a row are packed into
        one fixed-size record and fetched together, then interpolated in x, then in y.
    out : (c, ky, kx, lcirc) float32, optional
        Output buffer.
    sub_chunk : int
        Centres processed per inner step (keeps the temporaries in cache).

    Returns
    -------
    (c, ky, kx, lcirc) float32
        Samples; outside the image the edge pixels are replicated.
    """
    n_c = image_index.size
    lcirc = grid.lcirc
    ox = np.asarray(ox, dtype=np.intp)
    oy = np.asarray(oy, dtype=np.intp)
    if out is None:
        out = np.empty((n_c, oy.size, ox.size, lcirc), dtype=np.float32)
    width = int(ox.max() - ox.min() + 2)                     # pixels per packed record
    # edge-replicated border so that trials near the image edge never need clamping of the
    # coordinates (a sample outside the image takes the value of the nearest edge pixel)
    reach = grid.last_ring + 1
    inside = (cx.min() + ox.min() - reach >= 0 and cx.max() + ox.max() + reach <= box - 1
              and cy.min() + oy.min() - reach >= 0 and cy.max() + oy.max() + reach <= box - 1)
    pad = 0 if inside else int(max(np.abs(ox).max(), np.abs(oy).max())) + 2
    n_img = flat.size // (box * box)
    box_p = box + 2 * pad
    npix = n_img * box_p * box_p
    ext = np.empty(npix + width, dtype=np.float32)
    if pad:
        ext[:npix] = np.pad(flat.reshape(n_img, box, box), ((0, 0), (pad, pad), (pad, pad)),
                            mode="edge").reshape(-1)
    else:
        ext[:npix] = flat
    ext[npix:] = 0.0
    packed = np.empty((npix, width), dtype=np.float32)
    for j in range(width):
        packed[:, j] = ext[j:j + npix]
    packed = packed.view(np.dtype((np.void, 4 * width))).reshape(npix)

    x = (cx + pad)[:, None] + grid.sample_dx[None, :]
    y = (cy + pad)[:, None] + grid.sample_dy[None, :]
    # keep every fetched pixel inside the padded image (x0 + ox + 1 <= box_p - 1, x0 + ox >= 0)
    np.clip(x, -ox.min(), box_p - 1 - ox.max() - 1e-6, out=x)
    np.clip(y, -oy.min(), box_p - 1 - oy.max() - 1e-6, out=y)
    x0 = np.floor(x)
    y0 = np.floor(y)
    u = (x - x0).astype(np.float32)
    v = (y - y0).astype(np.float32)
    base = (y0 * box_p + x0).astype(np.intp)
    base += (np.asarray(image_index, dtype=np.intp) * (box_p * box_p) + ox.min())[:, None]
    rows = np.union1d(oy, oy + 1)                             # distinct row offsets
    r0 = np.searchsorted(rows, oy)
    r1 = np.searchsorted(rows, oy + 1)
    consecutive = bool(np.array_equal(r0, np.arange(oy.size)) and np.array_equal(r1, r0 + 1))
    cols = ox - ox.min()
    n_rows = rows.size
    sub = max(1, int(sub_chunk))
    idx = np.empty((sub, n_rows, lcirc), dtype=np.intp)
    rec = np.empty((sub, n_rows, lcirc), dtype=packed.dtype)
    h = np.empty((sub, n_rows, ox.size, lcirc), dtype=np.float32)
    row_off = (rows * box_p)[None, :, None]
    for i0 in range(0, n_c, sub):
        i1 = min(n_c, i0 + sub)
        m = i1 - i0
        ix, g, hh = idx[:m], rec[:m], h[:m]
        np.add(base[i0:i1, None, :], row_off, out=ix)
        packed.take(ix, out=g, mode="clip")
        gf = g.view(np.float32).reshape(m, n_rows, lcirc, width)
        uu = u[i0:i1, None, :]
        for k, c in enumerate(cols):                          # x interpolation
            hk = hh[:, :, k, :]
            np.subtract(gf[..., c + 1], gf[..., c], out=hk)
            hk *= uu
            hk += gf[..., c]
        if consecutive:
            top, bot = hh[:, :-1], hh[:, 1:]
        else:
            top, bot = hh[:, r0], hh[:, r1]
        o = out[i0:i1]                                        # y interpolation
        np.subtract(bot, top, out=o)
        o *= v[i0:i1, None, None, :]
        o += top
    return out


def polar_transform(images, grid: PolarGrid, *, shifts=None) -> np.ndarray:
    """Resample images on the rings of ``grid`` around the image centre plus a shift (SPHIRE ``Polar2Dm``).

    Parameters
    ----------
    images : (n, N, N) or (N, N) array_like
        Square images.
    grid : PolarGrid
        Ring geometry; the outer ring must fit the image.
    shifts : None, (n_shifts, 2) or (n, n_shifts, 2) array_like, optional
        Sampling-centre offsets ``(dx, dy)`` in pixels from ``(N // 2, N // 2)``; a 2-D array applies
        the same offsets to every image, a 3-D array gives per-image offsets. None samples at the centre.

    Returns
    -------
    numpy.ndarray
        float32 ``(n, lcirc)`` without shifts, ``(n, n_shifts, lcirc)`` with shifts (leading ``n`` dropped
        for a single 2-D image). Bilinear interpolation; outside the image the edge pixels are replicated.
    """
    stack, single = _as_square_stack(images)
    n, box = stack.shape[0], stack.shape[1]
    check_fits(grid, box)
    flat = stack.reshape(-1)
    centre = float(box // 2)
    if shifts is None:
        out = _gather_polar(flat, box, np.arange(n), np.full(n, centre), np.full(n, centre),
                            grid, np.zeros(1, np.int64), np.zeros(1, np.int64))
        out = out.reshape(n, grid.lcirc)
    else:
        sh = np.asarray(shifts, dtype=np.float64)
        if sh.ndim == 2 and sh.shape[1] == 2:
            sh = np.broadcast_to(sh[None], (n,) + sh.shape)
        if sh.ndim != 3 or sh.shape[0] != n or sh.shape[2] != 2:
            raise ValueError(f"shifts must be (n_shifts, 2) or (n, n_shifts, 2), got {np.shape(shifts)}")
        n_sh = sh.shape[1]
        index = np.repeat(np.arange(n), n_sh)
        out = _gather_polar(flat, box, index, centre + sh[..., 0].reshape(-1), centre + sh[..., 1].reshape(-1),
                            grid, np.zeros(1, np.int64), np.zeros(1, np.int64))
        out = out.reshape(n, n_sh, grid.lcirc)
    return out[0] if single else out


def ring_spectra(polar, grid: PolarGrid) -> list[np.ndarray]:
    """Real FFT of every ring, grouped by ring length.

    Parameters
    ----------
    polar : (..., lcirc) array_like
        Polar data (see :func:`polar_transform`).
    grid : PolarGrid

    Returns
    -------
    list of numpy.ndarray
        One complex64 array ``(..., n_rings_in_group, n_r // 2 + 1)`` per group of equal-length rings,
        in the order of ``grid.groups`` (increasing radius); unnormalised forward FFT
        ``B_r(m) = sum_j b_r(phi_j) exp(-2 pi i j m / n_r)``.
    """
    polar = np.asarray(polar, dtype=np.float32)
    lead = polar.shape[:-1]
    out = []
    for n_r, r0, r1, s0, s1 in grid.groups:
        block = polar[..., s0:s1].reshape(lead + (r1 - r0, n_r))
        out.append(scipy.fft.rfft(block, axis=-1))
    return out


def ring_statistics(polar, grid: PolarGrid) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean and standard deviation over all ring samples (weights ``2 pi r / n_r``, spec §4.2).

    Parameters
    ----------
    polar : (..., lcirc) array_like
    grid : PolarGrid

    Returns
    -------
    mean, std : numpy.ndarray
        float64 arrays of shape ``polar.shape[:-1]``; ``std = sqrt(sum w (b - mean)^2 / sum w)``.
    """
    polar = np.asarray(polar, dtype=np.float64)
    w = grid.sample_weights / grid.sample_weights.sum()
    mean = polar @ w
    var = np.maximum(((polar - mean[..., None]) ** 2) @ w, 0.0)     # two-pass: no cancellation
    return mean, np.sqrt(var)


def normalize_rings(polar, grid: PolarGrid) -> np.ndarray:
    """SPHIRE ``Normalize_ring``: ``(b - mean) / std`` with the arc-length weighted statistics of :func:`ring_statistics`.

    Parameters
    ----------
    polar : (..., lcirc) array_like
    grid : PolarGrid

    Returns
    -------
    numpy.ndarray
        float32, same shape. A constant input (std = 0, or at the float32 rounding level of the mean) is
        returned mean-subtracted only.
    """
    polar = np.asarray(polar, dtype=np.float32)
    mean, std = ring_statistics(polar, grid)
    # a spread at the rounding level of the mean is a constant input
    std = np.where(std > 1e-6 * np.abs(mean), std, 1.0)
    return ((polar - mean[..., None].astype(np.float32)) / std[..., None].astype(np.float32)).astype(np.float32)


def reference_spectra(ref_polar, grid: PolarGrid) -> list[np.ndarray]:
    """Weighted ring spectra of references (SPHIRE ``Frngs`` + ``Applyws``).

    Every coefficient of ring r is multiplied by ``w_r`` (:attr:`PolarGrid.weights`), the Nyquist
    coefficient of rings shorter than ``maxrin`` by ``w_r / 2``.

    Parameters
    ----------
    ref_polar : (..., lcirc) array_like
    grid : PolarGrid

    Returns
    -------
    list of complex64 arrays ``(..., n_rings_in_group, n_r // 2 + 1)`` (groups as :func:`ring_spectra`).
    """
    spectra = ring_spectra(ref_polar, grid)
    out = []
    for spec, (n_r, r0, r1, _, _) in zip(spectra, grid.groups):
        wts = np.broadcast_to(grid.weights[r0:r1, None], (r1 - r0, n_r // 2 + 1)).copy()
        if n_r < grid.maxrin:
            wts[:, -1] *= 0.5
        out.append((spec * wts.astype(np.float32)).astype(np.complex64))
    return out


def rotational_correlation(image_polar, ref_polar, grid: PolarGrid, mirror: bool = True):
    """Rotational cross-correlation curves of image rings against reference rings (SPHIRE ``Crosrng_ms``).

    Straightforward (per pair) implementation of the definition in the module docstring; the batched
    aligner in :mod:`isavar.core.align2d` computes the same curves.

    Parameters
    ----------
    image_polar, ref_polar : (..., lcirc) array_like
        Polar data (unweighted); leading axes broadcast against each other.
    grid : PolarGrid
    mirror : bool
        Also return the curve of the x-mirrored image.

    Returns
    -------
    c : numpy.ndarray
        float64 ``(..., maxrin)``; ``c[..., k]`` = score of the image rotated by ``alpha = 360 k / maxrin``
        degrees (content at polar angle phi moved to phi + alpha) against the reference.
    c_m : numpy.ndarray
        Same for the x-mirrored image (returned only if ``mirror``).
    """
    b = ring_spectra(image_polar, grid)
    a = reference_spectra(ref_polar, grid)
    lead = np.broadcast_shapes(np.shape(image_polar)[:-1], np.shape(ref_polar)[:-1])
    xs = np.zeros(lead + (grid.n_freq,), dtype=np.complex128)
    xm = np.zeros(lead + (grid.n_freq,), dtype=np.complex128)
    for ag, bg, (n_r, *_rest) in zip(a, b, grid.groups):
        ag = ag.astype(np.complex128)
        bg = bg.astype(np.complex128)
        xs[..., : n_r // 2 + 1] += (ag * np.conj(bg)).sum(axis=-2)
        if mirror:
            xm[..., : n_r // 2 + 1] += np.conj(ag * bg).sum(axis=-2)
    c = np.fft.irfft(xs, n=grid.maxrin, axis=-1)
    if not mirror:
        return c
    return c, np.fft.irfft(xm, n=grid.maxrin, axis=-1)


def rings_from_spectra(spectra, grid: PolarGrid) -> np.ndarray:
    """Inverse of :func:`ring_spectra`: ring samples from per-group ring spectra.

    Parameters
    ----------
    spectra : list of complex arrays ``(..., n_rings_in_group, n_r // 2 + 1)``
        In the order of ``grid.groups``.
    grid : PolarGrid

    Returns
    -------
    numpy.ndarray
        float32 ``(..., lcirc)``.
    """
    lead = np.shape(spectra[0])[:-2]
    out = np.empty(lead + (grid.lcirc,), dtype=np.float32)
    for spec, (n_r, r0, r1, s0, s1) in zip(spectra, grid.groups):
        out[..., s0:s1] = scipy.fft.irfft(spec, n=n_r, axis=-1).reshape(lead + (s1 - s0,))
    return out


@functools.lru_cache(maxsize=8)
def _polar_to_image_operator(grid: PolarGrid, box: int) -> scipy.sparse.csr_matrix:
    """Sparse ``(box * box, lcirc)`` interpolation from ring samples to pixels (see :func:`polar_to_image`)."""
    c = box // 2
    yy, xx = np.mgrid[0:box, 0:box]
    dx, dy = (xx - c).ravel().astype(np.float64), (yy - c).ravel().astype(np.float64)
    rho = np.hypot(dx, dy)
    phi = np.mod(np.arctan2(dx, dy), 2.0 * np.pi)            # x = r sin(phi), y = r cos(phi)
    radii = grid.radii.astype(np.float64)
    pix = np.arange(box * box)
    rows, cols, vals = [], [], []

    def ring_terms(ring, weight, sel):
        """Angular linear interpolation on ``ring`` at the pixels ``sel`` with radial weight ``weight``."""
        n_r = grid.n_samples[ring]
        t = phi[sel] * n_r / (2.0 * np.pi)
        j0 = np.floor(t).astype(np.int64)
        f = t - j0
        for j, w in ((j0 % n_r, 1.0 - f), ((j0 + 1) % n_r, f)):
            rows.append(pix[sel])
            cols.append(grid.offsets[ring] + j)
            vals.append(weight * w)

    # inside the first ring: blend towards the ring's mean at the centre
    sel = rho < radii[0]
    frac = rho[sel] / radii[0]
    ring_terms(0, frac, sel)
    n0 = grid.n_samples[0]
    rows.append(np.repeat(pix[sel], n0))
    cols.append(np.tile(grid.offsets[0] + np.arange(n0), int(sel.sum())))
    vals.append(np.repeat((1.0 - frac) / n0, n0))
    # between rings: linear in radius
    k = np.searchsorted(radii, rho, side="right") - 1                    # ring at or below rho
    sel = (rho >= radii[0]) & (k < radii.size - 1)
    kk = k[sel]
    f = (rho[sel] - radii[kk]) / (radii[kk + 1] - radii[kk])
    for ring in np.unique(kk):
        m = kk == ring
        idx = np.flatnonzero(sel)[m]
        sub = np.zeros(box * box, bool)
        sub[idx] = True
        ring_terms(int(ring), 1.0 - f[m], sub)
        ring_terms(int(ring) + 1, f[m], sub)
    # beyond the last ring: linear taper to zero over one pixel
    last = radii.size - 1
    sel = (rho >= radii[-1]) & (rho < radii[-1] + 1.0)
    ring_terms(last, 1.0 - (rho[sel] - radii[-1]), sel)
    op = scipy.sparse.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                                 shape=(box * box, grid.lcirc))
    op.sum_duplicates()
    return op.astype(np.float32)


def polar_to_image(polar, grid: PolarGrid, box: int) -> np.ndarray:
    """Cartesian image(s) from ring samples around the image centre (inverse resampling of :func:`polar_transform`).

    Each pixel at radius ``rho`` and angle ``phi`` (convention of this module) is interpolated linearly in
    angle on the two rings enclosing ``rho`` and linearly in radius between them. Inside the first ring the
    value blends towards the ring's mean at the centre; beyond the last ring it tapers to zero over one
    pixel, so the image is supported on the disc of radius ``last_ring + 1``.

    Parameters
    ----------
    polar : (lcirc,) or (n, lcirc) array_like
    grid : PolarGrid
    box : int
        Image size N (the outermost ring must fit, :func:`check_fits`).

    Returns
    -------
    numpy.ndarray
        float32 ``(N, N)`` or ``(n, N, N)``.
    """
    check_fits(grid, box)
    polar = np.asarray(polar, dtype=np.float32)
    single = polar.ndim == 1
    op = _polar_to_image_operator(grid, int(box))
    out = (op @ np.atleast_2d(polar).T).T.astype(np.float32)
    out = out.reshape(-1, box, box)
    return out[0] if single else out
