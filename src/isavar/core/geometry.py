"""Angular geometry: point-group symmetries, random rotations, sphere sampling, angular neighbours.

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
from scipy.spatial import cKDTree

from isavar.conventions import euler_to_matrix

__all__ = [
    "parse_symmetry",
    "symmetry_angles",
    "symmetry_matrices",
    "symmetry_expand",
    "random_rotations",
    "fibonacci_directions",
    "viewing_directions",
    "angular_neighbours",
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


def angular_neighbours(
    directions,
    k: int,
    *,
    symmetry: str = "c1",
    antipodal: bool = True,
    return_symmetry: bool = False,
    chunk_size: int | None = None,
):
    """Exact ``k`` nearest neighbours on the sphere, under a point group and antipodal folding.

    The distance from ``i`` to ``j`` is the smallest angle between ``u_i`` and any of
    ``S_g^T u_j`` (the direction of the expanded orientation ``A_j @ S_g``) and, with
    ``antipodal``, ``-S_g^T u_j`` (an antipodal view is the mirror image of the projection).
    Candidates come from a KD-tree on the unit vectors (chord distance is monotonic in
    angle) queried with every symmetry image of each query point; the union of those
    candidate lists provably contains the exact neighbours.

    Parameters
    ----------
    directions : array_like
        ``(n, 3)`` viewing directions (normalised here).
    k : int
        Neighbours per point, ``1 <= k <= n``.
    symmetry : str, optional
        Point group (default ``"c1"``).
    antipodal : bool, optional
        Also match through antipodes (default True).
    return_symmetry : bool, optional
        Also return the index ``g`` of the matched group element.
    chunk_size : int, optional
        Query points per chunk (bounds memory); chosen automatically by default.

    Returns
    -------
    indices : numpy.ndarray
        ``(n, k)`` int64; row ``i`` starts with ``i`` itself, then neighbours sorted by
        (distance, mirrored, index).
    mirrored : numpy.ndarray
        ``(n, k)`` bool, True where the neighbour was matched through its antipode.
    distances : numpy.ndarray
        ``(n, k)`` float64 angles in degrees (0 for the point itself).
    sym_index : numpy.ndarray
        ``(n, k)`` int64 group element ``g``, only when ``return_symmetry``.

    Raises
    ------
    ValueError
        If ``k`` is not in ``[1, n]`` or ``directions`` is not ``(n, 3)``.
    """
    u = np.asarray(directions, dtype=np.float64)
    if u.ndim != 2 or u.shape[1] != 3:
        raise ValueError(f"directions must have shape (n, 3), got {u.shape}")
    n = u.shape[0]
    k = int(k)
    if not 1 <= k <= n:
        raise ValueError(f"k = {k} neighbours requested but there are only {n} directions")
    norms = np.linalg.norm(u, axis=1, keepdims=True)
    if np.any(norms == 0) or not np.all(np.isfinite(norms)):
        raise ValueError("directions contain zero-length or non-finite vectors")
    u = u / norms
    sym = symmetry_matrices(symmetry)
    nsym = sym.shape[0]
    signs = (1.0, -1.0) if antipodal else (1.0,)
    tree = cKDTree(u)
    n_images = nsym * len(signs)
    width = n_images * k + 1  # candidates per query point, plus the point itself
    if chunk_size is None:
        chunk_size = max(1, 2_000_000 // width)

    out_idx = np.empty((n, k), dtype=np.int64)
    out_mir = np.empty((n, k), dtype=bool)
    out_dist = np.empty((n, k), dtype=np.float64)
    out_sym = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        c = stop - start
        rows = np.arange(start, stop)
        cand_j = np.empty((c, width), dtype=np.int64)
        cand_d = np.empty((c, width), dtype=np.float64)
        cand_m = np.zeros((c, width), dtype=bool)
        cand_g = np.zeros((c, width), dtype=np.int64)
        cand_j[:, 0] = rows
        cand_d[:, 0] = -1.0  # the point itself always comes first
        col = 1
        for g in range(nsym):
            # (S_g^T u_j) . u_i = u_j . (S_g u_i): query the tree with S_g u_i.
            q = u[start:stop] @ sym[g].T
            for sgn in signs:
                chord, j = tree.query(sgn * q, k=k)
                chord = np.asarray(chord).reshape(c, k)
                j = np.asarray(j).reshape(c, k)
                cand_j[:, col : col + k] = j
                cand_d[:, col : col + k] = 2.0 * np.arcsin(np.clip(chord / 2.0, 0.0, 1.0))
                cand_m[:, col : col + k] = sgn < 0
                cand_g[:, col : col + k] = g
                col += k
        # Order each row by (distance, mirror, index): stable sort by distance after (mirror, index).
        o = np.argsort(cand_m * np.int64(n) + cand_j, axis=1, kind="stable")
        cand_j, cand_d, cand_m, cand_g = (np.take_along_axis(x, o, 1) for x in (cand_j, cand_d, cand_m, cand_g))
        o = np.argsort(cand_d, axis=1, kind="stable")
        cand_j, cand_d, cand_m, cand_g = (np.take_along_axis(x, o, 1) for x in (cand_j, cand_d, cand_m, cand_g))
        # Keep the first (best) occurrence of each neighbour j in its row.
        o = np.argsort(cand_j, axis=1, kind="stable")
        js = np.take_along_axis(cand_j, o, 1)
        first_sorted = np.ones_like(js, dtype=bool)
        first_sorted[:, 1:] = js[:, 1:] != js[:, :-1]
        first = np.empty_like(first_sorted)
        np.put_along_axis(first, o, first_sorted, 1)
        # Every row has at least k distinct candidates (the identity query alone gives k).
        select = first & (np.cumsum(first, axis=1) <= k)
        out_idx[start:stop] = cand_j[select].reshape(c, k)
        out_mir[start:stop] = cand_m[select].reshape(c, k)
        out_dist[start:stop] = np.maximum(cand_d[select], 0.0).reshape(c, k)
        out_sym[start:stop] = cand_g[select].reshape(c, k)
    out_dist = np.degrees(out_dist)
    if return_symmetry:
        return out_idx, out_mir, out_dist, out_sym
    return out_idx, out_mir, out_dist
