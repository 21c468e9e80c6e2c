"""Conventions used everywhere in isavar: units, axes, angles, shifts, indices, CTF.

This module is the single source of truth. Every other module converts through
the functions here rather than re-deriving a sign or a unit.

Arrays and grids
----------------
* Images are ``(ny, nx)`` arrays, stacks ``(n, ny, nx)``, volumes ``(nz, ny, nx)``:
  x is the fastest (last) axis.
* The centre of a grid of size ``N`` (rotation origin, projection origin and
  Fourier phase origin) is the integer index ``N // 2`` on every axis, for even
  and odd ``N`` alike (RELION, SPHIRE/EMAN2 and MRC viewers agree on this).
* Pixel sizes are in Å, angles in degrees at every edge (files, tables, CLI);
  radians only inside numerical kernels.

3D orientation (the canonical particle model)
---------------------------------------------
Euler angles are RELION's ``(rot, tilt, psi)`` in degrees, ZYZ, identical to
SPIDER/SPHIRE ``(phi, theta, psi)``. The rotation matrix is
``A = Rz(psi) @ Ry(tilt) @ Rz(rot)`` with
``Rz(a) = [[cos a, sin a, 0], [-sin a, cos a, 0], [0, 0, 1]]`` and
``Ry(b) = [[cos b, 0, -sin b], [0, 1, 0], [sin b, 0, cos b]]``.
A volume point ``X = (x, y, z)`` (relative to the centre) is seen in the image
at 2D position ``(A @ X)[:2] - origin``; the image is the line integral along z
of the rotated volume. ``origin`` is RELION's ``rlnOriginX/YAngst`` divided by
the pixel size: a particle with origin ``(ox, oy)`` sits at ``centre - (ox, oy)``
and shifting the image by ``+(ox, oy)`` re-centres it. The viewing direction in
volume coordinates is the third row of ``A``.

EMAN2 ``az, alt, phi`` relate to SPIDER as ``alt = theta``, ``az = phi + 90``,
``phi_eman = psi - 90``. SPHIRE's projection shifts ``(s2x, s2y)`` are RELION's
origin in pixels, same sign (``sp_relion2sphire`` passes ``rlnOriginX`` as
``s2x``, and SPHIRE's reconstructors shift each image by ``+s2x`` before
inserting it). SPHIRE stores ``xform.projection`` as the 3x4 matrix ``[A | t]``
with ``t = (-s2x, -s2y, 0) = (-origin_x_px, -origin_y_px, 0)``:
``sp_utilities.set_params_proj`` calls ``set_trans(-s2x, -s2y)`` and
``get_params_proj`` returns ``-tx, -ty`` (see :func:`origin_to_sphire_trans`).

2D alignment (ISAC / ``xform.align2d``)
---------------------------------------
A parameter set ``(alpha, sx, sy, mirror)`` maps image content at ``q``
(relative to the centre) to ``M**mirror @ (R(alpha) @ q + (sx, sy))`` with
``R(a) = [[cos a, sin a], [-sin a, cos a]]`` and ``M = diag(-1, 1)``; see
:mod:`isavar.core.params2d` for composition and inversion.

Indices
-------
Tables and arrays are 0-based. RELION ``index@stack`` names are 1-based, SPHIRE
``members`` and cryoSPARC ``blob/idx`` are 0-based; RELION ``rlnClassNumber`` and
``rlnOpticsGroup`` are 1-based.

CTF
---
Canonical (RELION) parameters: defocus U/V in Å (positive = underfocus),
astigmatism angle in degrees (from x to the U axis), voltage kV, Cs mm,
amplitude contrast as a fraction, phase shift degrees, B-factor Å².
EMAN2/SPHIRE HDF files (SPHIRE's convention, as ``sp_relion2sphire`` and
``sp_cter`` write them): ``defocus = (U + V) / 2`` in µm, ``dfdiff = (V - U)``
in µm, ``dfang = 45 - angle`` (mod 180), amplitude contrast in percent. In
SPHIRE's model the defocus along the Fourier direction at angle ``a`` from x is
``defocus - dfdiff / 2 * sin(2 (a + dfang))`` (``sp_morphology.rotavg_ctf``),
which equals RELION's ``(U + V)/2 + (U - V)/2 cos(2 (a - angle))``. EMAN2's own
programs (``e2ctf``) read the same two numbers differently: ``EMAN2Ctf::df(a) =
defocus + dfdiff / 2 * cos(2 (a - dfang))`` (``dfang`` = major axis), i.e.
``dfdiff = U - V`` and ``dfang = angle``. isavar reads and writes SPHIRE's
convention (the one on every SPHIRE stack); an astigmatic CTF fitted by
``e2ctf`` therefore comes in with its axes mislabelled (see docs/deviations.md).
cryoSPARC: ``df1_A``, ``df2_A`` in Å, ``df_angle_rad``, ``phase_shift_rad`` in
radians.
"""

