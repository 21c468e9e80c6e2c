"""Real-space masks: hard and soft circles, rotated rectangles (filaments).

All masks are float32 ``(ny, nx)`` arrays centred on pixel ``(ny // 2, nx // 2)``;
x is the column index, y the row index, distances in pixels.
"""

from __future__ import annotations

import numpy as np

__all__ = ["circular_mask", "rectangle_mask", "radius_grid"]


def _shape2(size) -> tuple[int, int]:
    if np.ndim(size) == 0:
        return int(size), int(size)
    return int(size[0]), int(size[1])


def radius_grid(size) -> np.ndarray:
    """Distance of every pixel from the centre ``(N // 2, N // 2)``.

    Parameters
    ----------
    size : int or tuple of int
        Box ``N`` or ``(ny, nx)``.

    Returns
    -------
    numpy.ndarray
        ``(ny, nx)`` float64 distances in pixels.
    """
    ny, nx = _shape2(size)
    y = np.arange(ny) - ny // 2
    x = np.arange(nx) - nx // 2
    return np.sqrt(y[:, None] ** 2 + x[None, :] ** 2)


def circular_mask(size, radius: float, *, soft_edge: float = 0.0) -> np.ndarray:
    """Circular mask centred on ``N // 2``.

    Parameters
    ----------
    size : int or tuple of int
        Box ``N`` or ``(ny, nx)``.
    radius : float
        Radius ``r`` in pixels. With ``soft_edge = 0`` the mask is 1 where
        ``(x - c)**2 + (y - c)**2 <= r**2`` and 0 elsewhere (SPHIRE ``model_circle``).
    soft_edge : float, optional
        Width ``w`` (pixels) of a raised-cosine fall-off outside the radius:
        ``0.5 (1 + cos(pi (d - r) / w))`` for ``r < d < r + w``, 0 beyond.

    Returns
    -------
    numpy.ndarray
        ``(ny, nx)`` float32 in ``[0, 1]``.

    Examples
    --------
    >>> int(circular_mask(5, 1).sum())
    5
    """
    if radius < 0 or soft_edge < 0:
        raise ValueError("radius and soft_edge must be non-negative")
    ny, nx = _shape2(size)
    y = np.arange(ny) - ny // 2
    x = np.arange(nx) - nx // 2
    d2 = y[:, None] ** 2 + x[None, :] ** 2
    hard = d2 <= radius * radius
    if soft_edge == 0:
        return hard.astype(np.float32)
    d = np.sqrt(d2)
    edge = 0.5 * (1.0 + np.cos(np.pi * np.clip(d - radius, 0.0, soft_edge) / soft_edge))
    return np.where(hard, 1.0, edge).astype(np.float32)


def rectangle_mask(size, half_width: float, half_length: float, angle_deg: float = 0.0) -> np.ndarray:
    """Rotated rectangle (filament) mask centred on ``N // 2``.

    Parameters
    ----------
    size : int or tuple of int
        Box ``N`` or ``(ny, nx)``.
    half_width : float
        Half of the short side (pixels).
    half_length : float
        Half of the long side (pixels).
    angle_deg : float, optional
        Direction of the long axis: ``(cos a, -sin a)`` in (column, row)
        coordinates, i.e. counter-clockwise from +x as displayed with row 0 at
        the top. This is the sense of SPHIRE's ``model_rotated_rectangle2D``
        (``scipy.ndimage.rotate`` of an x-aligned rectangle).

    Returns
    -------
    numpy.ndarray
        ``(ny, nx)`` float32, 1 where ``|u| <= half_length`` and
        ``|v| <= half_width`` (u along the long axis, v across), else 0.

    Notes
    -----
    SPHIRE builds the mask by rotating a pixelated rectangle with spline
    interpolation; here it is evaluated analytically per pixel centre, so the
    edges differ by at most one pixel.
    """
    ny, nx = _shape2(size)
    a = np.deg2rad(angle_deg)
    y = (np.arange(ny) - ny // 2)[:, None].astype(np.float64)
    x = (np.arange(nx) - nx // 2)[None, :].astype(np.float64)
    ux, uy = np.cos(a), -np.sin(a)
    u = x * ux + y * uy
    v = -x * uy + y * ux
    eps = 1e-9
    return ((np.abs(u) <= half_length + eps) & (np.abs(v) <= half_width + eps)).astype(np.float32)


def soft_mask_outside_sphere(volume: np.ndarray, radius: float | None = None, width: float = 3.0) -> np.ndarray:
    """Flatten a volume outside a sphere to its background level with a raised-cosine edge.

    Inside ``radius`` the voxels are kept; beyond ``radius + width`` they are
    replaced by the background level (the edge-weighted mean of the voxels
    outside ``radius``); in between, a raised cosine blends the two. This is
    what ``relion_reconstruct`` does to every map it writes (radius ``N / 2``,
    width 3 voxels): it removes the noise that Fourier inversion leaves in the
    corners of the box, where no particle density is.

    Parameters
    ----------
    volume : numpy.ndarray
        ``(N, N, N)`` map, centre ``N // 2``.
    radius : float, optional
        Inner radius in voxels (default ``N / 2``).
    width : float
        Width of the cosine edge in voxels.

    Returns
    -------
    numpy.ndarray
        float32 map, same shape.
    """
    vol = np.asarray(volume, dtype=np.float32)
    n = vol.shape[0]
    radius = n / 2.0 if radius is None else float(radius)
    z, y, x = np.ogrid[:n, :n, :n]
    c = n // 2
    r = np.sqrt((z - c) ** 2 + (y - c) ** 2 + (x - c) ** 2)
    # weight of the background: 0 inside, 1 beyond radius + width, raised cosine between
    t = np.clip((r - radius) / width, 0.0, 1.0) if width > 0 else (r > radius).astype(np.float64)
    background_weight = 0.5 - 0.5 * np.cos(np.pi * t)
    total = float(background_weight.sum())
    if total == 0.0:
        return vol.copy()
    level = float((background_weight * vol).sum() / total)
    return ((1.0 - background_weight) * vol + background_weight * level).astype(np.float32)
