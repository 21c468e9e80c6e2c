"""Image statistics: rotational averages, 1-D power spectra, FRC/FSC, streaming mean/variance.

Shells and rings are integer radii: a real-space pixel at distance ``d`` from
the centre ``N // 2`` belongs to ring ``round(d)``; a Fourier sample with
frequency ``k`` (cycles/pixel) belongs to shell ``round(|k| N)``. Outputs have
``N // 2 + 1`` entries (radii ``0 .. N // 2``); samples beyond are ignored.
Shell ``i`` corresponds to ``i / N`` cycles/pixel, i.e. ``i / (N * apix)`` 1/Å.
"""

from __future__ import annotations

import numpy as np

from isavar.core.fft import as_stack

__all__ = [
    "ring_index",
    "shell_index",
    "rotational_average",
    "power_spectrum_1d",
    "frc",
    "fsc",
    "shell_counts",
    "group_sums",
    "RunningMeanVariance",
]


def ring_index(size: int) -> np.ndarray:
    """Integer ring ``round(distance from (N//2, N//2))`` of each pixel of an ``(N, N)`` image (int64)."""
    c = size // 2
    y = np.arange(size) - c
    return np.rint(np.sqrt(y[:, None] ** 2 + y[None, :] ** 2)).astype(np.int64)


def shell_index(shape: tuple[int, ...], *, rfft: bool = True) -> np.ndarray:
    """Integer Fourier shell ``round(|k| N)`` of each sample of an (r)FFT of a cubic/square array.

    Parameters
    ----------
    shape : tuple of int
        Real-space shape, ``(N, N)`` or ``(N, N, N)``.
    rfft : bool, optional
        Layout of ``numpy.fft.rfftn`` (last axis halved) if True.

    Returns
    -------
    numpy.ndarray
        int64 shells, shape of the (r)FFT.
    """
    n = shape[-1]
    if any(s != n for s in shape):
        raise ValueError(f"shells need a square/cubic shape, got {shape}")
    axes = [np.fft.fftfreq(n) * n] * (len(shape) - 1) + [(np.fft.rfftfreq(n) if rfft else np.fft.fftfreq(n)) * n]
    grids = np.meshgrid(*axes, indexing="ij")
    return np.rint(np.sqrt(sum(g * g for g in grids))).astype(np.int64)


def _rfft_weights(shape: tuple[int, ...]) -> np.ndarray:
    """Multiplicity of rfft samples in the full spectrum (1 for kx = 0 and Nyquist, else 2), last axis."""
    n = shape[-1]
    w = np.full(n // 2 + 1, 2.0)
    w[0] = 1.0
    if n % 2 == 0:
        w[-1] = 1.0
    return w


def _shell_sum(values: np.ndarray, shells: np.ndarray, nshell: int) -> np.ndarray:
    """Sum ``values[..., *grid]`` per shell ``0..nshell-1`` for every leading index; returns ``(..., nshell)``."""
    lead = values.shape[: values.ndim - shells.ndim]
    flat = values.reshape(-1, shells.size)
    idx = shells.ravel()
    keep = np.nonzero(idx < nshell)[0]
    order = keep[np.argsort(idx[keep], kind="stable")]
    sorted_idx = idx[order]
    starts = np.searchsorted(sorted_idx, np.arange(nshell))
    ends = np.append(starts[1:], sorted_idx.size)
    nonempty = ends > starts
    out = np.zeros((flat.shape[0], nshell), dtype=np.float64)
    if sorted_idx.size:
        sums = np.add.reduceat(flat[:, order], np.minimum(starts, sorted_idx.size - 1), axis=1)
        out[:, nonempty] = sums[:, nonempty]
    return out.reshape(lead + (nshell,))


def group_sums(values, labels, n_groups: int) -> np.ndarray:
    """Sum of the items of ``values`` that share a label, for labels ``0 .. n_groups - 1``.

    Parameters
    ----------
    values : (n, ...) array_like
        Items (images, vectors, ...).
    labels : (n,) array_like of int
        Group of every item; items with labels outside ``0 .. n_groups - 1`` are ignored.
    n_groups : int

    Returns
    -------
    numpy.ndarray
        float64 ``(n_groups, ...)``; empty groups are 0. Items are added in their input order within a group
        (sort + ``np.add.reduceat``, much faster than ``np.add.at`` for whole images).
    """
    values = np.asarray(values)
    labels = np.asarray(labels, dtype=np.int64).ravel()
    out = np.zeros((n_groups,) + values.shape[1:], dtype=np.float64)
    keep = np.flatnonzero((labels >= 0) & (labels < n_groups))
    if keep.size == 0:
        return out
    order = keep[np.argsort(labels[keep], kind="stable")]
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]])
    out[sorted_labels[starts]] = np.add.reduceat(values[order].astype(np.float64, copy=False), starts, axis=0)
    return out


