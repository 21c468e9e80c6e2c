"""Building the ISAC working stack: CTF/VPP correction, shrinking, centring, crop/pad, normalisation.

Spec isac2 §1.1 step 1 and §1.2. The raw stack is read once, in chunks:
each image has the mean outside the particle mask subtracted, is phase-flipped
(``--CTF``) or whitened and flipped (``--VPP``) at full size, and is resampled
by ``target_radius / radius`` (Fourier cropping, about the centre N//2). The
pre-alignment runs on these shrunken images; its centring shifts are then
applied in Fourier space and the images are cropped/padded to the working box
and normalised.
"""

from __future__ import annotations

import numpy as np

from isavar.core.fft import fourier_shift, pad, resample_fourier, window
from isavar.core.filters import apply_radial_filter
from isavar.core.masks import circular_mask, rectangle_mask
from isavar.core.normalize import normalize_images


def shrunk_size(box: int, shrink: float) -> int:
    """``int(box * shrink + 0.5)`` (SPHIRE ``new_dim``)."""
    return int(box * shrink + 0.5)


def particle_mask(size: int, radius: float, *, filament_width: float = -1, angle_deg=None) -> np.ndarray:
    """Circle of ``radius``; for filaments a rotated rectangle per image (n, size, size).

    Parameters
    ----------
    size : int
    radius : float
        Particle radius (pixels).
    filament_width : float
        Filament width in pixels of this image scale; <= 0 for single particles.
    angle_deg : ndarray, (n,), optional
        Segment angles (filaments only).
    """
    if filament_width <= 0 or angle_deg is None:
        return circular_mask(size, radius)
    half_w = int(filament_width * 0.5)
    half_l = int(np.sqrt(2.0 * size * size)) // 2
    return np.stack([rectangle_mask(size, half_w, half_l, float(a)) for a in np.atleast_1d(angle_deg)])


def ctf_values(table, shape, pixel_size_A, *, rfft=True) -> np.ndarray:
    """CTF of each row of a particle table on an FFT grid (RELION convention; B-factor ignored)."""
    from isavar.core.ctf import ctf_2d, ctf_params_from_table

    kw = ctf_params_from_table(table)
    kw["bfactor_A2"] = np.zeros(len(table))
    return ctf_2d(shape, pixel_size_A, rfft=rfft, **kw)


def phase_flip_padded(images, table, pixel_size_A) -> np.ndarray:
    """Phase flip with 2x padding (SPHIRE ``filt_ctf(binary=1)``): pad with the perimeter mean, flip, crop."""
    from isavar.core.ctf import ctf_params_from_table, phase_flip_padded as _flip

    kw = ctf_params_from_table(table)
    kw["bfactor_A2"] = np.zeros(len(table))
    return np.asarray(_flip(images, pixel_size_A, pad_factor=2, **kw), dtype=np.float32)


def phase_flip_unpadded(images, table, pixel_size_A) -> np.ndarray:
    """Phase flip on the unpadded transform (VPP path)."""
    box = images.shape[-1]
    ctf = ctf_values(table, (box, box), pixel_size_A, rfft=True)
    spec = np.fft.rfft2(images) * np.where(ctf < 0, -1.0, 1.0)
    return np.fft.irfft2(spec, s=(box, box)).astype(np.float32)


def radial_amplitude_sum(images) -> np.ndarray:
    """Sum over images of the square root of the rotationally averaged power spectrum (VPP table input)."""
    n, box, _ = images.shape
    spec = np.abs(np.fft.rfft2(images)) ** 2 * (4.0 / (box * box) ** 2)
    ky = np.fft.fftfreq(box)[:, None]
    kx = np.fft.rfftfreq(box)[None, :]
    r = np.rint(np.hypot(ky, kx) * box).astype(np.int64)
    nbin = box // 2 + 1
    sel = r < nbin
    counts = np.bincount(r[sel], minlength=nbin)
    out = np.zeros(nbin)
    for i in range(n):
        prof = np.bincount(r[sel], weights=spec[i][sel], minlength=nbin) / np.maximum(counts, 1)
        out += np.sqrt(prof)
    return out


