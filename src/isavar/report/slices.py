"""Central orthogonal slices of the variability (and mean) volumes, as arrays and as a PNG."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def central_slices(volume: np.ndarray) -> list[np.ndarray]:
    """The three central orthogonal slices of a ``(nz, ny, nx)`` volume.

    Returns
    -------
    list of numpy.ndarray
        ``[xy (z = nz//2), xz (y = ny//2), yz (x = nx//2)]``.
    """
    v = np.asarray(volume)
    nz, ny, nx = v.shape
    return [v[nz // 2], v[:, ny // 2, :], v[:, :, nx // 2]]


def save_variability_slices(path, var3d: np.ndarray, ave3d: np.ndarray | None = None, *,
                            pixel_size_A: float | None = None, title: str | None = None) -> Path:
    """Save central XY/XZ/YZ slices of var3D (one row) beside ave3D (second row) as a PNG.

    Parameters
    ----------
    path : path-like
        Output ``.png``.
    var3d : numpy.ndarray
        ``(N, N, N)`` variability volume (hot colour map, own range per volume).
    ave3d : numpy.ndarray, optional
        Mean volume (grey).
    pixel_size_A : float, optional
        Shown in the title.
    title : str, optional
        Figure title.

    Returns
    -------
    pathlib.Path
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [("var3D", np.asarray(var3d, np.float32), "magma")]
    if ave3d is not None:
        rows.append(("ave3D", np.asarray(ave3d, np.float32), "gray"))
    fig = Figure(figsize=(7.5, 2.6 * len(rows) + 0.4))
    FigureCanvasAgg(fig)
    names = ("XY (central z)", "XZ (central y)", "YZ (central x)")
    for r, (label, vol, cmap) in enumerate(rows):
        slices = central_slices(vol)
        lo, hi = np.percentile(np.concatenate([s.ravel() for s in slices]), [1, 99.5])
        hi = hi if hi > lo else lo + 1e-6
        for c, (sl, name) in enumerate(zip(slices, names)):
            ax = fig.add_subplot(len(rows), 3, r * 3 + c + 1)
            im = ax.imshow(sl, cmap=cmap, vmin=lo, vmax=hi, origin="lower", interpolation="nearest")
            ax.set_title(f"{label} {name}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=fig.axes[-3:], fraction=0.02, pad=0.01)
    text = title or "3D variability: central slices"
    if pixel_size_A:
        text += f" ({vol.shape[0]} px, {pixel_size_A:.3g} Å/px)"
    fig.suptitle(text, fontsize=9)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)
    return path
