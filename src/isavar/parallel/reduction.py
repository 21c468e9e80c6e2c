"""Exact, order-independent sums of float arrays, so a reduction gives the same bits on any number of processes.

Floating-point addition is not associative: summing the same task results in another order, or grouped
into other per-process partial sums, changes the last bits, and iterative methods amplify them. An
:class:`ExactSum` therefore keeps its total in fixed point, as three 64-bit integer limbs per element:

    value = hi + mid * 2**-40 + lo * 2**-80,   0 <= mid, lo < 2**40

Every float64 whose magnitude is below :data:`MAX_MAGNITUDE` (2**52) is split into the limbs exactly down
to 2**-80 (about 8e-25: each added value is rounded there, a relative error far below float32's). Integer
addition is associative, so the total is the same whatever the order of the additions and however they are
grouped over workers or MPI ranks; :meth:`ExactSum.values` then converts the normalised limbs back to
float64 the same way everywhere.

Memory: 24 bytes per summed float64 element (complex values count as two).
"""

from __future__ import annotations

import json

import numba
import numpy as np

#: Bits of each fractional limb.
LIMB_BITS = 40

#: Largest magnitude of a single added value (and of the total, with room for carries).
MAX_MAGNITUDE = float(2 ** 52)


@numba.njit(cache=True, nogil=True)
def _add_fixed_point(values, hi, mid, lo):                                  # pragma: no cover - compiled
    """Add ``values`` (float64, flat) into the limbs; return the index of a bad value or -1.

    The magnitude is split (``a - floor(a)`` is exact for ``a >= 0``; for a negative value ``v - floor(v)``
    would round) and the limbs of a negative value are its two's-complement negation.
    """
    scale = 2.0 ** 40
    full = np.int64(1) << 40
    mask = full - 1
    for i in range(values.size):
        v = values[i]
        if not (abs(v) < 2.0 ** 52):                                      # also catches NaN
            return i
        a = abs(v)
        h = np.floor(a)
        r = (a - h) * scale                                              # exact: a - floor(a) in [0, 1)
        m = np.floor(r)
        dh, dm, dl = np.int64(h), np.int64(m), np.int64(np.rint((r - m) * scale))   # dl in [0, 2**40]
        if v < 0 and (dm != 0 or dl != 0):                               # -(dh + f) = -(dh + 1) + (1 - f)
            dh = -dh - 1
            if dl == 0:
                dm = full - dm
            else:
                dl = full - dl
                dm = mask - dm
        elif v < 0:
            dh = -dh
        lo[i] += dl
        mid[i] += dm + (lo[i] >> 40)
        lo[i] &= mask
        hi[i] += dh + (mid[i] >> 40)
        mid[i] &= mask
    return -1


@numba.njit(cache=True, nogil=True)
def _normalise(hi, mid, lo):                                             # pragma: no cover - compiled
    """Carry ``lo`` into ``mid`` and ``mid`` into ``hi`` so both lie in ``[0, 2**40)``."""
    mask = (1 << 40) - 1
    for i in range(hi.size):
        mid[i] += lo[i] >> 40
        lo[i] &= mask
        hi[i] += mid[i] >> 40
        mid[i] &= mask


@numba.njit(cache=True, nogil=True)
def _to_float(hi, mid, lo, out):                                         # pragma: no cover - compiled
    """``out[i] = hi[i] + (mid[i] + lo[i] * 2**-40) * 2**-40`` (the same operations on every process).

    Negative totals are converted from their sign-magnitude limbs, so a small negative total keeps its
    relative precision (``-1 + 0.95`` would lose the low bits of ``-0.05``).
    """
    step = 2.0 ** -40
    full = np.int64(1) << 40
    for i in range(hi.size):
        h, m, low = hi[i], mid[i], lo[i]
        sign = 1.0
        if h < 0:                                        # -(|h| - fraction): borrow from the integer part
            sign = -1.0
            if m == 0 and low == 0:
                h = -h
            else:
                h = -h - 1
                if low == 0:
                    m = full - m
                else:
                    low = full - low
                    m = full - 1 - m
        out[i] = sign * (np.float64(h) + (np.float64(m) + np.float64(low) * step) * step)


def _as_float64_flat(array: np.ndarray) -> np.ndarray:
    """A flat float64 view (or copy) of a real or complex array; complex as interleaved (real, imag)."""
    a = np.asarray(array)
    if np.iscomplexobj(a):
        return np.ascontiguousarray(a, dtype=np.complex128).reshape(-1).view(np.float64)
    return np.ascontiguousarray(a, dtype=np.float64).reshape(-1)


