"""Per-group 2D statistics: bring members into the group frame, then mean and variance.

Geometry (spec §3.5, *exact* mode)
----------------------------------
Group frame of centre ``c``: the projection geometry ``F_c = R(rot_c, tilt_c, 0)``
(the centre's own in-plane angle and origin are removed). A member ``j`` used
through symmetry element ``S_k`` has the effective orientation ``A_j S_k``. With
``Q = A_j S_k (P^m F_c)^T`` (``P = Ry(180) = diag(-1, 1, -1)`` for a mirrored,
i.e. antipodal, member) the in-plane angle that best relates the two frames is
``gamma = atan2(Q01 - Q10, Q00 + Q11)`` (it maximises ``trace(Rz(gamma)^T Q)``);
the member's content is mapped by ``q -> M^m R(alpha) (q + o_j)`` with
``alpha = -gamma``, ``o_j`` its origin (pixels) and ``M`` the x-mirror — the
SPHIRE 2D parameter set ``(alpha, R(alpha) o_j, m)``. The residual rotation
between member and centre is then a pure out-of-plane tilt equal to their
angular separation. The origin shift is applied once per image (exact Fourier
phase ramp), the rotation+mirror per member by bilinear interpolation on the
disc of radius ``nx // 2 - 1`` (pixels outside it are 0 in every 2D map).

Statistics (spec §3.8, with the scale fix of §9 Q4)
---------------------------------------------------
Without CTF: ``ave = mean_j a_j``, ``var = sum_j (a_j - ave)^2 / (G - 1)``.
With CTF (``C_j`` = member CTF in the group frame, ``X_j`` = DFT of ``a_j``):
``A = sum_j C_j X_j / (sum_j C_j^2 + 1/snr)`` (Wiener mean, SPHIRE snr = 1e5),
``Delta_j = sign(C_j) (X_j - C_j A) / sqrt(w)`` with ``w = (sum_j C_j^2 + 1/snr) / G``
(the member's residual, phase-flipped and divided by the group's RMS CTF), and
``var = sum_j IDFT(Delta_j)^2 / (G - 1)``. For a member deviation ``d_j`` the
residual is ``C_j d_j``, so ``Delta_j = |C_j| d_j / sqrt(w)`` whose power, averaged
over the group, is ``mean_j C_j^2 / w = 1`` at every frequency: the variance is on
the scale of the plain sample variance of the CTF-free signal, and with every
``C_j = 1`` both branches are identical. SPHIRE's CTF branch used
``E_j = C_j (X_j - C_j A) / (sum C^2 + 1/snr)`` without division by ``G - 1``,
about ``1/G`` of that scale (spec §9 Q4); ``G E_j`` would remove the ``1/G`` but
over-weights members with a large CTF (excess power ``mean C^4 / mean^2 C^2``, about
1.2 in practice).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numba
import numpy as np
import scipy.fft as sfft

from isavar.conventions import euler_to_matrix
from isavar.core.ctf import CtfGrid
from isavar.core.fft import resample_fourier, window as window_images
from isavar.core.filters import frequency_radius, tanh_profile
from isavar.core.masks import circular_mask
from isavar.core.normalize import normalize_images

log = logging.getLogger(__name__)

#: y-flip of the projection geometry that equals an x-mirror of the image (Ry(180)).
_RY180 = np.diag([-1.0, 1.0, -1.0])


# --------------------------------------------------------------------------------------
# Working grid
# --------------------------------------------------------------------------------------


def smooth_size_at_least(n: int) -> int:
    """Smallest even integer ``>= n`` whose prime factors are 2, 3 and 5 (FFT friendly)."""
    m = max(2, int(np.ceil(n)))
    while True:
        if m % 2 == 0:
            r = m
            for p in (2, 3, 5):
                while r % p == 0:
                    r //= p
            if r == 1:
                return m
        m += 1


@dataclass(frozen=True)
class WorkingGrid:
    """Sizes of the analysis grid relative to the input.

    Attributes
    ----------
    box : int
        Input box (pixels).
    window : int
        Central crop of the input before resampling (== box when not cropping).
    nx : int
        Working box after Fourier resampling of the window.
    pixel_size_A : float
        Input pixel size (Å).
    """

    box: int
    window: int
    nx: int
    pixel_size_A: float

    @property
    def scale(self) -> float:
        """Working pixels per input pixel (``nx / window``)."""
        return self.nx / self.window

    @property
    def working_pixel_size_A(self) -> float:
        """Pixel size of the working grid (Å)."""
        return self.pixel_size_A / self.scale


def working_grid(box: int, pixel_size_A: float, *, decimate: float = 1.0, window: int = 0,
                 lowpass_fl: float = 0.0, lowpass_aa: float = 0.0, auto: bool = True,
                 threshold: float = 1e-3) -> WorkingGrid:
    """Choose the working grid (spec §3.1, with the window/pixel-size fixes of §9 Q8/Q9).

    Parameters
    ----------
    box : int
        Input box.
    pixel_size_A : float
        Input pixel size (Å).
    decimate : float
        Requested down-sampling factor (0, 1]; the working size is the nearest
        FFT-friendly even size at or above ``window * decimate``.
    window : int
        Central crop (input pixels), 0 = whole box.
    lowpass_fl, lowpass_aa : float
        tanh low-pass in cycles/input pixel; with ``auto`` and ``decimate == 1``
        the working box is the smallest FFT-friendly size whose Nyquist holds
        every frequency where the filter exceeds ``threshold`` (so nothing the
        filter passes is lost).
    auto : bool
        Allow the filter-driven size reduction.
    threshold : float
        Filter value regarded as zero.

    Returns
    -------
    WorkingGrid
    """
    win = int(window) if window and window > 0 else int(box)
    if win > box:
        raise ValueError(f"window {win} is larger than the box {box}")
    target = float(win)
    if decimate < 1.0:
        target = win * decimate
    elif auto and lowpass_fl > 0:
        f = np.linspace(0.0, 0.5, 2001)
        h = tanh_profile(f, lowpass_fl, lowpass_aa)
        above = f[h > threshold]
        f_cut = float(above.max()) if above.size else 0.5
        target = win * min(1.0, 2.0 * f_cut * 1.05)
    nx = min(smooth_size_at_least(max(16.0, target)), win)
    return WorkingGrid(box=int(box), window=win, nx=int(nx), pixel_size_A=float(pixel_size_A))


# --------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------


def centre_frames(rot_deg, tilt_deg) -> np.ndarray:
    """Group frames ``R(rot, tilt, 0)`` of centre particles.

    Parameters
    ----------
    rot_deg, tilt_deg : array_like
        ``(B,)`` Euler angles of the centres (degrees).

    Returns
    -------
    numpy.ndarray
        ``(B, 3, 3)`` float64.
    """
    rot = np.asarray(rot_deg, np.float64)
    return euler_to_matrix(rot, np.asarray(tilt_deg, np.float64), np.zeros_like(rot))


def inplane_alignment(frames: np.ndarray, member_matrices: np.ndarray, mirror: np.ndarray) -> np.ndarray:
    """Exact in-plane angle bringing each member into its group's frame (module notes).

    Parameters
    ----------
    frames : numpy.ndarray
        ``(B, 3, 3)`` group frames ``F_c``.
    member_matrices : numpy.ndarray
        ``(B, G, 3, 3)`` effective member orientations ``A_j S_k``.
    mirror : numpy.ndarray
        ``(B, G)`` bool, antipodal members.

    Returns
    -------
    numpy.ndarray
        ``(B, G)`` float64 angles ``alpha`` in degrees (SPHIRE 2D convention).
    """
    ref = np.broadcast_to(frames[:, None], member_matrices.shape).copy()
    ref[mirror] = _RY180 @ ref[mirror]
    q = member_matrices @ np.swapaxes(ref, -1, -2)
    gamma = np.arctan2(q[..., 0, 1] - q[..., 1, 0], q[..., 0, 0] + q[..., 1, 1])
    return -np.degrees(gamma)


def aligned_ctf_angle(defocus_angle_deg, alpha_deg, mirror) -> np.ndarray:
    """RELION astigmatism angle after the content map ``q -> M^m R(alpha) q``.

    ``R(alpha)`` turns directions at angle ``a`` (from x) to ``a - alpha`` and the
    x-mirror turns ``a`` into ``180 - a``; the astigmatism angle is defined mod 180.

    Parameters
    ----------
    defocus_angle_deg, alpha_deg : array_like
        Original angle and in-plane alignment angle (degrees).
    mirror : array_like
        0/1.

    Returns
    -------
    numpy.ndarray
        Angles in [0, 180).
    """
    a = np.asarray(defocus_angle_deg, np.float64) - np.asarray(alpha_deg, np.float64)
    return np.mod(np.where(np.asarray(mirror, bool), -a, a), 180.0)


# --------------------------------------------------------------------------------------
# Per-image preprocessing (once per distinct image of a chunk)
# --------------------------------------------------------------------------------------


def prepare_images(images: np.ndarray, origins_px: np.ndarray | None, grid: WorkingGrid, *,
                   normalize: bool = True, lowpass_fl: float = 0.0, lowpass_aa: float = 0.0) -> np.ndarray:
    """Window, resample, normalise, low-pass and re-centre images (spec §3.3, §3.6, §3.7).

    Parameters
    ----------
    images : numpy.ndarray
        ``(U, box, box)`` input images.
    origins_px : numpy.ndarray or None
        ``(U, 2)`` RELION origins in *input* pixels (shifting by ``+origin``
        centres the particle); None = centred.
    grid : WorkingGrid
        Working grid.
    normalize : bool
        Background normalisation: mean 0 and standard deviation 1 over the
        pixels outside the disc of radius ``nx // 2 - 2`` (images with zero
        background deviation are only mean-subtracted).
    lowpass_fl, lowpass_aa : float
        tanh low-pass in cycles/input pixel (0 = off).

    Returns
    -------
    numpy.ndarray
        ``(U, nx, nx)`` float32, particles centred at ``nx // 2``.
    """
    x = np.asarray(images, np.float32)
    if grid.window != grid.box:
        x = window_images(x, grid.window)
    nx = grid.nx
    if nx != grid.window:
        x = downsample(x, nx)
    if normalize:
        mask = circular_mask(nx, nx // 2 - 2)
        x, _ = normalize_images(x, mask, mean_region="outside", std_region="outside", return_flags=True)
    shifts = None if origins_px is None else np.asarray(origins_px, np.float64) * grid.scale
    if shifts is not None and not np.any(shifts != 0):
        shifts = None
    if lowpass_fl > 0 or shifts is not None:              # one Fourier pass: low-pass and re-centring
        spec = sfft.rfft2(np.asarray(x, np.float32))
        if lowpass_fl > 0:
            spec *= tanh_profile(frequency_radius(nx, nx), lowpass_fl / grid.scale, lowpass_aa).astype(np.float32)
        if shifts is not None:
            spec *= (_phase_1d(nx, shifts[:, 1], rfft=False)[:, :, None]
                     * _phase_1d(nx, shifts[:, 0], rfft=True)[:, None, :]).astype(np.complex64)
        x = sfft.irfft2(spec, s=(nx, nx))
    return np.ascontiguousarray(x, dtype=np.float32)


def _phase_1d(n: int, shift: np.ndarray, *, rfft: bool) -> np.ndarray:
    """``exp(-2 pi i k d)`` for shifts ``d`` (``(m, len(k))``); the Nyquist term of an even ``n`` is
    ``cos(pi d)`` (Hermitian), as :func:`isavar.core.fft.fourier_shift`."""
    k = np.fft.rfftfreq(n) if rfft else np.fft.fftfreq(n)
    phase = np.exp(-2j * np.pi * shift[:, None] * k[None, :])
    if n % 2 == 0:
        phase[:, n // 2] = np.cos(np.pi * shift)
    return phase


def downsample(images: np.ndarray, size: int) -> np.ndarray:
    """Fourier-crop square images to ``size`` pixels (values preserved), in single precision.

    The same band-limited resampling about the centre ``N // 2`` as
    :func:`isavar.core.fft.resample_fourier` (the old ``+h`` and ``-h`` coefficients summed onto the new
    Nyquist sample), computed with real FFTs in float32 (several times faster on large stacks).

    Parameters
    ----------
    images : numpy.ndarray
        ``(k, N, N)``.
    size : int
        New box ``m <= N``; both even.

    Returns
    -------
    numpy.ndarray
        ``(k, m, m)`` float32.
    """
    x = np.asarray(images, np.float32)
    n, m = x.shape[-1], int(size)
    if m == n:
        return x.copy()
    if n % 2 or m % 2 or m > n:
        return resample_fourier(x, m)
    h = m // 2
    spec = sfft.rfft2(x)
    out = np.empty(x.shape[:-2] + (m, h + 1), np.complex64)
    out[..., :h, :] = spec[..., :h, :h + 1]
    out[..., h + 1:, :] = spec[..., n - h + 1:, :h + 1]
    out[..., h, :] = spec[..., h, :h + 1] + spec[..., n - h, :h + 1]
    out[..., :, h] *= 2                      # the new Nyquist column: +h and -h (irfft keeps its real part)
    out *= np.float32((m * m) / (n * n))
    return sfft.irfft2(out, s=(m, m)).astype(np.float32, copy=False)


def upsample(images: np.ndarray, size: int, *, workers: int | None = None) -> np.ndarray:
    """Fourier-pad square images to ``size`` pixels (values preserved), in single precision.

    The inverse of :func:`downsample` and the same as :func:`isavar.core.fft.resample_fourier` (an old
    Nyquist coefficient split half/half between ``+h`` and ``-h``), with real FFTs in float32.

    Parameters
    ----------
    images : numpy.ndarray
        ``(k, m, m)``.
    size : int
        New box ``N >= m``; both even.
    workers : int, optional
        Threads of the FFTs (``scipy.fft``); default one.

    Returns
    -------
    numpy.ndarray
        ``(k, N, N)`` float32.
    """
    x = np.asarray(images, np.float32)
    m, n = x.shape[-1], int(size)
    if m == n:
        return x.copy()
    if n % 2 or m % 2 or m > n:
        return resample_fourier(x, n)
    h = m // 2
    spec = sfft.rfft2(x, workers=workers)
    spec[..., :, h] *= 0.5                   # the old Nyquist column: half at +h (and, implicitly, at -h)
    out = np.zeros(x.shape[:-2] + (n, n // 2 + 1), np.complex64)
    out[..., :h, :h + 1] = spec[..., :h, :]
    out[..., n - h + 1:, :h + 1] = spec[..., h + 1:, :]
    out[..., h, :h + 1] = 0.5 * spec[..., h, :]
    out[..., n - h, :h + 1] = 0.5 * spec[..., h, :]
    out *= np.float32((n * n) / (m * m))
    return sfft.irfft2(out, s=(n, n), workers=workers).astype(np.float32, copy=False)


# --------------------------------------------------------------------------------------
# Rotation + mirror on the disc (the hot loop)
# --------------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True)
def _rotate_disc(flat, rows, cos_a, sin_a, sgn, dx, dy, n, dest, out):          # pragma: no cover - compiled
    """Bilinear samples of ``flat[rows[k]]`` (each ``n * n``) at the rotated disc points (float32), written to
    ``out[k, dest[p]]``."""
    centre = np.float32(n // 2)
    top_index = np.float32(n - 2)
    zero = np.float32(0.0)
    for k in range(rows.size):
        img = flat[rows[k]]
        c, s, m = cos_a[k], sin_a[k], sgn[k]
        for p in range(dx.size):
            mdx = dx[p] * m
            xs = c * mdx - s * dy[p] + centre
            ys = s * mdx + c * dy[p] + centre
            # lower corner clipped to n - 2 so that a source on the last row/column (fraction 1) stays exact
            # and the upper neighbour never leaves the image
            x0 = min(max(np.floor(xs), zero), top_index)
            y0 = min(max(np.floor(ys), zero), top_index)
            fx = xs - x0
            fy = ys - y0
            i = int(y0) * n + int(x0)
            f00 = img[i]
            f01 = img[i + 1]
            f10 = img[i + n]
            f11 = img[i + n + 1]
            top = f00 + fx * (f01 - f00)
            bottom = f10 + fx * (f11 - f10)
            out[k, dest[p]] = top + fy * (bottom - top)


class DiscRotator:
    """Bilinear rotation (+ x-mirror) of images, sampled on the disc of radius ``nx // 2 - 1``.

    Output pixel ``p`` (relative to the centre ``nx // 2``) of the map
    ``q -> M^m R(alpha) q`` takes the input value at ``R(alpha)^T M^m p``; the
    same convention as :func:`isavar.core.transform2d.transform_images` with zero
    shift, restricted to the disc (whose source points always lie inside the image).

    Parameters
    ----------
    nx : int
        Image size.
    """

    def __init__(self, nx: int):
        self.nx = int(nx)
        c = self.nx // 2
        r = self.nx // 2 - 1
        yy, xx = np.mgrid[0:self.nx, 0:self.nx]
        inside = (yy - c) ** 2 + (xx - c) ** 2 <= r * r
        self.flat_index = np.flatnonzero(inside.ravel())
        self.dy = (yy.ravel()[self.flat_index] - c).astype(np.float32)
        self.dx = (xx.ravel()[self.flat_index] - c).astype(np.float32)
        self._identity = np.arange(self.flat_index.size, dtype=np.int64)

    @property
    def n_pixels(self) -> int:
        """Number of disc pixels P."""
        return int(self.flat_index.size)

    def rotate(self, images: np.ndarray, rows: np.ndarray, alpha_deg: np.ndarray, mirror: np.ndarray,
               out: np.ndarray | None = None) -> np.ndarray:
        """Rotate ``images[rows]`` and return their disc samples.

        Parameters
        ----------
        images : numpy.ndarray
            ``(U, nx, nx)`` float32, C-contiguous.
        rows : numpy.ndarray
            ``(k,)`` int rows of ``images``.
        alpha_deg : numpy.ndarray
            ``(k,)`` angles (degrees).
        mirror : numpy.ndarray
            ``(k,)`` bool.
        out : numpy.ndarray, optional
            ``(k, P)`` float32 output buffer.

        Returns
        -------
        numpy.ndarray
            ``(k, P)`` float32 disc samples.
        """
        k = len(rows)
        if out is None:
            out = np.empty((k, self.n_pixels), np.float32)
        if k == 0:
            return out
        a = np.deg2rad(np.asarray(alpha_deg, np.float64))
        cos_a, sin_a = np.cos(a).astype(np.float32), np.sin(a).astype(np.float32)
        sgn = np.where(np.asarray(mirror, bool), np.float32(-1), np.float32(1))
        src = np.ascontiguousarray(images, dtype=np.float32).reshape(images.shape[0], -1)
        _rotate_disc(src, np.asarray(rows, np.int64), cos_a, sin_a, sgn, self.dx, self.dy, self.nx,
                     self._identity, out)
        return out

    def rotate_images(self, images: np.ndarray, rows: np.ndarray, alpha_deg: np.ndarray, mirror: np.ndarray,
                      out: np.ndarray) -> np.ndarray:
        """As :meth:`rotate`, written straight into images: ``out`` is ``(k, nx, nx)`` float32 whose pixels
        outside the disc are 0 (they are never written), i.e. ``to_images(rotate(...))`` without the copy."""
        a = np.deg2rad(np.asarray(alpha_deg, np.float64))
        cos_a, sin_a = np.cos(a).astype(np.float32), np.sin(a).astype(np.float32)
        sgn = np.where(np.asarray(mirror, bool), np.float32(-1), np.float32(1))
        src = np.ascontiguousarray(images, dtype=np.float32).reshape(images.shape[0], -1)
        _rotate_disc(src, np.asarray(rows, np.int64), cos_a, sin_a, sgn, self.dx, self.dy, self.nx,
                     self.flat_index, out.reshape(out.shape[0], -1))
        return out

    def to_images(self, samples: np.ndarray) -> np.ndarray:
        """Place ``(k, P)`` disc samples into ``(k, nx, nx)`` images (0 outside the disc)."""
        k = samples.shape[0]
        img = np.zeros((k, self.nx * self.nx), np.float32)
        img[:, self.flat_index] = samples
        return img.reshape(k, self.nx, self.nx)


# --------------------------------------------------------------------------------------
# Group statistics
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CtfMembers:
    """CTF parameters of the members of a set of groups (each ``(B, G)``; angles already aligned)."""

    defocus_u_A: np.ndarray
    defocus_v_A: np.ndarray
    defocus_angle_deg: np.ndarray
    voltage_kV: np.ndarray
    cs_mm: np.ndarray
    amplitude_contrast: np.ndarray
    phase_shift_deg: np.ndarray
    bfactor_A2: np.ndarray


def group_statistics(prepared: np.ndarray, rows: np.ndarray, alpha_deg: np.ndarray, mirror: np.ndarray,
                     rotator: DiscRotator, *, ctf: CtfMembers | None = None, pixel_size_A: float = 1.0,
                     wiener_snr: float = 1.0e5) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance maps of groups of aligned members (module notes).

    Parameters
    ----------
    prepared : numpy.ndarray
        ``(U, nx, nx)`` preprocessed images (:func:`prepare_images`).
    rows : numpy.ndarray
        ``(B, G)`` rows of ``prepared`` for each member.
    alpha_deg, mirror : numpy.ndarray
        ``(B, G)`` in-plane angles and mirror flags (:func:`inplane_alignment`).
    rotator : DiscRotator
        Rotation kernel for ``nx``.
    ctf : CtfMembers, optional
        Member CTFs in the group frame: selects the CTF branch.
    pixel_size_A : float
        Working pixel size (for the CTF).
    wiener_snr : float
        SNR constant of the Wiener mean.

    Returns
    -------
    ave, var : numpy.ndarray
        ``(B, nx, nx)`` float32 group means and variances (variance >= 0).
    """
    b, g = rows.shape
    nx = rotator.nx
    ave = np.empty((b, nx, nx), np.float32)
    var = np.empty((b, nx, nx), np.float32)
    buf = np.empty((g, rotator.n_pixels), np.float32)
    ctf_grid = CtfGrid(nx, pixel_size_A) if ctf is not None else None
    aligned = np.zeros((g, nx, nx), np.float32) if ctf is not None else None
    for i in range(b):
        if ctf is not None:
            rotator.rotate_images(prepared, rows[i], alpha_deg[i], mirror[i], aligned)
            ave[i], var[i] = _ctf_group(aligned, _ctf_row(ctf, i), ctf_grid, wiener_snr)
            continue
        a = rotator.rotate(prepared, rows[i], alpha_deg[i], mirror[i], out=buf)
        m = a.mean(axis=0, dtype=np.float64)
        d = a - m.astype(np.float32)
        v = np.einsum("gp,gp->p", d, d, dtype=np.float64) / (g - 1)
        ave[i] = rotator.to_images(m[None].astype(np.float32))[0]
        var[i] = rotator.to_images(v[None].astype(np.float32))[0]
    return ave, var


def _ctf_row(ctf: CtfMembers, i: int) -> dict:
    return {f: getattr(ctf, f)[i] for f in CtfMembers.__dataclass_fields__}


@numba.njit(cache=True, nogil=True)
def _wiener_residuals(x, c, inv_snr, mean_out):                                # pragma: no cover - compiled
    """Wiener mean ``A = sum C X / (sum C^2 + 1/snr)`` into ``mean_out``; ``x`` becomes the residuals
    ``sign(C) sqrt(G / (sum C^2 + 1/snr)) (X - C A)`` (module notes). Sums in float64."""
    g, ny, nh = x.shape
    for y in range(ny):
        for k in range(nh):
            s2 = inv_snr
            num_re = 0.0
            num_im = 0.0
            for j in range(g):
                cj = np.float64(c[j, y, k])
                v = x[j, y, k]
                s2 += cj * cj
                num_re += cj * v.real
                num_im += cj * v.imag
            a_re = num_re / s2
            a_im = num_im / s2
            mean_out[y, k] = complex(a_re, a_im)
            scale = np.sqrt(g / s2)
            for j in range(g):
                cj = np.float64(c[j, y, k])
                sg = scale if cj > 0 else (-scale if cj < 0 else 0.0)
                v = x[j, y, k]
                x[j, y, k] = complex(sg * (v.real - cj * a_re), sg * (v.imag - cj * a_im))


def _ctf_group(aligned: np.ndarray, params: dict, ctf_grid: "CtfGrid", snr: float):
    g, nx, _ = aligned.shape
    c = ctf_grid.evaluate(**params)
    x = sfft.rfft2(aligned)
    mean_f = np.empty(x.shape[1:], np.complex64)
    _wiener_residuals(x, c, 1.0 / snr, mean_f)
    d = sfft.irfft2(x, s=(nx, nx))
    var = np.einsum("gyx,gyx->yx", d, d, dtype=np.float64) / (g - 1)
    ave = sfft.irfft2(mean_f, s=(nx, nx))
    return ave.astype(np.float32), var.astype(np.float32)
