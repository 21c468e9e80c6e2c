"""Analytic phantoms: sums of isotropic Gaussian blobs sampled on a cubic grid.

Every phantom is defined in units of the box edge (so the same object fills
the same fraction of a 64- or a 256-voxel box) and is deterministic: the blob
layout comes from a fixed internal seed, never from the caller's generator.
Blob widths are at least :data:`MIN_SIGMA_PX` voxels, so each phantom is
band-limited at the grid's Nyquist frequency (a Gaussian of sigma 1.25 voxels
keeps ``exp(-2 pi^2 sigma^2 / 4) < 5e-4`` of its amplitude there).

Coordinates follow :mod:`isavar.conventions`: volumes are ``(nz, ny, nx)``,
the centre is voxel ``N // 2`` on every axis and positions are given as
``(x, y, z)`` relative to that centre.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

#: Smallest blob standard deviation in voxels (keeps phantoms band-limited).
MIN_SIGMA_PX = 1.25

#: Fixed seed of the blob layouts: phantoms never depend on the caller's randomness. Chosen among 30
#: seeds as the layout least similar to any of its own rotations by more than 30 degrees.
_LAYOUT_SEED = 17

_SYMMETRY_NAME = re.compile(r"^(c|d)(\d+)$|^(tet|oct|icos)$")


@dataclass(frozen=True)
class BlobModel:
    """A density made of isotropic Gaussian blobs, in units of the box edge.

    Attributes
    ----------
    centres : numpy.ndarray
        ``(k, 3)`` blob centres ``(x, y, z)`` relative to the box centre, in
        fractions of the box edge.
    sigmas : numpy.ndarray
        ``(k,)`` standard deviations, fractions of the box edge.
    amplitudes : numpy.ndarray
        ``(k,)`` peak heights (arbitrary density units).
    domains : numpy.ndarray
        ``(k,)`` integer domain label of each blob.
    """

    centres: np.ndarray
    sigmas: np.ndarray
    amplitudes: np.ndarray
    domains: np.ndarray

    def select(self, keep: np.ndarray) -> "BlobModel":
        """Return the model restricted to the blobs where ``keep`` is True."""
        keep = np.asarray(keep, dtype=bool)
        return BlobModel(self.centres[keep], self.sigmas[keep], self.amplitudes[keep], self.domains[keep])

    def render(self, box: int) -> np.ndarray:
        """Sample the model on a ``box``-voxel cube.

        Parameters
        ----------
        box : int
            Edge of the cube in voxels.

        Returns
        -------
        numpy.ndarray
            ``(box, box, box)`` float32 volume, ``(z, y, x)`` axes.
        """
        sigmas_px = np.maximum(self.sigmas * box, MIN_SIGMA_PX)
        return gaussian_blobs_volume(self.centres * box, sigmas_px, self.amplitudes, box)


def gaussian_blobs_volume(centres_px, sigmas_px, amplitudes, box: int) -> np.ndarray:
    """Sum of isotropic 3D Gaussians sampled on a cubic grid.

    Parameters
    ----------
    centres_px : array_like
        ``(k, 3)`` centres ``(x, y, z)`` in voxels, relative to the grid centre ``box // 2``.
    sigmas_px : array_like
        ``(k,)`` standard deviations in voxels (> 0).
    amplitudes : array_like
        ``(k,)`` peak heights.
    box : int
        Edge of the cube in voxels.

    Returns
    -------
    numpy.ndarray
        ``(box, box, box)`` float32 volume with axes ``(z, y, x)``; voxel
        ``[z, y, x]`` holds ``sum_k a_k exp(-|p - c_k|^2 / (2 s_k^2))`` with
        ``p = (x, y, z) - box // 2``.

    Examples
    --------
    >>> v = gaussian_blobs_volume([[3.0, 0.0, 0.0]], [1.5], [1.0], 16)
    >>> [int(i) for i in np.unravel_index(np.argmax(v), v.shape)]
    [8, 8, 11]
    """
    centres = np.atleast_2d(np.asarray(centres_px, dtype=np.float64))
    sigmas = np.broadcast_to(np.asarray(sigmas_px, dtype=np.float64), (centres.shape[0],))
    amps = np.broadcast_to(np.asarray(amplitudes, dtype=np.float64), (centres.shape[0],))
    if centres.shape[1] != 3:
        raise ValueError(f"centres must have shape (k, 3), got {centres.shape}")
    if np.any(sigmas <= 0):
        raise ValueError("blob sigmas must be positive")
    box = _check_box(box)
    grid = np.arange(box, dtype=np.float64) - box // 2
    volume = np.zeros((box, box, box), dtype=np.float64)
    for (cx, cy, cz), s, a in zip(centres, sigmas, amps):
        gx = np.exp(-0.5 * ((grid - cx) / s) ** 2)
        gy = np.exp(-0.5 * ((grid - cy) / s) ** 2)
        gz = np.exp(-0.5 * ((grid - cz) / s) ** 2)
        volume += a * gz[:, None, None] * (gy[:, None] * gx[None, :])[None, :, :]
    return volume.astype(np.float32)


def _check_box(box) -> int:
    if int(box) != box or int(box) < 8:
        raise ValueError(f"box must be an integer >= 8, got {box!r}")
    return int(box)


def _cluster(rng, centre, spread, count, sigma_range, amp_range, domain):
    """Blobs scattered anisotropically around ``centre`` (box fractions)."""
    axes = np.asarray(spread, dtype=np.float64) * np.ones(3)
    centres = np.asarray(centre, dtype=np.float64) + rng.standard_normal((count, 3)) * axes
    sigmas = rng.uniform(*sigma_range, size=count)
    amps = rng.uniform(*amp_range, size=count)
    return centres, sigmas, amps, np.full(count, domain, dtype=np.int64)


def _combine(parts) -> BlobModel:
    c, s, a, d = (np.concatenate(x) for x in zip(*parts))
    return BlobModel(c, s, a, d)


#: Domain label of the compact domain that state B of ``two_state`` lacks.
SWITCHABLE_DOMAIN = 3


def blob_model() -> BlobModel:
    """The asymmetric protein-like blob model behind the ``"blob"`` and ``"two_state"`` phantoms.

    Four domains of different sizes sit at asymmetric positions (no rotation
    other than the identity maps the layout onto itself), joined by a short
    tail of small blobs; domain :data:`SWITCHABLE_DOMAIN` is a compact
    peripheral domain of five blobs. The amplitude-weighted centre of mass of
    the whole model (the integral of a blob is proportional to ``a s^3``) is
    at the box centre, and every blob centre lies within 0.32 box of it.

    Returns
    -------
    BlobModel
        36 blobs in box-fraction units.
    """
    rng = np.random.default_rng(_LAYOUT_SEED)
    parts = [
        _cluster(rng, (0.0, 0.0, 0.0), (0.10, 0.06, 0.045), 12, (0.035, 0.06), (0.6, 1.0), 0),
        _cluster(rng, (0.19, -0.09, 0.06), (0.03, 0.07, 0.04), 8, (0.03, 0.05), (0.5, 0.9), 1),
        _cluster(rng, (-0.16, -0.10, -0.11), (0.05, 0.03, 0.03), 7, (0.03, 0.045), (0.5, 0.9), 2),
        _cluster(rng, (-0.07, 0.21, 0.13), (0.025, 0.025, 0.025), 5, (0.03, 0.04), (0.8, 1.0), SWITCHABLE_DOMAIN),
    ]
    tail = np.array([[0.22, 0.02, -0.05], [0.25, 0.08, -0.11], [0.22, 0.15, -0.16], [0.15, 0.19, -0.21]])
    parts.append((tail, np.full(4, 0.028), np.array([0.7, 0.6, 0.55, 0.5]), np.full(4, 4, dtype=np.int64)))
    model = _combine(parts)
    return _recentre(model)


def _recentre(model: BlobModel, *, limit: float = 0.32) -> BlobModel:
    weight = model.amplitudes * model.sigmas**3
    com = (model.centres * weight[:, None]).sum(0) / weight.sum()
    centres = model.centres - com
    radius = np.linalg.norm(centres, axis=1)
    # Pull in any stray blob so that the object stays inside its sphere (deterministic, rarely needed).
    scale = np.where(radius > limit, limit / np.maximum(radius, 1e-12), 1.0)
    return BlobModel(centres * scale[:, None], model.sigmas, model.amplitudes, model.domains)


def symmetric_blob_model(symmetry: str) -> BlobModel:
    """A blob object with point-group symmetry ``symmetry``.

    For ``c<n>`` an asymmetric unit of eight blobs at about 0.17 box from the
    z axis is repeated by rotations about z, and two blobs of different size on
    the axis (at z = +0.12 and z = -0.06) make the top and bottom differ (no
    dihedral pseudo-symmetry). Other groups (``d<n>``, ``tet``, ``oct``,
    ``icos``) repeat a unit at a general position by
    :func:`isavar.core.geometry.symmetry_matrices` around a central blob.

    Parameters
    ----------
    symmetry : str
        Point group, e.g. ``"c4"``, ``"d2"``, ``"icos"`` (case-insensitive).

    Returns
    -------
    BlobModel
        The symmetric model; invariant under every matrix ``S`` of the group
        (each blob centre ``c`` has a partner at ``S c`` with the same size).
    """
    sym = symmetry.strip().lower()
    m = _SYMMETRY_NAME.match(sym)
    if m is None:
        raise ValueError(f"unknown symmetry {symmetry!r} (expected c<n>, d<n>, tet, oct or icos)")
    rng = np.random.default_rng(_LAYOUT_SEED + 1)
    if m.group(1) == "c":
        order = int(m.group(2))
        if order < 1:
            raise ValueError(f"symmetry order must be >= 1 in {symmetry!r}")
        unit = _cluster(rng, (0.17, 0.03, 0.02), (0.04, 0.025, 0.06), 8, (0.03, 0.045), (0.5, 1.0), 1)
        angles = 2.0 * np.pi * np.arange(order) / order
        c, s = np.cos(angles), np.sin(angles)
        # Rotations about z, the symmetry axis of c<n> in RELION and SPHIRE.
        mats = np.zeros((order, 3, 3))
        mats[:, 0, 0], mats[:, 0, 1], mats[:, 1, 0], mats[:, 1, 1], mats[:, 2, 2] = c, -s, s, c, 1.0
        axis = (np.array([[0.0, 0.0, 0.12], [0.0, 0.0, -0.06]]), np.array([0.055, 0.035]),
                np.array([0.45, 0.35]), np.zeros(2, dtype=np.int64))
    else:
        from isavar.core.geometry import symmetry_matrices

        mats = np.asarray(symmetry_matrices(sym), dtype=np.float64)
        unit = _cluster(rng, (0.16, 0.06, 0.09), (0.035, 0.025, 0.03), 5, (0.03, 0.04), (0.5, 1.0), 1)
        axis = (np.zeros((1, 3)), np.array([0.05]), np.array([0.5]), np.zeros(1, dtype=np.int64))
    centres, sigmas, amps, domains = unit
    parts = [axis]
    for k, mat in enumerate(mats):
        parts.append((centres @ mat.T, sigmas, amps, domains + k))
    return _combine(parts)


def phantom_names() -> tuple[str, ...]:
    """Names accepted by :func:`phantom_volume` (``c<n>``/``d<n>`` stand for any order)."""
    return ("blob", "two_state", "c<n>", "d<n>", "tet", "oct", "icos")


def is_symmetric_phantom(name: str) -> bool:
    """True if ``name`` is a point-group phantom (``c4``, ``d2``, ``icos``, ...)."""
    return _SYMMETRY_NAME.match(str(name).strip().lower()) is not None


def phantom_volume(name: str, box: int, pixel_size_A: float = 1.0):
    """A deterministic synthetic density.

    Parameters
    ----------
    name : str
        ``"blob"``: asymmetric protein-like density (36 Gaussian blobs in four
        domains and a tail, inside a sphere of radius about 0.35 box; distinct
        views look distinct). ``"two_state"``: the pair ``(A, B)`` where A is
        ``"blob"`` and B lacks its compact domain :data:`SWITCHABLE_DOMAIN`
        (so ``A - B >= 0`` is that domain alone; both share one frame and scale).
        ``"c<n>"``, ``"d<n>"``, ``"tet"``, ``"oct"``, ``"icos"``: a blob object
        with that point-group symmetry (see :func:`symmetric_blob_model`).
    box : int
        Edge of the cube in voxels (>= 8).
    pixel_size_A : float
        Voxel size in Å. The phantom is defined relative to the box, so this
        does not change the array; it is checked (> 0) and kept by callers
        that write the map.

    Returns
    -------
    numpy.ndarray or tuple of numpy.ndarray
        ``(box, box, box)`` float32 volume(s), axes ``(z, y, x)``, maximum 1
        (for ``two_state`` the common scale makes A's maximum 1).

    Examples
    --------
    >>> v = phantom_volume("blob", 32, 2.0)
    >>> v.shape, v.dtype, float(v.max())
    ((32, 32, 32), dtype('float32'), 1.0)
    >>> a, b = phantom_volume("two_state", 32, 2.0)
    >>> bool((a - b).min() >= 0)
    True
    """
    if not pixel_size_A > 0:
        raise ValueError(f"pixel_size_A must be positive, got {pixel_size_A!r}")
    box = _check_box(box)
    key = str(name).strip().lower()
    if key == "blob":
        return _normalised(blob_model().render(box))
    if key in ("two_state", "two-state"):
        model = blob_model()
        state_a = model.render(box)
        state_b = model.select(model.domains != SWITCHABLE_DOMAIN).render(box)
        peak = state_a.max()
        return _normalised(state_a, peak), _normalised(state_b, peak)
    if is_symmetric_phantom(key):
        return _normalised(symmetric_blob_model(key).render(box))
    raise ValueError(f"unknown phantom {name!r}; choose from {', '.join(phantom_names())}")


def _normalised(volume: np.ndarray, peak=None) -> np.ndarray:
    """Divide by ``peak`` (default the volume's maximum), float32."""
    return (volume / (volume.max() if peak is None else peak)).astype(np.float32)
