"""Contrast transfer function: evaluation (RELION and EMAN2/SPHIRE parametrisations), phase flip, Wiener.

Formula and sign convention
---------------------------
With spatial frequency ``k`` (1/Å) at azimuth ``phi = atan2(ky, kx)`` (x = column,
y = row index), wavelength ``lambda`` (Å, :func:`isavar.conventions.electron_wavelength_A`)
and defocus ``dz(phi) = U cos^2(phi - angle) + V sin^2(phi - angle)`` (Å,
positive = underfocus)::

    gamma(k) = pi lambda dz(phi) k^2 - (pi / 2) Cs lambda^3 k^4 + phase_shift + asin(w)
    CTF(k)   = sin(gamma(k)) * exp(-B k^2 / 4)

with ``Cs`` in Å (mm x 1e7), ``w`` the amplitude-contrast fraction
(``asin(w) = atan(w / sqrt(1 - w^2))``) and ``phase_shift`` in radians.

This is RELION's CTF exactly (``src/ctf.h``/``ctf.cpp``): RELION stores the
defocus *negated* (``defocus_average = -(U + V) / 2``) and returns
``-sin(K1 dz_neg k^2 + K2 k^4 - phase_shift - K3)`` with ``K1 = pi lambda``,
``K2 = (pi / 2) Cs lambda^3``, ``K3 = atan(w / sqrt(1 - w^2))``; expanding the
two minus signs gives ``+sin(gamma)`` above. It is also EMAN2/SPHIRE's
"positive" convention ``sin(pi (dz 1e4 lambda s^2 - Cs 1e7 lambda^3 s^4 / 2) + phi_a)``
(spec isac2.md §1.2.1), so **the two parametrisations give identical values,
with no global sign difference** (checked in the tests through
:func:`isavar.conventions.relion_to_eman_defocus`). ``CTF(0) = sin(asin(w) + phase_shift) > 0``;
for underfocus the CTF first rises towards +1. Note: writing the RELION form with a
positive-underfocus ``chi = pi lambda dz k^2 - ...`` and ``CTF = -sin(chi)`` (as is sometimes
done) flips the sign of the defocus term and is *not* what RELION computes.

Fourier layout
--------------
CTF images use numpy's unshifted FFT layout with frequencies ``fftfreq(n) / apix``
(``rfft=True``: ``rfftfreq`` along x). For even boxes the Nyquist row/column
(which represents both ``+0.5`` and ``-0.5`` cycles/pixel) holds the mean of the
CTF at the two frequencies, so an astigmatic CTF is Hermitian-symmetric on the
grid and filtering keeps images real (phase flipping twice is the identity).
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from isavar.conventions import electron_wavelength_A
from isavar.core.fft import as_stack, freq_grid_2d, image_chunks, pad, window

__all__ = [
    "CtfGrid",
    "ctf_at",
    "ctf_2d",
    "ctf_at_eman",
    "ctf_2d_eman",
    "eman_wavelength_A",
    "aligned_defocus_angle",
    "ctf_params_from_table",
    "phase_flip",
    "phase_flip_padded",
    "perimeter_mean",
    "ctf_weighted_sums",
    "wiener_from_sums",
    "wiener_filter",
]

_RELION_KEYS = (
    "defocus_u_A",
    "defocus_v_A",
    "defocus_angle_deg",
    "voltage_kV",
    "cs_mm",
    "amplitude_contrast",
    "phase_shift_deg",
    "bfactor_A2",
)


def eman_wavelength_A(voltage_kV) -> np.ndarray:
    """EMAN2/SPHIRE electron wavelength ``12.398 / sqrt(V (1022 + V))`` Å (V in kV).

    Differs from :func:`isavar.conventions.electron_wavelength_A` by about 1e-5
    relative; offered only for bit-faithful comparisons with SPHIRE.
    """
    v = np.asarray(voltage_kV, dtype=np.float64)
    return 12.398 / np.sqrt(v * (1022.0 + v))


def ctf_at(
    kx,
    ky,
    *,
    defocus_u_A,
    defocus_v_A,
    defocus_angle_deg,
    voltage_kV,
    cs_mm,
    amplitude_contrast,
    phase_shift_deg=0.0,
    bfactor_A2=0.0,
    wavelength_A=None,
) -> np.ndarray:
    """CTF at arbitrary frequencies, RELION parametrisation (module docstring for the formula).

    Parameters
    ----------
    kx, ky : array_like
        Frequencies in 1/Å along x (columns) and y (rows); broadcast with the
        CTF parameters.
    defocus_u_A, defocus_v_A : array_like
        Defocus along U and V in Å (positive = underfocus).
    defocus_angle_deg : array_like
        Angle from +x to the U axis, degrees (RELION ``rlnDefocusAngle``).
    voltage_kV, cs_mm : array_like
        Acceleration voltage (kV) and spherical aberration (mm).
    amplitude_contrast : array_like
        Fraction in ``[0, 1)``.
    phase_shift_deg, bfactor_A2 : array_like, optional
        Phase-plate shift (degrees) and envelope B-factor (Å^2).
    wavelength_A : array_like, optional
        Override the wavelength (default from the voltage).

    Returns
    -------
    numpy.ndarray
        float64 CTF values, broadcast shape.
    """
    lam = electron_wavelength_A(voltage_kV) if wavelength_A is None else np.asarray(wavelength_A, np.float64)
    k2, cos2phi, sin2phi = _polar_terms(kx, ky)
    a2 = 2.0 * np.deg2rad(np.asarray(defocus_angle_deg, dtype=np.float64))
    u = np.asarray(defocus_u_A, dtype=np.float64)
    v = np.asarray(defocus_v_A, dtype=np.float64)
    # U cos^2(phi - a) + V sin^2(phi - a) = (U + V)/2 + (U - V)/2 cos(2 phi - 2 a)
    dz = 0.5 * (u + v) + 0.5 * (u - v) * (cos2phi * np.cos(a2) + sin2phi * np.sin(a2))
    cs = np.asarray(cs_mm, dtype=np.float64) * 1e7
    w = np.asarray(amplitude_contrast, dtype=np.float64)
    lam_k2 = lam * k2
    gamma = (
        np.pi * lam_k2 * dz
        - 0.5 * np.pi * cs * lam_k2 * lam_k2 * lam
        + (np.deg2rad(np.asarray(phase_shift_deg, dtype=np.float64)) + np.arctan(w / np.sqrt(1.0 - w * w)))
    )
    return _envelope(np.sin(gamma), bfactor_A2, k2)


def _polar_terms(kx, ky):
    """``k^2``, ``cos 2 phi`` and ``sin 2 phi`` of frequencies (``phi = atan2(ky, kx)``, 0 at ``k = 0``)."""
    kx = np.asarray(kx, dtype=np.float64)
    ky = np.asarray(ky, dtype=np.float64)
    k2 = kx * kx + ky * ky
    safe = np.where(k2 > 0, k2, 1.0)
    cos2phi = np.where(k2 > 0, (kx * kx - ky * ky) / safe, 1.0)
    sin2phi = np.where(k2 > 0, 2.0 * kx * ky / safe, 0.0)
    return k2, cos2phi, sin2phi


def _envelope(values, bfactor_A2, k2):
    """Multiply by ``exp(-B k^2 / 4)`` (skipped when every B is 0)."""
    b = np.asarray(bfactor_A2, dtype=np.float64)
    if not np.any(b):
        return values * np.ones_like(k2)
    return values * np.exp(-b * k2 / 4.0)


def ctf_at_eman(
    kx,
    ky,
    *,
    defocus_um,
    dfdiff_um,
    dfang_deg,
    voltage_kV,
    cs_mm,
    ampcont_percent,
    bfactor_A2=0.0,
    wavelength_A=None,
) -> np.ndarray:
    """CTF at arbitrary frequencies, EMAN2/SPHIRE parametrisation (spec isac2.md §1.2.1, variability.md §1.4).

    ``dz(phi) = defocus - dfdiff / 2 * sin(2 (phi + dfang))`` (µm),
    ``CTF = sin(pi (dz 1e4 lambda s^2 - Cs 1e7 lambda^3 s^4 / 2) + asin(w)) exp(-B s^2 / 4)``.

    Parameters
    ----------
    kx, ky : array_like
        Frequencies in 1/Å.
    defocus_um, dfdiff_um, dfang_deg : array_like
        EMAN2 mean defocus (µm, underfocus positive), astigmatism amplitude
        (µm) and angle (degrees).
    voltage_kV, cs_mm : array_like
        kV and mm.
    ampcont_percent : array_like
        Amplitude contrast in percent.
    bfactor_A2 : array_like, optional
        B-factor in Å^2.
    wavelength_A : array_like, optional
        Default: :func:`isavar.conventions.electron_wavelength_A` (pass
        :func:`eman_wavelength_A` for SPHIRE's own formula).

    Returns
    -------
    numpy.ndarray
        float64, same values and sign as :func:`ctf_at` for converted parameters.
    """
    lam = electron_wavelength_A(voltage_kV) if wavelength_A is None else np.asarray(wavelength_A, np.float64)
    s2, cos2phi, sin2phi = _polar_terms(kx, ky)
    d2 = 2.0 * np.deg2rad(np.asarray(dfang_deg, np.float64))
    # sin(2 (phi + dfang)) = sin 2phi cos 2dfang + cos 2phi sin 2dfang
    dz = np.asarray(defocus_um, np.float64) - 0.5 * np.asarray(dfdiff_um, np.float64) * (
        sin2phi * np.cos(d2) + cos2phi * np.sin(d2)
    )
    w = np.asarray(ampcont_percent, dtype=np.float64) / 100.0
    cs = np.asarray(cs_mm, dtype=np.float64)
    gamma = np.pi * (dz * 1e4 * lam * s2 - cs * 1e7 * lam**3 * s2 * s2 / 2.0) + np.arctan(w / np.sqrt(1.0 - w * w))
    return _envelope(np.sin(gamma), bfactor_A2, s2)


def _params_column(params: dict) -> tuple[int, dict]:
    """Broadcast scalar/``(n,)`` parameters to ``(n, 1, 1)`` arrays."""
    arrays = {k: np.atleast_1d(np.asarray(v, dtype=np.float64)) for k, v in params.items()}
    for k, v in arrays.items():
        if v.ndim != 1:
            raise ValueError(f"CTF parameter {k} must be a scalar or 1-D, got shape {v.shape}")
    try:
        shape = np.broadcast_shapes(*(v.shape for v in arrays.values()))
    except ValueError as exc:
        lengths = {k: v.size for k, v in arrays.items()}
        raise ValueError(f"CTF parameters have incompatible lengths: {lengths}") from exc
    return shape[0], {k: np.broadcast_to(v, shape)[:, None, None] for k, v in arrays.items()}


def _grid_eval(func, shape, pixel_size_A: float, rfft: bool, params: dict, grid_func=None) -> np.ndarray:
    """Evaluate ``func(kx, ky, **params)`` on an FFT grid with Hermitian-symmetric Nyquist samples.

    ``grid_func(kx, ky, cols, n)``, when given, evaluates ``func`` on the whole grid at once (``(n, ny, nx)``);
    ``func`` itself then only gives the Nyquist row and column."""
    if np.ndim(shape) == 0:
        ny = nx = int(shape)
    else:
        ny, nx = (int(s) for s in shape)
    if pixel_size_A <= 0:
        raise ValueError(f"pixel size must be positive, got {pixel_size_A}")
    n, cols = _params_column(params)
    ky, kx = freq_grid_2d(ny, nx, rfft=rfft)
    ky, kx = ky / pixel_size_A, kx / pixel_size_A
    if grid_func is not None:
        out = grid_func(kx, ky, cols, n)
    else:
        out = func(kx[None], ky[None], **cols)
        out = np.broadcast_to(out, (n,) + kx.shape).copy()
    half_y, half_x = 0.5 / pixel_size_A, 0.5 / pixel_size_A
    if nx % 2 == 0:
        c = nx // 2
        ky_col = ky[None, :, c]
        out[:, :, c] = 0.5 * (func(half_x, ky_col, **_squeeze(cols)) + func(-half_x, ky_col, **_squeeze(cols)))
    if ny % 2 == 0:
        r = ny // 2
        kx_row = kx[None, r, :]
        row = 0.5 * (func(kx_row, half_y, **_squeeze(cols)) + func(kx_row, -half_y, **_squeeze(cols)))
        if nx % 2 == 0:
            c = nx // 2
            corners = [func(sx * half_x, sy * half_y, **_squeeze(cols)) for sx in (1, -1) for sy in (1, -1)]
            row[:, c] = 0.25 * np.sum(corners, axis=0)[:, 0]
        out[:, r, :] = row
    return out.astype(np.float32, copy=False)


#: images per block of :func:`_ctf_at_grid` (bounds its float64 work array)
CTF_BLOCK_VALUES = 1 << 21


def _ctf_at_grid(kx, ky, cols: dict, n: int) -> np.ndarray:
    """:func:`ctf_at` on a frequency grid for ``n`` parameter sets, ``(n, ny, nx)`` float32.

    The values are :func:`ctf_at`'s rounded to float32, bit for bit: the phase comes from a compiled loop with
    the same operations in the same order (:func:`isavar.core._kernels.ctf_phase`), then NumPy's ``sin`` and
    envelope, one block of images at a time instead of ``(n, ny, nx)`` float64 temporaries.
    """
    from isavar.core import _kernels

    def per_image(key):
        return np.ascontiguousarray(cols[key][:, 0, 0], dtype=np.float64)

    k2, cos2phi, sin2phi = (np.ascontiguousarray(t, dtype=np.float64).reshape(-1) for t in _polar_terms(kx, ky))
    u, v = per_image("defocus_u_A"), per_image("defocus_v_A")
    a2 = 2.0 * np.deg2rad(per_image("defocus_angle_deg"))
    w = per_image("amplitude_contrast")
    lam = electron_wavelength_A(per_image("voltage_kV"))
    phase = np.deg2rad(per_image("phase_shift_deg")) + np.arctan(w / np.sqrt(1.0 - w * w))
    b = per_image("bfactor_A2")
    cs = per_image("cs_mm") * 1e7
    out = np.empty((n, k2.size), dtype=np.float32)
    block = max(1, CTF_BLOCK_VALUES // max(1, k2.size))
    gamma = np.empty((min(n, block), k2.size))
    for i0 in range(0, n, block):
        sl = slice(i0, min(n, i0 + block))
        g = gamma[:sl.stop - sl.start]
        _kernels.ctf_phase(k2, cos2phi, sin2phi, 0.5 * (u[sl] + v[sl]), 0.5 * (u[sl] - v[sl]), np.cos(a2[sl]),
                           np.sin(a2[sl]), lam[sl], cs[sl], phase[sl], g)
        np.sin(g, out=g)
        if np.any(b[sl]):
            g *= np.exp(-b[sl, None] * k2[None] / 4.0)
        out[sl] = g
    return out.reshape((n,) + np.shape(kx))


def _squeeze(cols: dict) -> dict:
    """Parameters as ``(n, 1)`` for evaluation along one row/column."""
    return {k: v[:, :, 0] for k, v in cols.items()}


def ctf_2d(
    shape,
    pixel_size_A: float,
    *,
    defocus_u_A,
    defocus_v_A,
    defocus_angle_deg,
    voltage_kV,
    cs_mm,
    amplitude_contrast,
    phase_shift_deg=0.0,
    bfactor_A2=0.0,
    rfft: bool = False,
) -> np.ndarray:
    """CTF images in FFT layout, RELION parametrisation, vectorised over particles.

    Parameters
    ----------
    shape : int or tuple of int
        Image box ``N`` or ``(ny, nx)``.
    pixel_size_A : float
        Pixel size in Å.
    defocus_u_A, defocus_v_A, defocus_angle_deg, voltage_kV, cs_mm, amplitude_contrast, phase_shift_deg, bfactor_A2
        Scalars or ``(n,)`` arrays, see :func:`ctf_at`.
    rfft : bool, optional
        Return the ``numpy.fft.rfft2`` half-plane (``nx // 2 + 1`` columns).

    Returns
    -------
    numpy.ndarray
        ``(n, ny, nx)`` or ``(n, ny, nx // 2 + 1)`` float32, zero frequency at
        ``[0, 0]`` (``n = 1`` for all-scalar parameters).

    Examples
    --------
    >>> c = ctf_2d(64, 1.5, defocus_u_A=15000, defocus_v_A=15000, defocus_angle_deg=0,
    ...            voltage_kV=300, cs_mm=2.7, amplitude_contrast=0.1)
    >>> c.shape, round(float(c[0, 0, 0]), 4)
    ((1, 64, 64), 0.1)
    """
    params = dict(
        defocus_u_A=defocus_u_A,
        defocus_v_A=defocus_v_A,
        defocus_angle_deg=defocus_angle_deg,
        voltage_kV=voltage_kV,
        cs_mm=cs_mm,
        amplitude_contrast=amplitude_contrast,
        phase_shift_deg=phase_shift_deg,
        bfactor_A2=bfactor_A2,
    )
    return _grid_eval(ctf_at, shape, pixel_size_A, rfft, params, grid_func=_ctf_at_grid)


def ctf_2d_eman(
    shape,
    pixel_size_A: float,
    *,
    defocus_um,
    dfdiff_um,
    dfang_deg,
    voltage_kV,
    cs_mm,
    ampcont_percent,
    bfactor_A2=0.0,
    rfft: bool = False,
    wavelength: str = "relion",
) -> np.ndarray:
    """CTF images from EMAN2/SPHIRE parameters (same layout and values as :func:`ctf_2d`).

    Parameters
    ----------
    shape, pixel_size_A, rfft
        As :func:`ctf_2d`.
    defocus_um, dfdiff_um, dfang_deg, voltage_kV, cs_mm, ampcont_percent, bfactor_A2
        Scalars or ``(n,)``, see :func:`ctf_at_eman`.
    wavelength : {"relion", "eman"}, optional
        Wavelength formula: RELION/:mod:`isavar.conventions` (default) or
        SPHIRE's ``12.398 / sqrt(V (1022 + V))``.

    Returns
    -------
    numpy.ndarray
        ``(n, ny, nx[//2 + 1])`` float32.
    """
    if wavelength not in ("relion", "eman"):
        raise ValueError(f"wavelength must be 'relion' or 'eman', got {wavelength!r}")
    lam = electron_wavelength_A(voltage_kV) if wavelength == "relion" else eman_wavelength_A(voltage_kV)
    params = dict(
        defocus_um=defocus_um,
        dfdiff_um=dfdiff_um,
        dfang_deg=dfang_deg,
        voltage_kV=voltage_kV,
        cs_mm=cs_mm,
        ampcont_percent=ampcont_percent,
        bfactor_A2=bfactor_A2,
        wavelength_A=lam,
    )
    return _grid_eval(ctf_at_eman, shape, pixel_size_A, rfft, params)


def aligned_defocus_angle(defocus_angle_deg, alpha_deg, mirror) -> np.ndarray:
    """RELION astigmatism angle of an image after applying 2-D parameters ``(alpha, ., ., mirror)``.

    An image transformed by ``T = M**m R(alpha)`` (plus any shift) has the
    CTF ``CTF'(k') = CTF(R(alpha)^T M**m k')`` (variability.md §1.4). Since the
    CTF depends on the azimuth only through ``cos 2(phi - angle)``, this is the
    same CTF with the angle ``angle - alpha`` (no mirror) or ``alpha - angle``
    (mirror), returned in ``[0, 180)``. (EMAN2: ``dfang' = dfang + alpha``,
    mirrored ``90 - dfang'``.)

    Parameters
    ----------
    defocus_angle_deg, alpha_deg : array_like
        Degrees.
    mirror : array_like
        0/1.

    Returns
    -------
    numpy.ndarray
        Degrees in ``[0, 180)``.
    """
    angle = np.asarray(defocus_angle_deg, dtype=np.float64)
    alpha = np.asarray(alpha_deg, dtype=np.float64)
    m = np.asarray(mirror) == 1
    return np.mod(np.where(m, alpha - angle, angle - alpha), 180.0)


def ctf_params_from_table(table, rows=None) -> dict:
    """CTF keyword arguments for :func:`ctf_2d` from a canonical particle table.

    Parameters
    ----------
    table : pandas.DataFrame or mapping
        Columns ``defocus_u_A, defocus_v_A, defocus_angle_deg, voltage_kV,
        cs_mm, amplitude_contrast`` and optionally ``phase_shift_deg``,
        ``ctf_bfactor_A2`` (:mod:`isavar.io.particles`).
    rows : array_like, optional
        Positional row indices to select (default: all rows).

    Returns
    -------
    dict
        ``(n,)`` float64 arrays keyed as :func:`ctf_2d` expects.

    Raises
    ------
    ValueError
        If a required column is missing.
    """
    out = {}
    for key in _RELION_KEYS:
        column = "ctf_bfactor_A2" if key == "bfactor_A2" else key
        if column not in table:
            if key in ("phase_shift_deg", "bfactor_A2"):
                continue
            raise ValueError(f"particle table has no column {column!r} (needed for the CTF)")
        values = np.asarray(table[column], dtype=np.float64)
        out[key] = values if rows is None else values[np.asarray(rows)]
    if out:
        n = len(out["defocus_u_A"])
        for key in ("phase_shift_deg", "bfactor_A2"):
            out.setdefault(key, np.zeros(n))
    return out


def _match_ctf(ctf, shape) -> np.ndarray:
    """Return the rfft-layout part ``(..., ny, nx // 2 + 1)`` of a full or rfft CTF array."""
    ny, nx = shape
    c = np.asarray(ctf, dtype=np.float32)
    if c.shape[-2:] == (ny, nx) and nx > 2:
        return c[..., : nx // 2 + 1]
    if c.shape[-2:] == (ny, nx // 2 + 1):
        return c
    raise ValueError(f"CTF shape {c.shape} matches neither {(ny, nx)} nor the rfft layout {(ny, nx // 2 + 1)}")


def phase_flip(images, ctf) -> np.ndarray:
    """Multiply each image's Fourier transform by ``sign(CTF)`` (``+1`` where ``CTF >= 0``).

    Parameters
    ----------
    images : array_like
        ``(ny, nx)`` or ``(n, ny, nx)``.
    ctf : array_like
        ``(ny, nx)`` / ``(n, ny, nx)`` in FFT layout, or the rfft layout
        ``(..., ny, nx // 2 + 1)`` (e.g. from :func:`ctf_2d`).

    Returns
    -------
    numpy.ndarray
        float32, same shape as ``images``. Applying it twice returns the input.
    """
    stack, single = as_stack(images)
    n, ny, nx = stack.shape
    sign = np.where(_match_ctf(ctf, (ny, nx)) < 0, np.float32(-1), np.float32(1))
    per_image = sign.ndim == 3 and sign.shape[0] == n and n > 1
    out = np.empty(stack.shape, dtype=np.float32)
    for sl in image_chunks(n, ny * nx):
        spec = scipy.fft.rfft2(np.asarray(stack[sl], dtype=np.float32))           # single precision
        out[sl] = scipy.fft.irfft2(spec * (sign[sl] if per_image else sign), s=(ny, nx))
    return out[0] if single else out


def perimeter_mean(images) -> np.ndarray:
    """Mean of the border pixels (first/last row and column) of each image, ``(n,)`` float64."""
    stack, _ = as_stack(images)
    border = np.ones(stack.shape[1:], dtype=bool)
    border[1:-1, 1:-1] = False
    return stack[:, border].astype(np.float64).mean(axis=1)


def phase_flip_padded(images, pixel_size_A: float, *, pad_factor: int = 2, **ctf_params) -> np.ndarray:
    """Phase-flip with padding, as EMAN2 ``filt_ctf(img, ctf, binary=1)`` (spec isac2.md §1.2.1).

    Each image is centre-padded to ``pad_factor * N`` with the mean of its
    perimeter pixels, Fourier transformed, multiplied by ``sign(CTF)`` of the
    padded grid, transformed back and cropped to ``N`` (:func:`isavar.core.fft.window`).
    Padding reduces the wrap-around of CTF delocalisation.

    Parameters
    ----------
    images : array_like
        ``(ny, nx)`` or ``(n, ny, nx)``.
    pixel_size_A : float
        Pixel size (Å).
    pad_factor : int, optional
        1 disables padding (then equal to :func:`phase_flip` with :func:`ctf_2d`).
    **ctf_params
        RELION parameters for :func:`ctf_2d` (scalars or ``(n,)``).

    Returns
    -------
    numpy.ndarray
        float32, same shape as ``images``.
    """
    stack, single = as_stack(images)
    n, ny, nx = stack.shape
    if pad_factor < 1:
        raise ValueError(f"pad_factor must be >= 1, got {pad_factor}")
    big = (pad_factor * ny, pad_factor * nx)
    sizes = {np.size(v) for v in ctf_params.values() if np.ndim(v) > 0}
    if sizes - {1, n}:
        raise ValueError(f"got CTF parameters of lengths {sorted(sizes)} for {n} images")
    out = np.empty(stack.shape, dtype=np.float32)
    for sl in image_chunks(n, big[0] * big[1]):
        part = {k: (np.asarray(v)[sl] if np.size(v) == n and np.ndim(v) > 0 else v) for k, v in ctf_params.items()}
        chunk = stack[sl]
        padded = pad(chunk, big, value=perimeter_mean(chunk)) if pad_factor > 1 else chunk
        flipped = phase_flip(padded, ctf_2d(big, pixel_size_A, rfft=True, **part))
        out[sl] = window(flipped, (ny, nx)) if pad_factor > 1 else flipped
    return out[0] if single else out


def ctf_weighted_sums(images, ctf) -> tuple[np.ndarray, np.ndarray]:
    """Sums for a Wiener/CTF-corrected average: ``sum_i CTF_i F_i`` and ``sum_i CTF_i^2``.

    Sum these over chunks or processes, then call :func:`wiener_from_sums`.

    Parameters
    ----------
    images : array_like
        ``(n, ny, nx)`` (images as recorded, i.e. CTF-modulated).
    ctf : array_like
        ``(n, ny, nx)`` FFT layout or ``(n, ny, nx // 2 + 1)`` rfft layout
        (a single ``(ny, ...)`` CTF is broadcast).

    Returns
    -------
    numerator : numpy.ndarray
        ``(ny, nx // 2 + 1)`` complex128 ``sum CTF F`` (rfft layout).
    denominator : numpy.ndarray
        ``(ny, nx // 2 + 1)`` float64 ``sum CTF^2``.
    """
    stack, _ = as_stack(images)
    n, ny, nx = stack.shape
    c = np.broadcast_to(_match_ctf(ctf, (ny, nx)), (n, ny, nx // 2 + 1))
    numerator = np.zeros((ny, nx // 2 + 1), dtype=np.complex128)
    denominator = np.zeros((ny, nx // 2 + 1), dtype=np.float64)
    for sl in image_chunks(n, ny * nx):
        cc = c[sl].astype(np.float64)
        numerator += (cc * np.fft.rfft2(stack[sl].astype(np.float64))).sum(axis=0)
        denominator += (cc * cc).sum(axis=0)
    return numerator, denominator


def wiener_from_sums(numerator, denominator, snr: float, shape) -> np.ndarray:
    """Wiener average ``IFFT(sum CTF F / (sum CTF^2 + 1 / snr))`` from :func:`ctf_weighted_sums`.

    Parameters
    ----------
    numerator, denominator : array_like
        rfft-layout sums.
    snr : float
        Signal-to-noise ratio (> 0); ``1 / snr`` regularises zeros of the CTF.
    shape : tuple of int
        ``(ny, nx)``.

    Returns
    -------
    numpy.ndarray
        ``(ny, nx)`` float32.
    """
    if snr <= 0:
        raise ValueError(f"snr must be positive, got {snr}")
    spec = np.asarray(numerator) / (np.asarray(denominator) + 1.0 / snr)
    return np.fft.irfft2(spec, s=tuple(shape)).astype(np.float32)


def wiener_filter(images, ctf, snr: float) -> np.ndarray:
    """CTF-corrected (Wiener) average of images: ``sum CTF_i F_i / (sum CTF_i^2 + 1 / snr)``.

    Parameters
    ----------
    images : array_like
        ``(n, ny, nx)`` or a single ``(ny, nx)`` image (then a Wiener-filtered image).
    ctf : array_like
        Matching CTFs, FFT or rfft layout (see :func:`ctf_weighted_sums`).
    snr : float
        Signal-to-noise ratio (> 0).

    Returns
    -------
    numpy.ndarray
        ``(ny, nx)`` float32.
    """
    stack, _ = as_stack(images)
    num, den = ctf_weighted_sums(stack, ctf)
    return wiener_from_sums(num, den, snr, stack.shape[1:])


class CtfGrid:
    """Fast float32 CTF evaluation for many parameter sets on one rfft grid.

    Same formula and sign as :func:`ctf_at` (RELION convention,
    ``dz = U cos^2(phi - a) + V sin^2(phi - a)``), written as a linear combination
    of precomputed ``k^2``, ``k^4``, ``cos 2 phi`` and ``sin 2 phi`` grids (about 8x
    faster than :func:`ctf_2d`; the Nyquist row/column is evaluated
    at ``+0.5`` only instead of averaged over ``+-0.5``).

    Parameters
    ----------
    nx : int
        Image size.
    pixel_size_A : float
        Pixel size (Å).
    """

    def __init__(self, nx: int, pixel_size_A: float):
        ky, kx = freq_grid_2d(nx, nx, rfft=True)
        ky, kx = ky / pixel_size_A, kx / pixel_size_A
        k2 = kx * kx + ky * ky
        phi = np.arctan2(ky, kx)
        self.shape = (nx, nx // 2 + 1)
        self.k2 = k2.astype(np.float32)
        self.k4 = (k2 * k2).astype(np.float32)
        self.cos2 = np.cos(2 * phi).astype(np.float32)
        self.sin2 = np.sin(2 * phi).astype(np.float32)

    def evaluate(self, *, defocus_u_A, defocus_v_A, defocus_angle_deg, voltage_kV, cs_mm, amplitude_contrast,
                 phase_shift_deg, bfactor_A2) -> np.ndarray:
        """CTF values ``(n, nx, nx // 2 + 1)`` float32 for ``(n,)`` parameter arrays."""
        def col(v):
            return np.asarray(v, np.float64).reshape(-1, 1, 1)

        lam = electron_wavelength_A(col(voltage_kV))
        u, v = col(defocus_u_A), col(defocus_v_A)
        a = np.deg2rad(col(defocus_angle_deg))
        mean = ((u + v) / 2 * np.pi * lam).astype(np.float32)
        half = ((u - v) / 2 * np.pi * lam)
        hc = (half * np.cos(2 * a)).astype(np.float32)
        hs = (half * np.sin(2 * a)).astype(np.float32)
        w = col(amplitude_contrast)
        cs = (0.5 * np.pi * col(cs_mm) * 1e7 * lam ** 3).astype(np.float32)
        const = (np.deg2rad(col(phase_shift_deg)) + np.arctan(w / np.sqrt(1.0 - w * w))).astype(np.float32)
        gamma = (mean + hc * self.cos2 + hs * self.sin2) * self.k2 - cs * self.k4 + const
        out = np.sin(gamma, out=gamma)
        b = col(bfactor_A2)
        if np.any(b != 0):
            out *= np.exp(-(b.astype(np.float32) / 4) * self.k2)
        return out