def _index_counts(index: np.ndarray, n: int) -> np.ndarray:
    """How many entries of an integer index array equal each of ``0 .. n - 1`` (larger values ignored)."""
    flat = index.ravel()
    return np.bincount(flat[flat < n], minlength=n)


def rotational_average(images) -> np.ndarray:
    """Real-space rotational average in integer rings about ``N // 2``.

    Parameters
    ----------
    images : array_like
        ``(N, N)`` or ``(n, N, N)``.

    Returns
    -------
    numpy.ndarray
        ``(N // 2 + 1,)`` or ``(n, N // 2 + 1)`` float32: mean of the pixels of
        ring ``r = round(distance)`` for ``r = 0 .. N // 2``.
    """
    stack, single = as_stack(images)
    n = stack.shape[-1]
    if stack.shape[-2] != n:
        raise ValueError("rotational_average needs square images")
    rings = ring_index(n)
    nring = n // 2 + 1
    counts = _index_counts(rings, nring).astype(np.float64)
    out = (_shell_sum(stack.astype(np.float64), rings, nring) / counts).astype(np.float32)
    return out[0] if single else out


def shell_counts(shape: tuple[int, ...]) -> np.ndarray:
    """Number of full-spectrum Fourier samples in each shell ``0 .. N // 2`` (int64)."""
    return _index_counts(shell_index(shape, rfft=False), shape[-1] // 2 + 1)


def power_spectrum_1d(images) -> np.ndarray:
    """Rotationally averaged power spectrum per image.

    Parameters
    ----------
    images : array_like
        ``(N, N)`` or ``(n, N, N)``.

    Returns
    -------
    numpy.ndarray
        ``(N // 2 + 1,)`` or ``(n, N // 2 + 1)`` float32: mean over shell ``i``
        of ``|F(k)|**2 / N**2`` with ``F`` the unnormalised FFT. With this
        scaling white noise of variance ``v`` has a flat spectrum equal to
        ``v`` (Parseval: the mean over all samples is the mean square pixel).
    """
    stack, single = as_stack(images)
    n = stack.shape[-1]
    if stack.shape[-2] != n:
        raise ValueError("power_spectrum_1d needs square images")
    spec = np.fft.rfft2(stack)
    power = (spec.real**2 + spec.imag**2) * _rfft_weights(stack.shape[1:]) / float(n * n)
    shells = shell_index(stack.shape[1:])
    nshell = n // 2 + 1
    out = (_shell_sum(power, shells, nshell) / shell_counts(stack.shape[1:])).astype(np.float32)
    return out[0] if single else out


def _correlation_per_shell(a: np.ndarray, b: np.ndarray, ndim: int, return_counts: bool):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    shape = a.shape[-ndim:]
    axes = tuple(range(-ndim, 0))
    fa, fb = np.fft.rfftn(a, axes=axes), np.fft.rfftn(b, axes=axes)
    w = _rfft_weights(shape)
    shells = shell_index(shape)
    nshell = shape[-1] // 2 + 1
    cross = _shell_sum((fa * fb.conj()).real * w, shells, nshell)
    pa = _shell_sum((fa.real**2 + fa.imag**2) * w, shells, nshell)
    pb = _shell_sum((fb.real**2 + fb.imag**2) * w, shells, nshell)
    denom = np.sqrt(pa * pb)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where(denom > 0, cross / np.where(denom > 0, denom, 1.0), 0.0)
    if return_counts:
        return corr, shell_counts(shape)
    return corr


def frc(a, b, *, return_counts: bool = False):
    """Fourier ring correlation of images, per integer shell.

    Parameters
    ----------
    a, b : array_like
        ``(N, N)`` or ``(n, N, N)`` (pairs along the leading axis).
    return_counts : bool, optional
        Also return the number of Fourier samples per shell (full spectrum),
        e.g. for the ``1 / sqrt(count)`` noise level of the FRC of
        independent noise.

    Returns
    -------
    frc : numpy.ndarray
        ``(..., N // 2 + 1)`` float64, ``Re sum A B* / sqrt(sum |A|^2 sum |B|^2)``
        over shell ``i`` (frequency ``i / N`` cycles/pixel); 0 where a shell has
        no power.
    counts : numpy.ndarray, optional
        ``(N // 2 + 1,)``.
    """
    return _correlation_per_shell(a, b, 2, return_counts)


def fsc(v1, v2, *, return_counts: bool = False):
    """Fourier shell correlation of volumes ``(N, N, N)`` (or stacks ``(n, N, N, N)``); see :func:`frc`."""
    return _correlation_per_shell(v1, v2, 3, return_counts)


class RunningMeanVariance:
    """Streaming, batched, mergeable per-element mean and variance (Welford / Chan et al.).

    Feed batches ``(k, *shape)``; the state is ``count``, ``mean`` and ``m2``
    (sum of squared deviations from the mean), all float64. States computed on
    different processes combine exactly with :meth:`merge` (order does not
    matter beyond rounding), e.g. after ``executor.gather``.

    Parameters
    ----------
    shape : tuple of int
        Shape of one sample (e.g. ``(ny, nx)``).

    Examples
    --------
    >>> acc = RunningMeanVariance((2,))
    >>> acc.update(np.array([[1.0, 2.0], [3.0, 6.0]]))
    >>> acc.mean.tolist(), acc.variance().tolist()
    ([2.0, 4.0], [2.0, 8.0])
    """

    def __init__(self, shape: tuple[int, ...]):
        self.shape = tuple(shape)
        self.count = 0
        self.mean = np.zeros(self.shape, dtype=np.float64)
        self.m2 = np.zeros(self.shape, dtype=np.float64)

    @classmethod
    def from_state(cls, count: int, mean, m2) -> "RunningMeanVariance":
        """Rebuild an accumulator from ``(count, mean, m2)`` (e.g. received from another process)."""
        acc = cls(np.shape(mean))
        acc.count = int(count)
        acc.mean = np.array(mean, dtype=np.float64)
        acc.m2 = np.array(m2, dtype=np.float64)
        return acc

    def state(self) -> tuple[int, np.ndarray, np.ndarray]:
        """Return ``(count, mean, m2)``."""
        return self.count, self.mean, self.m2

    def _combine(self, count: int, mean: np.ndarray, m2: np.ndarray) -> None:
        if count == 0:
            return
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + delta * delta * (self.count * count / total)
        self.count = total

    def update(self, batch) -> None:
        """Add a batch of samples ``(k, *shape)`` (or one sample of ``shape``)."""
        x = np.asarray(batch, dtype=np.float64)
        if x.shape == self.shape:
            x = x[None]
        if x.shape[1:] != self.shape:
            raise ValueError(f"batch shape {x.shape} does not match samples of shape {self.shape}")
        k = x.shape[0]
        if k == 0:
            return
        mean = x.mean(axis=0)
        dev = x - mean
        self._combine(k, mean, np.einsum("i...,i...->...", dev, dev))

    def merge(self, other: "RunningMeanVariance") -> "RunningMeanVariance":
        """Fold another accumulator into this one (in place); returns ``self``."""
        if other.shape != self.shape:
            raise ValueError(f"cannot merge shapes {other.shape} and {self.shape}")
        self._combine(other.count, other.mean, other.m2)
        return self

    def variance(self, ddof: int = 1) -> np.ndarray:
        """Per-element variance ``m2 / (count - ddof)`` (NaN if ``count <= ddof``)."""
        if self.count <= ddof:
            return np.full(self.shape, np.nan)
        return self.m2 / (self.count - ddof)

    def std(self, ddof: int = 1) -> np.ndarray:
        """Per-element standard deviation (square root of :meth:`variance`)."""
        return np.sqrt(self.variance(ddof))