class ExactSum:
    """An order-independent sum of tuples of arrays with fixed shapes.

    Parameters
    ----------
    layout : sequence of (shape, is_complex)
        One entry per summed array, as returned by :func:`layout_of`.

    Examples
    --------
    >>> total = ExactSum(layout_of((np.zeros(3),)))
    >>> total.add((np.array([0.1, 0.2, 0.3]),))
    >>> total.values()[0].tolist()
    [0.1, 0.2, 0.3]
    """

    def __init__(self, layout):
        self.layout = tuple((tuple(int(s) for s in shape), bool(cplx)) for shape, cplx in layout)
        sizes = [int(np.prod(shape, dtype=np.int64)) * (2 if cplx else 1) for shape, cplx in self.layout]
        self._offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self.limbs = np.zeros((3, int(self._offsets[-1])), np.int64)
        self.count = 0

    def add(self, arrays) -> None:
        """Add one tuple of arrays (same shapes and kinds as the layout).

        Raises
        ------
        ValueError
            If an array's shape differs from the layout, or a value is NaN, infinite or of magnitude
            :data:`MAX_MAGNITUDE` or more.
        """
        arrays = tuple(arrays)
        if len(arrays) != len(self.layout):
            raise ValueError(f"expected {len(self.layout)} arrays to sum, got {len(arrays)}")
        hi, mid, lo = self.limbs
        for k, (a, (shape, cplx)) in enumerate(zip(arrays, self.layout)):
            if tuple(np.shape(a)) != shape:
                raise ValueError(f"summed array {k} has shape {np.shape(a)}, expected {shape}")
            flat = _as_float64_flat(a) if cplx else _as_float64_flat(np.real(a))
            s, e = self._offsets[k], self._offsets[k + 1]
            bad = _add_fixed_point(flat, hi[s:e], mid[s:e], lo[s:e])
            if bad >= 0:
                raise ValueError(f"cannot sum array {k}: element {bad} is {flat[bad]!r} "
                                 f"(not finite or not below 2**52 in magnitude)")
        self.count += 1

    def merge_limbs(self, limbs: np.ndarray, count: int = 0) -> None:
        """Add the limbs of another sum with the same layout (e.g. after an MPI reduction)."""
        self.limbs += limbs
        _normalise(*self.limbs)
        self.count += int(count)

    def merge(self, other: "ExactSum") -> "ExactSum":
        """Add another sum with the same layout into this one, exactly; returns ``self``."""
        if other.layout != self.layout:
            raise ValueError(f"cannot merge sums of layouts {other.layout} and {self.layout}")
        self.merge_limbs(other.limbs, other.count)
        return self

    def to_arrays(self, prefix: str = "sum") -> dict:
        """The sum as a dict of arrays (for ``np.savez``): limbs, count and layout; see :meth:`from_arrays`."""
        shapes = [list(shape) for shape, _ in self.layout]
        return {f"{prefix}_limbs": self.limbs.copy(), f"{prefix}_count": np.int64(self.count),
                f"{prefix}_layout": np.array(json.dumps([shapes, [c for _, c in self.layout]]))}

    @classmethod
    def from_arrays(cls, arrays, prefix: str = "sum") -> "ExactSum":
        """The sum saved by :meth:`to_arrays` (exactly: continuing it gives the bits of an uninterrupted sum)."""
        shapes, cplx = json.loads(str(np.asarray(arrays[f"{prefix}_layout"])))
        total = cls(list(zip(shapes, cplx)))
        limbs = np.asarray(arrays[f"{prefix}_limbs"], np.int64)
        if limbs.shape != total.limbs.shape:
            raise ValueError(f"saved limbs have shape {limbs.shape}, expected {total.limbs.shape}")
        total.limbs[...] = limbs
        total.count = int(arrays[f"{prefix}_count"])
        return total

    def values(self) -> list[np.ndarray]:
        """The totals: float64 (or complex128) arrays in the layout's shapes."""
        hi, mid, lo = self.limbs
        out = []
        for k, (shape, cplx) in enumerate(self.layout):
            s, e = self._offsets[k], self._offsets[k + 1]
            part = np.empty(e - s, np.float64)
            _to_float(hi[s:e], mid[s:e], lo[s:e], part)
            out.append(part.view(np.complex128).reshape(shape) if cplx else part.reshape(shape))
        return out


def layout_of(arrays) -> tuple:
    """The ``(shape, is_complex)`` layout of a tuple of arrays, for :class:`ExactSum`."""
    return tuple((tuple(np.shape(a)), bool(np.iscomplexobj(a))) for a in arrays)


def split_result(result):
    """``(arrays, extra)`` from a task result that is either that pair or just a tuple of arrays."""
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], (tuple, list)):
        return tuple(result[0]), result[1]
    raise TypeError("a map_sum task must return (arrays, extra): a tuple of arrays to sum and any "
                    "per-task value (or None)")


def sum_locally(results, on_result=None):
    """Sum task results on one process; returns the :class:`ExactSum` (``None`` if there were none).

    Parameters
    ----------
    results : iterable of (arrays, extra)
        Task results in any order.
    on_result : callable, optional
        ``on_result(extra)`` for every result, in the order given.
    """
    total = None
    for result in results:
        arrays, extra = split_result(result)
        if total is None:
            total = ExactSum(layout_of(arrays))
        total.add(arrays)
        if on_result is not None:
            on_result(extra)
    return total