from __future__ import annotations

import re

import numpy as np

#: Number of Å in one µm.
ANGSTROM_PER_MICROMETRE = 1.0e4


def grid_centre(n: int) -> int:
    """Return the 0-based centre index ``n // 2`` of a grid of ``n`` samples.

    Parameters
    ----------
    n : int
        Number of samples along the axis.

    Returns
    -------
    int
        The centre index (rotation, projection and Fourier phase origin).
    """
    return n // 2


# --------------------------------------------------------------------------------------
# Euler angles
# --------------------------------------------------------------------------------------


def _rot_z(a: np.ndarray) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    o, z = np.ones_like(a), np.zeros_like(a)
    return np.stack([np.stack([c, s, z], -1), np.stack([-s, c, z], -1), np.stack([z, z, o], -1)], -2)


def _rot_y(b: np.ndarray) -> np.ndarray:
    c, s = np.cos(b), np.sin(b)
    o, z = np.ones_like(b), np.zeros_like(b)
    return np.stack([np.stack([c, z, -s], -1), np.stack([z, o, z], -1), np.stack([s, z, c], -1)], -2)


def euler_to_matrix(rot, tilt, psi) -> np.ndarray:
    """Rotation matrices from RELION/SPIDER ZYZ Euler angles.

    Parameters
    ----------
    rot, tilt, psi : array_like
        Euler angles in degrees (RELION ``rlnAngleRot/Tilt/Psi`` = SPIDER
        ``phi/theta/psi``); broadcast against each other, shape ``(...)``.

    Returns
    -------
    numpy.ndarray
        ``(..., 3, 3)`` float64 matrices ``A = Rz(psi) @ Ry(tilt) @ Rz(rot)``.

    Examples
    --------
    >>> euler_to_matrix(0.0, 0.0, 0.0)
    array([[1., 0., 0.],
           [0., 1., 0.],
           [0., 0., 1.]])
    """
    rot, tilt, psi = np.broadcast_arrays(*(np.deg2rad(np.asarray(v, dtype=np.float64)) for v in (rot, tilt, psi)))
    return _rot_z(psi) @ _rot_y(tilt) @ _rot_z(rot)