def vpp_table(amplitude_sum, n_images) -> np.ndarray:
    """``rpw[k] = N / sum_i sqrt(P_i(k))``, ``rpw[0] = 1`` (spec §1.1 step 1)."""
    amp = np.asarray(amplitude_sum, dtype=np.float64)
    rpw = np.where(amp > 0, n_images / np.where(amp > 0, amp, 1.0), 0.0)
    rpw[0] = 1.0
    return rpw


def correct_and_shrink(images, table, p, pixel_size_A, *, rpw=None) -> tuple[np.ndarray, np.ndarray | None]:
    """Full-size correction and shrinking of one chunk of raw images.

    Parameters
    ----------
    images : ndarray, (n, N, N)
        Raw images.
    table : pandas.DataFrame
        Their rows of the particle table (CTF, segment angles).
    p : Isac2Params
    pixel_size_A : float or None
        Needed for ``--CTF``/``--VPP``.
    rpw : ndarray, optional
        VPP whitening table.

    Returns
    -------
    working : ndarray, (n, nd, nd)
        Corrected (flipped/whitened) shrunken images; the working stack is made from these.
    prealign : ndarray or None
        VPP only: whitened but unflipped shrunken images for the pre-alignment (Q21); None otherwise.
    """
    images = np.asarray(images, dtype=np.float32)
    n, box, _ = images.shape
    angles = _segment_angles(table) if p.filament else None
    mask = particle_mask(box, p.radius, filament_width=p.filament_width, angle_deg=angles)
    images = normalize_images(images, mask, mean_region="outside", std_region=None)
    nd = shrunk_size(box, p.shrink)
    pre = None
    if p.CTF:
        images = phase_flip_padded(images, table, pixel_size_A)
    elif p.VPP:
        white = apply_radial_filter(images, rpw).astype(np.float32)
        pre = resample_fourier(white, nd) if nd != box else white
        images = apply_radial_filter(phase_flip_unpadded(images, table, pixel_size_A), rpw).astype(np.float32)
    out = resample_fourier(images, nd) if nd != box else images
    return np.asarray(out, dtype=np.float32), pre


def _segment_angles(table):
    if "segment_angle_deg" in table.columns:
        return np.asarray(table["segment_angle_deg"], dtype=np.float64)
    return np.zeros(len(table))


def finish_working_images(shrunk, shifts_shrunk, table, p) -> np.ndarray:
    """Centre, crop/pad to the working box and normalise (spec §1.2.2, §1.2.4).

    Parameters
    ----------
    shrunk : ndarray, (n, nd, nd)
        Output of :func:`correct_and_shrink`.
    shifts_shrunk : ndarray, (n, 2)
        Centring shifts (content moves by +shift) in shrunken pixels.
    table : pandas.DataFrame
        Rows of these images (segment angles for filaments).
    p : Isac2Params

    Returns
    -------
    ndarray, (n, T, T) float32
    """
    t = p.box
    nd = shrunk.shape[-1]
    img = shrunk
    if np.any(shifts_shrunk != 0):
        img = fourier_shift(img, shifts_shrunk)
    if nd > t:
        img = window(img, t)
    size = img.shape[-1]
    if p.filament:
        angles = _segment_angles(table)
        width = int(p.filament_width * p.shrink + 0.5)
        mask = np.stack([rectangle_mask(size, width // 2, int(np.sqrt(2.0 * size * size)) // 2, float(a))
                         for a in angles])
    elif nd >= t:
        mask = circular_mask(t, p.target_radius)
    else:
        mask = circular_mask(nd, nd // 2 - 2)
    img, _ = normalize_images(img, mask, mean_region="outside", std_region="inside", return_flags=True)
    if p.filament and not p.filament_mask_ignore:
        img = img * mask
    if nd < t:
        img = pad(img, t, 0.0)
    return np.asarray(img, dtype=np.float32)
