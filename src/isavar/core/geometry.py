"""Angular geometry: point-group symmetries, random rotations, sphere sampling.

Neighbour searches over viewing directions are in :mod:`isavar.variability.neighbourhoods`.

All rotation matrices follow :mod:`isavar.conventions`: ``A = euler_to_matrix(rot, tilt, psi)``
maps a volume point ``X`` (relative to the centre) to the image position ``(A @ X)[:2]``,
and the viewing direction of ``A`` in volume coordinates is its third row ``A[2, :]``.

Symmetry groups are SPHIRE's ``symclass(sym).symangles`` lists (SPIDER/RELION Euler
triples, identity first) turned into matrices with :func:`isavar.conventions.euler_to_matrix`.
A volume ``V`` has symmetry ``sym`` when ``V(S @ X) = V(X)`` for every group element ``S``.
"""

from __future__ import annotations

import re

import numpy as np

from isavar.conventions import euler_to_matrix

__all__ = [
    "parse_symmetry",
    "symmetry_angles",
    "symmetry_matrices",
    "symmetry_expand",
    "random_rotations",
    "fibonacci_directions",
    "viewing_directions",
]

_SYM_RE = re.compile(r"^\s*([cd])\s*(\d+)\s*$", re.IGNORECASE)


def parse_symmetry(sym: str) -> tuple[str, int]:
    """Parse a point-group name.

    Parameters
    ----------
    sym : str
        ``"c<n>"``, ``"d<n>"`` (n >= 1), ``"tet"``, ``"oct"`` or ``"icos"`` (case-insensitive).

    Returns
    -------
    kind : str
        ``"c"``, ``"d"``, ``"tet"``, ``"oct"`` or ``"icos"``.
    order : int
        Number of group elements (``n``, ``2n``, 12, 24, 60).

    Raises
    ------
    ValueError
        For an unknown name or ``n < 1``.
    """
    if not isinstance(sym, str):
        raise ValueError(f"symmetry must be a string such as 'c1', 'd3', 'icos', got {sym!r}")
    s = sym.strip().lower()
    for name, order in (("tet", 12), ("oct", 24), ("icos", 60)):
        if s == name:
            return name, order
    m = _SYM_RE.match(s)
    if m is None:
        raise ValueError(f"unknown symmetry {sym!r} (expected c<n>, d<n>, tet, oct or icos)")
    n = int(m.group(2))
    if n < 1:
        raise ValueError(f"symmetry {sym!r}: the order n must be at least 1")
    kind = m.group(1)
    return kind, (n if kind == "c" else 2 * n)


def symmetry_angles(sym: str) -> np.ndarray:
    """SPHIRE's list of symmetry elements as SPIDER Euler triples (identity first).

    Parameters
    ----------
    sym : str
        Point-group name, see :func:`parse_symmetry`.

    Returns
    -------
    numpy.ndarray
        ``(nsym, 3)`` float64 ``(phi, theta, psi)`` = RELION ``(rot, tilt, psi)`` in degrees,
        in the order of SPHIRE 1.4.2 ``sp_fundamentals.symclass(sym).symangles``.
    """
    kind, order = parse_symmetry(sym)
    angles: list[tuple[float, float, float]] = []
    if kind == "c":
        angles = [(0.0, 0.0, 360.0 * i / order) for i in range(order)]
    elif kind == "d":
        n = order // 2
        angles = [(0.0, 0.0, 360.0 * i / n) for i in range(n)]
        angles += [(0.0, 180.0, (360.0 * i / n + 180.0 * (n % 2)) % 360.0) for i in reversed(range(n))]
    elif kind == "tet":
        level = float(np.degrees(np.arccos(-1.0 / 3.0)))  # three faces at this angle
        angles = [(0.0, 0.0, 0.0), (0.0, 0.0, 120.0), (0.0, 0.0, 240.0)]
        angles += [(float(a), level, float(b)) for a in range(0, 241, 120) for b in range(60, 301, 120)]
    elif kind == "oct":
        angles = [(0.0, 0.0, float(i)) for i in range(0, 271, 90)]
        angles += [(float(j), 90.0, float(i)) for i in range(0, 271, 90) for j in range(0, 271, 90)]
        angles += [(0.0, 180.0, float(i)) for i in range(0, 271, 90)]
    else:  # icos
        level1 = float(np.degrees(np.arctan(2.0)))  # five pentagon centres at this height
        level2 = 180.0 - level1
        angles = [(0.0, 0.0, float(i)) for i in range(0, 289, 72)]
        angles += [(float(a), level1, float(b)) for a in range(0, 289, 72) for b in range(36, 325, 72)]
        angles += [(float(a), level2, float(b)) for a in range(36, 325, 72) for b in range(0, 289, 72)]
        angles += [(0.0, 180.0, float(i)) for i in range(0, 289, 72)]
    out = np.asarray(angles, dtype=np.float64)
    if out.shape[0] != order:  # pragma: no cover - guards the tables above
        raise RuntimeError(f"internal error: {sym} has {out.shape[0]} elements, expected {order}")
    return out


