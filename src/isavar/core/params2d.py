"""2-D alignment parameters ``(alpha, sx, sy, mirror)``: matrices, composition, inversion.

Convention (spec isac2.md §0.1, SPHIRE ``xform.align2d``)
-------------------------------------------------------
A parameter set ``P = (alpha, t = (sx, sy), m)`` (degrees, pixels, 0/1) is the map

    T_P : q -> M**m (R(alpha) q + t),   R(a) = [[cos a, sin a], [-sin a, cos a]],  M = diag(-1, 1)

on points ``q = (x, y)`` relative to the image centre ``N // 2`` (x = column,
y = row index). Applying ``P`` to an image moves the content at ``q`` to
``T_P(q)`` (:func:`isavar.core.transform2d.transform_images`).

* :func:`compose` ``(P1, P2)`` is "apply P1, then P2" = ``T_P2 o T_P1`` (SPHIRE
  ``combine_params2``). Closed forms: ``m1 = 0``: ``alpha = a1 + a2``,
  ``t = R(a2) t1 + t2``, ``m = m2``; ``m1 = 1``: ``alpha = a1 - a2``,
  ``t = R(-a2) t1 + M t2``, ``m = 1 - m2``.
* :func:`inverse`: ``(a, t, 0)^-1 = (-a, -R(-a) t, 0)``,
  ``(a, t, 1)^-1 = (a, -M R(-a) t, 1)``.
* Angles are returned wrapped to ``(-180, 180]``.

All functions are vectorised: each field is a scalar or an array and fields
broadcast against each other.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from isavar.conventions import wrap_degrees

__all__ = [
    "Params2D",
    "identity",
    "rotation_matrix",
    "to_matrix",
    "from_matrix",
    "compose",
    "inverse",
    "apply_to_points",
    "particle_centre",
]


class Params2D(NamedTuple):
    """One or many 2-D parameter sets; each field is a float or an array (broadcastable).

    Attributes
    ----------
    alpha : array_like
        In-plane angle in degrees.
    sx, sy : array_like
        Shifts in pixels (applied after the rotation).
    mirror : array_like
        0 or 1 (x-mirror applied last).
    """

    alpha: np.ndarray
    sx: np.ndarray
    sy: np.ndarray
    mirror: np.ndarray

    @classmethod
    def from_array(cls, array) -> "Params2D":
        """Build from an ``(..., 4)`` array of rows ``[alpha, sx, sy, mirror]``."""
        a = np.asarray(array, dtype=np.float64)
        if a.shape[-1] != 4:
            raise ValueError(f"expected (..., 4) rows [alpha, sx, sy, mirror], got shape {a.shape}")
        return cls(a[..., 0], a[..., 1], a[..., 2], np.rint(a[..., 3]).astype(np.int64))

    def to_array(self) -> np.ndarray:
        """Return an ``(..., 4)`` float64 array of rows ``[alpha, sx, sy, mirror]``."""
        f = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in self))
        return np.stack(f, axis=-1)


def _fields(p):
    if isinstance(p, np.ndarray):
        raise TypeError("pass Params2D(alpha, sx, sy, mirror) or a 4-tuple; use Params2D.from_array for (n, 4) arrays")
    if len(p) != 4:
        raise ValueError(f"2-D parameters need 4 fields (alpha, sx, sy, mirror), got {len(p)}")
    alpha, sx, sy, mirror = p
    alpha = np.asarray(alpha, dtype=np.float64)
    sx = np.asarray(sx, dtype=np.float64)
    sy = np.asarray(sy, dtype=np.float64)
    mirror = np.asarray(mirror)
    if mirror.dtype.kind == "f":
        mirror = np.rint(mirror)
    mirror = mirror.astype(np.int64)
    if np.any((mirror != 0) & (mirror != 1)):
        raise ValueError("mirror must be 0 or 1")
    return alpha, sx, sy, mirror


def _pack(alpha, sx, sy, mirror) -> Params2D:
    alpha, sx, sy, mirror = np.broadcast_arrays(wrap_degrees(alpha), sx, sy, mirror)
    out = Params2D(alpha.astype(np.float64), sx.astype(np.float64), sy.astype(np.float64), mirror.astype(np.int64))
    if out.alpha.ndim == 0:
        return Params2D(float(out.alpha), float(out.sx), float(out.sy), int(out.mirror))
    return out


def identity(n: int | None = None) -> Params2D:
    """Identity parameters: scalars, or ``n`` copies as arrays."""
    if n is None:
        return Params2D(0.0, 0.0, 0.0, 0)
    return Params2D(np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n, dtype=np.int64))


def rotation_matrix(alpha_deg) -> np.ndarray:
    """``R(alpha) = [[cos a, sin a], [-sin a, cos a]]``, shape ``(..., 2, 2)``, alpha in degrees."""
    a = np.deg2rad(np.asarray(alpha_deg, dtype=np.float64))
    c, s = np.cos(a), np.sin(a)
    return np.stack([np.stack([c, s], -1), np.stack([-s, c], -1)], -2)


def to_matrix(p) -> np.ndarray:
    """2x3 affine matrices ``[L | b]`` with ``T(q) = L q + b``.

    Parameters
    ----------
    p : Params2D or tuple
        ``(alpha, sx, sy, mirror)``, fields broadcast to shape ``(...)``.

    Returns
    -------
    numpy.ndarray
        ``(..., 2, 3)`` float64; ``L = M**m R(alpha)``, ``b = M**m t``.
    """
    alpha, sx, sy, mirror = np.broadcast_arrays(*_fields(p))
    sign = np.where(mirror == 1, -1.0, 1.0)
    rot = rotation_matrix(alpha)
    rot[..., 0, :] *= sign[..., None]
    b = np.stack([sign * sx, sy], -1)
    return np.concatenate([rot, b[..., None]], axis=-1)


def from_matrix(matrix) -> Params2D:
    """Parameters of ``(..., 2, 3)`` matrices built by :func:`to_matrix` (or products of them).

    The mirror flag is ``det(L) < 0``; the angle is ``atan2`` of the unmirrored
    rotation, wrapped to ``(-180, 180]``.
    """
    mat = np.asarray(matrix, dtype=np.float64)
    lin, b = mat[..., :2], mat[..., 2]
    det = lin[..., 0, 0] * lin[..., 1, 1] - lin[..., 0, 1] * lin[..., 1, 0]
    mirror = (det < 0).astype(np.int64)
    sign = np.where(mirror == 1, -1.0, 1.0)
    r00, r01 = sign * lin[..., 0, 0], sign * lin[..., 0, 1]
    alpha = np.rad2deg(np.arctan2(r01, r00))
    return _pack(alpha, sign * b[..., 0], b[..., 1], mirror)


def compose(p1, p2) -> Params2D:
    """Parameters of "apply ``p1``, then ``p2``" (``T_p2 o T_p1``; SPHIRE ``combine_params2``).

    Parameters
    ----------
    p1, p2 : Params2D or tuple
        ``(alpha, sx, sy, mirror)``; all fields broadcast together.

    Returns
    -------
    Params2D
        Scalars if every input field is a scalar, else arrays.

    Examples
    --------
    >>> compose((30.0, 1.0, 0.0, 0), (60.0, 0.0, 0.0, 0)).alpha
    90.0
    """
    a1, x1, y1, m1 = _fields(p1)
    a2, x2, y2, m2 = _fields(p2)
    r2 = np.deg2rad(a2)
    c, s = np.cos(r2), np.sin(r2)
    mir = m1 == 1
    # m1 = 0: t = R(a2) t1 + t2;  m1 = 1: t = R(-a2) t1 + M t2.
    s_eff = np.where(mir, -s, s)
    tx = c * x1 + s_eff * y1 + np.where(mir, -x2, x2)
    ty = -s_eff * x1 + c * y1 + y2
    alpha = np.where(mir, a1 - a2, a1 + a2)
    mirror = np.where(mir, 1 - m2, m2)
    return _pack(alpha, tx, ty, mirror)


def inverse(p) -> Params2D:
    """Inverse parameters: ``compose(p, inverse(p))`` is the identity (SPHIRE ``inverse_transform2``).

    ``(a, t, 0)^-1 = (-a, -R(-a) t, 0)`` and ``(a, t, 1)^-1 = (a, -M R(-a) t, 1)``.
    """
    a, sx, sy, m = _fields(p)
    r = np.deg2rad(a)
    c, s = np.cos(r), np.sin(r)
    # R(-a) t = (c sx - s sy, s sx + c sy)
    ux = c * sx - s * sy
    uy = s * sx + c * sy
    mir = m == 1
    return _pack(np.where(mir, a, -a), np.where(mir, ux, -ux), -uy, m)


def apply_to_points(p, points) -> np.ndarray:
    """Map points ``q`` (relative to the centre) to ``T_p(q)``.

    Parameters
    ----------
    p : Params2D or tuple
        Parameters with fields of shape ``(...)``.
    points : array_like
        ``(..., 2)`` points ``(x, y)`` broadcastable against the parameters.

    Returns
    -------
    numpy.ndarray
        ``(..., 2)`` mapped points.
    """
    mat = to_matrix(p)
    q = np.asarray(points, dtype=np.float64)
    return np.einsum("...ij,...j->...i", mat[..., :2], q) + mat[..., 2]


def particle_centre(p) -> np.ndarray:
    """The point of the raw image that ``p`` maps to the output centre (SPHIRE ``sxi, syi``).

    For ``(alpha, t, m)`` this is ``-R(-alpha) t``, independent of the mirror.
    Returns ``(..., 2)``.
    """
    a, sx, sy, _ = _fields(p)
    r = np.deg2rad(a)
    c, s = np.cos(r), np.sin(r)
    return np.stack(np.broadcast_arrays(-(c * sx - s * sy), -(s * sx + c * sy)), axis=-1)
