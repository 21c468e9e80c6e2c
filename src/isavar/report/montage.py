"""Montage of class averages as a PNG (matplotlib, Agg backend; no display needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def save_montage(path, images, labels=None, *, columns: int | None = None, cell_inches: float = 1.1,
                 title: str | None = None) -> Path:
    """Save images in a grid, each with an optional label below it.

    Parameters
    ----------
    path : path-like
        Output ``.png``.
    images : ndarray, (n, ny, nx)
        Images; each is scaled to its own 1st-99th percentile range.
    labels : sequence of str, optional
        One label per image (e.g. member counts).
    columns : int, optional
        Images per row (default about ``sqrt(1.6 n)``).
    cell_inches : float
        Size of one cell.
    title : str, optional

    Returns
    -------
    pathlib.Path
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    images = np.asarray(images, dtype=np.float32)
    n = max(len(images), 1)
    cols = columns or max(1, int(np.ceil(np.sqrt(1.6 * n))))
    rows = int(np.ceil(n / cols))
    fig = Figure(figsize=(cols * cell_inches, rows * (cell_inches + 0.2) + (0.3 if title else 0.0)))
    FigureCanvasAgg(fig)
    for i in range(rows * cols):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_axis_off()
        if i >= len(images):
            continue
        img = images[i]
        lo, hi = np.percentile(img, [1, 99]) if img.size else (0, 1)
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower",
                  interpolation="nearest")
        if labels is not None:
            ax.set_title(str(labels[i]), fontsize=7, pad=2)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.3)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    tmp.replace(path)
    return path