def symmetry_matrices(sym: str) -> np.ndarray:
    """Rotation matrices of a point group, identity first.

    Parameters
    ----------
    sym : str
        ``"c<n>"``, ``"d<n>"``, ``"tet"``, ``"oct"`` or ``"icos"``.

    Returns
    -------
    numpy.ndarray
        ``(nsym, 3, 3)`` float64 matrices ``euler_to_matrix(*symmetry_angles(sym).T)``, cleaned
        of round-off (entries within 1e-12 of 0 or +-1 are snapped). The set is a closed group.
    """
    ang = symmetry_angles(sym)
    mats = euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])
    for target in (0.0, 1.0, -1.0):
        mats = np.where(np.abs(mats - target) < 1e-12, target, mats)
    return mats


def symmetry_expand(rotations, sym: str) -> np.ndarray:
    """Symmetry-expand orientations: every particle times every group element.

    For a volume with ``V(S X) = V(X)`` the image model ``p = (A X)[:2]`` gives the same
    projection for ``A`` and ``A @ S`` (substitute ``X = S^T Y``), so each copy is an equally
    valid orientation of the same image. This is SPHIRE's ``--symmetrize``
    (``xform.projection = qt[i] * ts[k]``, origin unchanged).

    Parameters
    ----------
    rotations : array_like
        ``(n, 3, 3)`` matrices ``A``.
    sym : str
        Point-group name.

    Returns
    -------
    numpy.ndarray
        ``(nsym * n, 3, 3)`` float64, element-major: ``out[g * n + i] = A_i @ S_g``. The first
        block (``g = 0``, identity) is the original set; particle ``= idx % n``, element
        ``= idx // n``.
    """
    a = np.asarray(rotations, dtype=np.float64)
    if a.ndim != 3 or a.shape[1:] != (3, 3):
        raise ValueError(f"rotations must have shape (n, 3, 3), got {a.shape}")
    s = symmetry_matrices(sym)
    return np.einsum("nij,gjk->gnik", a, s).reshape(-1, 3, 3)


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """Rotation matrices drawn uniformly (Haar measure) from SO(3).

    Parameters
    ----------
    n : int
        Number of rotations.
    rng : numpy.random.Generator
        Source of randomness.

    Returns
    -------
    numpy.ndarray
        ``(n, 3, 3)`` float64 proper rotations (from normalised 4D Gaussian quaternions).
    """
    q = rng.standard_normal((int(n), 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    m = np.empty((int(n), 3, 3))
    m[:, 0, 0] = 1 - 2 * (y * y + z * z)
    m[:, 0, 1] = 2 * (x * y - z * w)
    m[:, 0, 2] = 2 * (x * z + y * w)
    m[:, 1, 0] = 2 * (x * y + z * w)
    m[:, 1, 1] = 1 - 2 * (x * x + z * z)
    m[:, 1, 2] = 2 * (y * z - x * w)
    m[:, 2, 0] = 2 * (x * z - y * w)
    m[:, 2, 1] = 2 * (y * z + x * w)
    m[:, 2, 2] = 1 - 2 * (x * x + y * y)
    return m


def fibonacci_directions(n: int) -> np.ndarray:
    """Nearly uniform unit vectors on the sphere (Fibonacci lattice).

    Parameters
    ----------
    n : int
        Number of directions (>= 1).

    Returns
    -------
    numpy.ndarray
        ``(n, 3)`` float64 unit vectors ``(x, y, z)``; ``z = 1 - (2i + 1)/n``, azimuth
        ``i`` times the golden angle.
    """
    i = np.arange(int(n), dtype=np.float64)
    z = 1.0 - (2.0 * i + 1.0) / n
    r = np.sqrt(np.clip(1.0 - z * z, 0.0, None))
    phi = i * np.pi * (3.0 - np.sqrt(5.0))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


def viewing_directions(rotations) -> np.ndarray:
    """Viewing directions (third rows) of rotation matrices.

    Parameters
    ----------
    rotations : array_like
        ``(..., 3, 3)`` matrices ``A``.

    Returns
    -------
    numpy.ndarray
        ``(..., 3)`` unit vectors in volume coordinates.
    """
    return np.array(np.asarray(rotations, dtype=np.float64)[..., 2, :])
