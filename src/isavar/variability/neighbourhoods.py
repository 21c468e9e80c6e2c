"""Angular neighbourhoods: each particle and its ``G - 1`` nearest projection directions.

Spec §3.4 (recommended exact variant). The distance between two projection
directions u, v is ``arccos |u . v|``: an antipodal view is the mirror image of
the projection, so it counts as close and is used *mirrored*. With a point
group, every particle contributes one direction per group element (its
orientation ``A @ S_k``), so neighbours are drawn from all symmetry copies while
only the identity copies are group centres.

The search is exact: a KD-tree over the expanded unit vectors is queried at
``u`` and at ``-u`` (k = G each); the G nearest under the folded distance are
necessarily among the union (a point ranked within the G nearest under
``min(|v - u|, |v + u|)`` has fewer than G points closer to whichever of
``+-u`` realises its minimum). The centre is always member 0, unmirrored; ties
are broken by (distance, mirror, index).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree


@dataclass(frozen=True)
class Groups:
    """Group membership for a set of centres.

    Attributes
    ----------
    centres : numpy.ndarray
        ``(B,)`` int64 particle row of each group centre.
    members : numpy.ndarray
        ``(B, G)`` int64 particle row of each member (member 0 = the centre).
    sym_ops : numpy.ndarray
        ``(B, G)`` int64 symmetry element of each member copy (0 = identity).
    mirror : numpy.ndarray
        ``(B, G)`` bool, True if the member is an antipodal view used mirrored.
    angle_deg : numpy.ndarray
        ``(B, G)`` float64 folded angular distance to the centre direction, degrees.
    """

    centres: np.ndarray
    members: np.ndarray
    sym_ops: np.ndarray
    mirror: np.ndarray
    angle_deg: np.ndarray

    def __len__(self) -> int:
        return int(self.centres.size)

    def subset(self, rows) -> "Groups":
        """Groups ``rows`` only."""
        return Groups(self.centres[rows], self.members[rows], self.sym_ops[rows], self.mirror[rows],
                      self.angle_deg[rows])


def expanded_directions(rotations: np.ndarray, sym_matrices: np.ndarray) -> np.ndarray:
    """Viewing directions of every (particle, symmetry element) pair.

    Parameters
    ----------
    rotations : numpy.ndarray
        ``(N, 3, 3)`` particle matrices ``A`` (conventions.euler_to_matrix).
    sym_matrices : numpy.ndarray
        ``(nsym, 3, 3)`` point-group matrices, identity first.

    Returns
    -------
    numpy.ndarray
        ``(N * nsym, 3)`` unit vectors; row ``j * nsym + k`` is the third row of
        ``A_j @ S_k`` (particle j seen under symmetry element k).
    """
    d = np.asarray(rotations, np.float64)[:, 2, :]
    out = np.einsum("nj,kji->nki", d, np.asarray(sym_matrices, np.float64))
    return out.reshape(-1, 3)


class NeighbourSearch:
    """Exact folded-angle k-nearest-neighbour search over symmetry-expanded directions.

    Parameters
    ----------
    rotations : numpy.ndarray
        ``(N, 3, 3)`` particle matrices.
    sym_matrices : numpy.ndarray
        ``(nsym, 3, 3)`` point-group matrices with the identity first.
    """

    def __init__(self, rotations: np.ndarray, sym_matrices: np.ndarray):
        self.n_particles = int(np.asarray(rotations).shape[0])
        self.nsym = int(np.asarray(sym_matrices).shape[0])
        self.points = expanded_directions(rotations, sym_matrices)
        self._tree = cKDTree(self.points)

    def groups(self, centres, group_size: int) -> Groups:
        """Groups of ``group_size`` members around each centre particle.

        Parameters
        ----------
        centres : array_like of int
            ``(B,)`` particle rows used as centres (their identity copy).
        group_size : int
            G, including the centre; at most ``N * nsym``.

        Returns
        -------
        Groups
        """
        centres = np.asarray(centres, np.int64).reshape(-1)
        total = self.points.shape[0]
        g = int(group_size)
        if g > total:
            raise ValueError(f"group size {g} exceeds the {total} available (expanded) images")
        b = centres.size
        if b == 0:
            e = np.zeros((0, g), np.int64)
            return Groups(centres, e, e.copy(), e.astype(bool), e.astype(np.float64))
        u = self.points[centres * self.nsym]
        k = min(g, total)
        dp, ip = self._tree.query(u, k=k)
        dm, im = self._tree.query(-u, k=k)
        dp, ip, dm, im = (np.asarray(a).reshape(b, k) for a in (dp, ip, dm, im))
        own = (centres * self.nsym)[:, None]
        idx = np.concatenate([own, ip, im], axis=1)
        chord = np.concatenate([np.full((b, 1), -1.0), dp, dm], axis=1)
        mir = np.concatenate([np.zeros((b, 1 + k), bool), np.ones((b, k), bool)], axis=1)
        # Deduplicate each row's candidates keeping the nearest (then unmirrored) entry.
        rows = np.repeat(np.arange(b), idx.shape[1])
        order = np.lexsort((mir.ravel(), chord.ravel(), idx.ravel(), rows))
        r_s, i_s = rows[order], idx.ravel()[order]
        dup = np.zeros(order.size, bool)
        dup[1:] = (r_s[1:] == r_s[:-1]) & (i_s[1:] == i_s[:-1])
        chord_flat = chord.ravel().copy()
        chord_flat[order[dup]] = np.inf
        chord = chord_flat.reshape(b, -1)
        # Rank by (distance, mirror, index) and keep G.
        order = np.lexsort((idx, mir, chord), axis=1)[:, :g]
        sel_idx = np.take_along_axis(idx, order, 1)
        sel_chord = np.take_along_axis(chord, order, 1)
        sel_mir = np.take_along_axis(mir, order, 1)
        angle = np.degrees(2.0 * np.arcsin(np.clip(np.maximum(sel_chord, 0.0) / 2.0, 0.0, 1.0)))
        return Groups(centres, sel_idx // self.nsym, sel_idx % self.nsym, sel_mir, angle)


def brute_force_groups(rotations, sym_matrices, centres, group_size) -> Groups:
    """Reference O(B * N * nsym) search with the same tie-breaking (for tests and small sets).

    Parameters
    ----------
    rotations, sym_matrices, centres, group_size
        As for :class:`NeighbourSearch`.

    Returns
    -------
    Groups
    """
    pts = expanded_directions(rotations, sym_matrices)
    nsym = np.asarray(sym_matrices).shape[0]
    centres = np.asarray(centres, np.int64).reshape(-1)
    u = pts[centres * nsym]
    dot = np.clip(u @ pts.T, -1.0, 1.0)
    chord_p = np.sqrt(np.maximum(2.0 - 2.0 * dot, 0.0))
    chord_m = np.sqrt(np.maximum(2.0 + 2.0 * dot, 0.0))
    mir = chord_m < chord_p
    chord = np.where(mir, chord_m, chord_p)
    chord[np.arange(centres.size), centres * nsym] = -1.0
    mir[np.arange(centres.size), centres * nsym] = False
    idx = np.broadcast_to(np.arange(pts.shape[0]), chord.shape)
    order = np.lexsort((idx, mir, chord), axis=1)[:, :group_size]
    sel = np.take_along_axis(idx, order, 1)
    ang = np.degrees(2.0 * np.arcsin(np.clip(np.maximum(np.take_along_axis(chord, order, 1), 0) / 2, 0, 1)))
    return Groups(centres, sel // nsym, sel % nsym, np.take_along_axis(mir, order, 1), ang)


def centre_order(rotations: np.ndarray, chunk_size: int) -> np.ndarray:
    """Order particles so that consecutive chunks of centres are compact patches of directions.

    Directions are folded to the upper hemisphere (antipodes are neighbours) and
    swept in tilt bands about as wide as one chunk's patch, alternating the
    azimuth direction (boustrophedon); consecutive centres then share most of
    their neighbours, so each chunk reads and preprocesses few distinct images.

    Parameters
    ----------
    rotations : numpy.ndarray
        ``(N, 3, 3)`` particle matrices.
    chunk_size : int
        Centres per chunk.

    Returns
    -------
    numpy.ndarray
        ``(N,)`` int64 permutation of the particle rows.
    """
    d = np.asarray(rotations, np.float64)[:, 2, :].copy()
    d[d[:, 2] < 0] *= -1.0
    n = d.shape[0]
    tilt = np.degrees(np.arccos(np.clip(d[:, 2], -1.0, 1.0)))
    phi = np.degrees(np.arctan2(d[:, 1], d[:, 0])) % 360.0
    patch = np.degrees(np.sqrt(2.0 * np.pi * max(chunk_size, 1) / max(n, 1)))
    width = float(np.clip(patch, 1.0, 90.0))
    band = np.floor(tilt / width).astype(np.int64)
    sweep = np.where(band % 2 == 0, phi, 360.0 - phi)
    return np.lexsort((np.arange(n), sweep, band)).astype(np.int64)