def matrix_to_euler(matrix) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ZYZ Euler angles (degrees) of rotation matrices; inverse of :func:`euler_to_matrix`.

    Parameters
    ----------
    matrix : array_like
        ``(..., 3, 3)`` proper rotation matrices.

    Returns
    -------
    rot, tilt, psi : numpy.ndarray
        Degrees; ``rot`` and ``psi`` in ``(-180, 180]``, ``tilt`` in ``[0, 180]``.
        At the poles (``tilt`` 0 or 180) ``rot`` is 0 and the whole in-plane
        rotation is put in ``psi``.
    """
    a = np.asarray(matrix, dtype=np.float64)
    cos_tilt = np.clip(a[..., 2, 2], -1.0, 1.0)
    sin_tilt = np.hypot(a[..., 2, 0], a[..., 2, 1])
    tilt = np.arctan2(sin_tilt, cos_tilt)
    pole = sin_tilt < 1e-9
    # General case: row 2 = (sin t cos r, sin t sin r, cos t), column 2 = (-cos p sin t, sin p sin t, cos t).
    rot = np.where(pole, 0.0, np.arctan2(a[..., 2, 1], a[..., 2, 0]))
    psi_general = np.arctan2(a[..., 1, 2], -a[..., 0, 2])
    # At a pole A = Rz(psi) Ry(0 or pi): A[0,0] = +-cos psi, A[0,1] = sin psi.
    psi_pole = np.arctan2(a[..., 0, 1], np.where(cos_tilt > 0, a[..., 0, 0], -a[..., 0, 0]))
    psi = np.where(pole, psi_pole, psi_general)
    return _wrap180(np.rad2deg(rot)), np.rad2deg(tilt), _wrap180(np.rad2deg(psi))


def _wrap180(angle_deg):
    """Wrap degrees into ``(-180, 180]``."""
    wrapped = np.mod(np.asarray(angle_deg, dtype=np.float64) + 180.0, 360.0) - 180.0
    return np.where(wrapped == -180.0, 180.0, wrapped)


def wrap_degrees(angle_deg):
    """Wrap angles in degrees into ``(-180, 180]``.

    Parameters
    ----------
    angle_deg : array_like
        Angles in degrees.

    Returns
    -------
    numpy.ndarray
        The same angles, wrapped.
    """
    return _wrap180(angle_deg)


def viewing_direction(rot, tilt) -> np.ndarray:
    """Unit viewing directions (third row of the rotation matrix) in volume coordinates.

    Parameters
    ----------
    rot, tilt : array_like
        Euler angles in degrees, shape ``(...)``.

    Returns
    -------
    numpy.ndarray
        ``(..., 3)`` vectors ``(sin t cos r, sin t sin r, cos t)``.
    """
    r, t = np.deg2rad(np.asarray(rot, dtype=np.float64)), np.deg2rad(np.asarray(tilt, dtype=np.float64))
    r, t = np.broadcast_arrays(r, t)
    return np.stack([np.sin(t) * np.cos(r), np.sin(t) * np.sin(r), np.cos(t)], axis=-1)


def spider_to_eman(phi, theta, psi):
    """SPIDER ``(phi, theta, psi)`` to EMAN2 ``(az, alt, phi)``, degrees.

    Parameters
    ----------
    phi, theta, psi : array_like
        SPIDER/RELION ZYZ angles in degrees.

    Returns
    -------
    az, alt, phi_eman : numpy.ndarray
        EMAN2 angles: ``az = phi + 90``, ``alt = theta``, ``phi_eman = psi - 90``, wrapped to (-180, 180].
    """
    return _wrap180(np.asarray(phi) + 90.0), np.asarray(theta, dtype=np.float64), _wrap180(np.asarray(psi) - 90.0)


def eman_to_spider(az, alt, phi_eman):
    """EMAN2 ``(az, alt, phi)`` to SPIDER ``(phi, theta, psi)``, degrees; inverse of :func:`spider_to_eman`.

    Parameters
    ----------
    az, alt, phi_eman : array_like
        EMAN2 Euler angles in degrees.

    Returns
    -------
    phi, theta, psi : numpy.ndarray
        SPIDER/RELION angles in degrees, ``phi`` and ``psi`` wrapped to (-180, 180].
    """
    return _wrap180(np.asarray(az) - 90.0), np.asarray(alt, dtype=np.float64), _wrap180(np.asarray(phi_eman) + 90.0)


# --------------------------------------------------------------------------------------
# Axis-angle (cryoSPARC alignments3D/pose)
# --------------------------------------------------------------------------------------


def axis_angle_to_matrix(rotvec) -> np.ndarray:
    """Rotation matrices from cryoSPARC axis-angle (Rodrigues) vectors.

    Parameters
    ----------
    rotvec : array_like
        ``(..., 3)`` rotation vectors in radians (cryoSPARC ``alignments3D/pose``).

    Returns
    -------
    numpy.ndarray
        ``(..., 3, 3)`` matrices in the same sense as :func:`euler_to_matrix`
        (cryoSPARC's pose is the RELION matrix, as pyem's ``csparc2star`` reads it).
    """
    from scipy.spatial.transform import Rotation

    v = np.asarray(rotvec, dtype=np.float64)
    flat = v.reshape(-1, 3)
    # scipy builds the active rotation exp([v]x); cryoSPARC's pose is its transpose (pyem: expmap(v).T).
    mats = Rotation.from_rotvec(flat).as_matrix().transpose(0, 2, 1)
    return mats.reshape(v.shape[:-1] + (3, 3))


def matrix_to_axis_angle(matrix) -> np.ndarray:
    """Axis-angle vectors (radians) of rotation matrices; inverse of :func:`axis_angle_to_matrix`.

    Parameters
    ----------
    matrix : array_like
        ``(..., 3, 3)`` rotation matrices.

    Returns
    -------
    numpy.ndarray
        ``(..., 3)`` rotation vectors in radians.
    """
    from scipy.spatial.transform import Rotation

    m = np.asarray(matrix, dtype=np.float64)
    flat = m.reshape(-1, 3, 3).transpose(0, 2, 1)
    return Rotation.from_matrix(flat).as_rotvec().reshape(m.shape[:-2] + (3,))


# --------------------------------------------------------------------------------------
# 2D alignment <-> RELION in-plane parameters
# --------------------------------------------------------------------------------------


def align2d_to_relion(alpha, sx, sy, mirror):
    """Express SPHIRE 2D alignment parameters as RELION 2D pose columns.

    SPHIRE's ``(alpha, sx, sy, mirror)`` map image content ``q`` to the class
    frame ``X = M**m (R(alpha) q + s)``. RELION's 2D model places reference
    point ``X`` at ``q = (A X)[:2] - origin`` with ``A = Rz(psi) Ry(tilt)``.
    A mirror about x is RELION's ``tilt = 180`` (``Ry(180)`` flips x).

    Parameters
    ----------
    alpha : array_like
        In-plane angle in degrees.
    sx, sy : array_like
        Shifts in pixels.
    mirror : array_like
        0 or 1.

    Returns
    -------
    psi, tilt, origin_x, origin_y : numpy.ndarray
        RELION ``rlnAnglePsi`` (degrees), ``rlnAngleTilt`` (0 or 180 degrees),
        and ``rlnOriginX/Y`` in **pixels** (multiply by the pixel size for Å).
    """
    alpha, sx, sy, mirror = np.broadcast_arrays(
        np.asarray(alpha, np.float64), np.asarray(sx, np.float64), np.asarray(sy, np.float64), np.asarray(mirror)
    )
    a = np.deg2rad(alpha)
    c, s = np.cos(a), np.sin(a)
    # Unmirrored: q = R(-a) X - R(-a) s  => psi = -alpha, origin = R(-a) s.
    # Mirrored:   X = M (R(a) q + s) => q = R(-a) (M X) - R(-a) s, and M X = Ry(180) X in the xy-plane,
    #             A = Rz(psi) Ry(180): (A X)_xy = R(psi) M X, so psi = -alpha again and origin = R(-a) s.
    ox = c * sx - s * sy
    oy = s * sx + c * sy
    psi = _wrap180(-alpha)
    tilt = np.where(mirror.astype(bool), 180.0, 0.0)
    return psi, tilt, ox, oy


def relion_to_align2d(psi, tilt, origin_x, origin_y):
    """Inverse of :func:`align2d_to_relion`.

    Parameters
    ----------
    psi, tilt : array_like
        RELION in-plane angle and tilt (0 or 180) in degrees.
    origin_x, origin_y : array_like
        RELION origin in pixels.

    Returns
    -------
    alpha, sx, sy, mirror : numpy.ndarray
        SPHIRE 2D parameters (degrees, pixels, int 0/1).
    """
    psi, tilt, ox, oy = np.broadcast_arrays(*(np.asarray(v, np.float64) for v in (psi, tilt, origin_x, origin_y)))
    alpha = _wrap180(-psi)
    a = np.deg2rad(alpha)
    c, s = np.cos(a), np.sin(a)
    sx = c * ox + s * oy
    sy = -s * ox + c * oy
    mirror = (np.abs(_wrap180(tilt)) > 90.0).astype(np.int64)
    return alpha, sx, sy, mirror


def origin_to_sphire_trans(origin_x_px, origin_y_px):
    """RELION origin (pixels) to the translation SPHIRE stores in ``xform.projection``.

    SPHIRE's projection shift ``s2x`` is RELION's origin (same sign) and
    ``set_params_proj`` stores ``set_trans(-s2x, -s2y)``.

    Parameters
    ----------
    origin_x_px, origin_y_px : array_like
        RELION ``rlnOriginX/YAngst`` divided by the pixel size.

    Returns
    -------
    tx, ty : numpy.ndarray
        The ``Transform`` translation: ``(-origin_x_px, -origin_y_px)``.
    """
    return -np.asarray(origin_x_px, np.float64), -np.asarray(origin_y_px, np.float64)


def sphire_trans_to_origin(tx, ty):
    """Inverse of :func:`origin_to_sphire_trans` (SPHIRE's ``get_params_proj``: ``s2x = -tx``).

    Parameters
    ----------
    tx, ty : array_like
        Translation of an ``xform.projection`` ``Transform`` in pixels.

    Returns
    -------
    origin_x_px, origin_y_px : numpy.ndarray
        RELION origin in pixels.
    """
    return -np.asarray(tx, np.float64), -np.asarray(ty, np.float64)


# --------------------------------------------------------------------------------------
# RELION image names
# --------------------------------------------------------------------------------------

_IMAGE_NAME = re.compile(r"^\s*(\d+)@(.+?)\s*$")


def parse_image_name(name: str) -> tuple[int, str]:
    """Split a RELION ``index@stack`` name into a 0-based index and a path.

    Parameters
    ----------
    name : str
        ``"000123@Particles/stack.mrcs"`` (1-based index) or a bare path (a
        single image, index 0).

    Returns
    -------
    index : int
        0-based image index.
    path : str
        The stack path as written (not resolved).

    Raises
    ------
    ValueError
        If the index is not a positive integer.

    Examples
    --------
    >>> parse_image_name("000002@stack.mrcs")
    (1, 'stack.mrcs')
    """
    m = _IMAGE_NAME.match(name)
    if m is None:
        if "@" in name:
            raise ValueError(f"malformed RELION image name {name!r}")
        return 0, name.strip()
    index = int(m.group(1))
    if index < 1:
        raise ValueError(f"RELION image index must be >= 1 in {name!r}")
    return index - 1, m.group(2)


def format_image_name(index: int, path: str) -> str:
    """Build a RELION ``index@stack`` name from a 0-based index.

    Parameters
    ----------
    index : int
        0-based image index.
    path : str
        Stack path.

    Returns
    -------
    str
        ``"%06d@path"`` with the 1-based index.

    Examples
    --------
    >>> format_image_name(0, "a.mrcs")
    '000001@a.mrcs'
    """
    return f"{int(index) + 1:06d}@{path}"


# --------------------------------------------------------------------------------------
# CTF parametrisations
# --------------------------------------------------------------------------------------


def relion_to_eman_defocus(defocus_u_A, defocus_v_A, defocus_angle_deg):
    """RELION defocus U/V/angle to EMAN2 ``defocus, dfdiff, dfang``.

    Parameters
    ----------
    defocus_u_A, defocus_v_A : array_like
        Defocus along U and V in Å (positive = underfocus).
    defocus_angle_deg : array_like
        Angle from x to the U axis in degrees.

    Returns
    -------
    defocus_um, dfdiff_um, dfang_deg : numpy.ndarray
        Mean defocus (µm), ``V - U`` (µm) and ``45 - angle`` wrapped to [0, 180).
    """
    u = np.asarray(defocus_u_A, dtype=np.float64)
    v = np.asarray(defocus_v_A, dtype=np.float64)
    defocus = (u + v) / (2.0 * ANGSTROM_PER_MICROMETRE)
    dfdiff = (v - u) / ANGSTROM_PER_MICROMETRE
    dfang = np.mod(45.0 - np.asarray(defocus_angle_deg, dtype=np.float64), 180.0)
    return defocus, dfdiff, dfang


def eman_to_relion_defocus(defocus_um, dfdiff_um, dfang_deg):
    """EMAN2 ``defocus, dfdiff, dfang`` to RELION defocus U/V/angle; inverse of :func:`relion_to_eman_defocus`.

    Parameters
    ----------
    defocus_um : array_like
        Mean defocus in µm.
    dfdiff_um : array_like
        Astigmatism amplitude ``V - U`` in µm.
    dfang_deg : array_like
        EMAN2 astigmatism angle in degrees.

    Returns
    -------
    defocus_u_A, defocus_v_A, defocus_angle_deg : numpy.ndarray
        Å, Å and degrees wrapped to [0, 180).
    """
    d = np.asarray(defocus_um, dtype=np.float64) * ANGSTROM_PER_MICROMETRE
    half = np.asarray(dfdiff_um, dtype=np.float64) * ANGSTROM_PER_MICROMETRE / 2.0
    angle = np.mod(45.0 - np.asarray(dfang_deg, dtype=np.float64), 180.0)
    return d - half, d + half, angle


def ampcont_percent_to_fraction(percent):
    """EMAN2 amplitude contrast in percent to a fraction (10 -> 0.1)."""
    return np.asarray(percent, dtype=np.float64) / 100.0


def ampcont_fraction_to_percent(fraction):
    """Amplitude contrast fraction to EMAN2 percent (0.1 -> 10)."""
    return np.asarray(fraction, dtype=np.float64) * 100.0


def format_eman2_ctf(*, defocus_um, dfdiff_um, dfang_deg, bfactor_A2, ampcont_percent, voltage_kV, cs_mm, apix_A) -> str:
    """Serialise one CTF as EMAN2's ``EMAN2Ctf`` string (the HDF ``EMAN.ctf`` attribute).

    The layout is ``"E<defocus> <dfdiff> <dfang> <bfactor> <ampcont> <voltage> <cs>
    <apix> <dsbg> <nbg>[,bg...] <nsnr>[,snr...]"`` as EMAN2's ``from_string``
    parses it; written with 8 significant digits (EMAN2 writes 4) so round
    trips are lossless to float32 precision. No background or SNR curves.

    Parameters
    ----------
    defocus_um, dfdiff_um, dfang_deg, bfactor_A2, ampcont_percent, voltage_kV, cs_mm, apix_A : float
        EMAN2 CTF fields with the units in their names.

    Returns
    -------
    str
        The CTF string.
    """
    values = (defocus_um, dfdiff_um, dfang_deg, bfactor_A2, ampcont_percent, voltage_kV, cs_mm, apix_A)
    return "E" + " ".join(f"{float(v):.8g}" for v in values) + " -1 0 0"


def parse_eman2_ctf(text: str) -> dict[str, float]:
    """Parse an ``EMAN2Ctf`` string into a dict of its fields.

    Parameters
    ----------
    text : str
        ``"E<defocus> <dfdiff> <dfang> <bfactor> <ampcont> <voltage> <cs> <apix> ..."``.

    Returns
    -------
    dict
        Keys ``defocus_um, dfdiff_um, dfang_deg, bfactor_A2, ampcont_percent,
        voltage_kV, cs_mm, apix_A``.

    Raises
    ------
    ValueError
        If the string does not start with ``E`` or has fewer than 8 numbers.
    """
    text = text.strip()
    if not text.startswith("E"):
        raise ValueError(f"not an EMAN2Ctf string: {text[:40]!r}")
    fields = text[1:].replace(",", " ").split()
    if len(fields) < 8:
        raise ValueError(f"EMAN2Ctf string has {len(fields)} numbers, needs at least 8: {text[:60]!r}")
    keys = ("defocus_um", "dfdiff_um", "dfang_deg", "bfactor_A2", "ampcont_percent", "voltage_kV", "cs_mm", "apix_A")
    return {k: float(f) for k, f in zip(keys, fields[:8])}


def electron_wavelength_A(voltage_kV):
    """Relativistic electron wavelength in Å.

    Parameters
    ----------
    voltage_kV : array_like
        Acceleration voltage in kV.

    Returns
    -------
    numpy.ndarray
        ``12.2643 / sqrt(V (1 + 0.978466e-6 V))`` with V in volts (RELION's formula).
    """
    v = np.asarray(voltage_kV, dtype=np.float64) * 1e3
    return 12.2642598 / np.sqrt(v * (1.0 + v * 0.978466e-6))
