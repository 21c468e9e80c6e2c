"""Batched 2-D alignment: global rotation + mirror, local translation (SPHIRE ``ormq`` / multi-reference search).

For every image, every trial translation on a local grid around the image's current particle centre and
every reference, the full rotational cross-correlation curve (straight and x-mirrored) is computed with
the ring geometry of :mod:`isavar.core.polar` (spec isac2 §4.4-§4.8), its peak refined with a 7-point
least-squares parabola, and the best (angle, translation, mirror) kept.

Parameter convention (spec §0.1, :mod:`isavar.core.params2d`): a parameter set ``(alpha, sx, sy, mirror)``
maps a point ``q`` (relative to the image centre ``N // 2``) to ``M^m (R(alpha) q + t)`` with
``R(alpha) = [[cos, sin], [-sin, cos]]`` and ``M = diag(-1, 1)``. The returned parameters are the ones
that, *applied to the image* (content at ``q`` moved to ``T(q)``, ``core.transform2d.transform_images``),
align it to the reference. Angles are degrees in ``(-180, 180]``, shifts pixels.

How it is computed (all float32, chunked over images and references):

1. the polar samples of every image at every trial centre come from one vectorised gather per chunk
   (integer translation steps share the bilinear weights, so every pixel is fetched once per centre);
2. ring real FFTs, batched per ring length;
3. for every ring frequency band (frequencies shared by the same set of rings) one real matrix product
   ``[Re B | Im B] (n_images * n_shifts, 2 n_rings) @ W (2 n_rings, 4 n_refs)`` gives the straight
   (``sum_r w_r A conj B``) and mirrored (``sum_r w_r conj(A B)``: the spectrum of the mirrored ring is
   ``conj B`` and the mirror curve runs backwards in alpha, see :mod:`isavar.core.polar`) cross-spectra of
   all pairs at once;
4. one batched inverse real FFT of length ``maxrin`` yields all correlation curves; peak search,
   parabola refinement, straight/mirror and translation selection are vectorised.

Repeated passes over the same images (within-group refinement, pre-alignment) can keep the image spectra
in a :class:`SpectraCache` (``cache=``), since the particle centres move on a whole-step lattice.
``bench/align_bench.py`` measures all of this against a scalar C implementation of the same search.

SPHIRE's ring normalisation of the image (``Normalize_ring``, used in the multi-reference search) is
applied exactly but cheaply: because the correlation is linear in the image rings, normalising the rings
maps every curve to ``(c - mean * S_ref) / std`` with ``S_ref = sum_r r (2 pi / n_r) sum_j a_r(phi_j)``;
the affine map has a positive slope, so the peak position and parabola offset are unchanged and only the
peak values are transformed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import scipy.fft

from isavar.conventions import wrap_degrees
from isavar.core import _kernels
from isavar.core.polar import (
    PolarGrid,
    _gather_polar,
    check_fits,
    polar_grid,
    polar_to_image,
    polar_transform,
    reference_spectra,
    ring_spectra,
    rings_from_spectra,
)

__all__ = [
    "MultiRefAlignment",
    "RefAlignment",
    "PreparedReferences",
    "SpectraCache",
    "prepare_references",
    "translation_lattice",
    "align_to_references",
    "align_to_reference",
    "search_offsets",
    "particle_centres",
    "peak_offset",
    "aligned_average",
    "subset_references",
    "coarse_scores",
    "band_limit",
    "Block",
]

#: default number of (image x trial shift x reference) pairs whose correlation curves are computed at
#: once (~4 kB of curves per pair; small blocks stay in cache, which matters more than BLAS block size)
DEFAULT_PAIR_BUDGET = 768
#: (image x trial shift) rows per block of correlation curves (the matrix products run near peak
#: speed for ~70 rows x tens of references)
MAX_ROWS = 72
#: (image x trial shift) rows polar-sampled and ring-FFT'd at once (memory-bound steps: stay in cache)
P_ROWS = 36
#: use the compiled kernels of :mod:`isavar.core._kernels` (False: the NumPy formulation, same numbers up to
#: float32 rounding; the tests compare both)
USE_KERNELS = True


@dataclass(frozen=True)
class MultiRefAlignment:
    """Best alignment of every image to every reference.

    All arrays have shape ``(n_images, n_refs)``.

    Attributes
    ----------
    score : float32
        Peak value of the (ring-normalised, if requested) rotational correlation at the best
        translation (SPHIRE ``d[k, i]``); larger is better.
    alpha, sx, sy : float32
        Parameters (degrees, pixels) that applied to the image align it to the reference (§0.1).
    mirror : int8
        0 or 1.
    """

    score: np.ndarray
    alpha: np.ndarray
    sx: np.ndarray
    sy: np.ndarray
    mirror: np.ndarray

    @property
    def params(self) -> np.ndarray:
        """float64 ``(..., 4)`` array of ``(alpha, sx, sy, mirror)``."""
        return np.stack([self.alpha, self.sx, self.sy, self.mirror], axis=-1).astype(np.float64)


@dataclass(frozen=True)
class RefAlignment(MultiRefAlignment):
    """Best alignment of every image to one reference; the same fields with shape ``(n_images,)``."""


@dataclass(frozen=True, eq=False)
class PreparedReferences:
    """References resampled on the rings, FFT'd, weighted and arranged for the batched search.

    Build with :func:`prepare_references`; reuse it across image chunks (e.g. one executor task per
    chunk) to avoid recomputing the reference side.

    Attributes
    ----------
    grid : PolarGrid
    box : int
        Image size N the references (and images) have.
    n_refs : int
    mirror : bool
        Whether the mirrored correlation is prepared.
    ring_sum : (n_refs,) float64
        ``sum_r r (2 pi / n_r) sum_j a_r(phi_j)`` (used by the ring normalisation).
    bands : tuple
        Per frequency band ``(m_lo, m_hi, first_ring, W)`` with ``W`` float32 of shape
        ``(m_hi - m_lo, 2 * n_band_rings, n_refs * n_cols)`` (rows: ring-major, then Re/Im of the image
        coefficient; columns: reference-major, then Re/Im of the straight and mirrored cross-spectrum),
        ``n_cols`` = 4 (mirror) or 2.
    blocks : tuple
        Empty, or (a band-limited reference, :func:`band_limit`) the parts of the bands the correlations
        read: ``(band, m_offset, m_count, ring_skip, W_block)`` with ``W_block`` the band's ``W`` restricted
        to frequencies ``m_lo + m_offset ...`` and its outer rings. Empty means every band whole.
    translations : tuple or None
        None: the trial translations of a search are applied to the images (SPHIRE). ``(x_range, y_range,
        step)``: the references were prepared at those trial translations (reference-side search,
        :func:`prepare_references`); ``n_refs`` then counts every (reference, translation) pair.
    shifts : ndarray or None
        ``(n_shifts, 2)`` translations ``u = (ux, uy)`` (pixels) of a reference-side search, order (iy, ix);
        column ``k * n_shifts + j`` is reference ``k`` sampled around its centre ``+ u_j``.
    rings : PolarGrid or None
        A reference-side search's own rings (``grid`` then reaches ``max |u|`` further out); None otherwise.
    """

    grid: PolarGrid
    box: int
    n_refs: int
    mirror: bool
    ring_sum: np.ndarray
    bands: tuple
    blocks: tuple = ()
    translations: tuple | None = None
    shifts: np.ndarray | None = None
    rings: PolarGrid | None = None

    @property
    def n_references(self) -> int:
        """Number of references (without their trial translations)."""
        return self.n_refs if self.shifts is None else self.n_refs // len(self.shifts)


#: the spare store buffer of a dropped :class:`SpectraCache`, reused by the next cache of this process (its pages
#: are already mapped: a group's store is ~100 MB, and mapping fresh pages for every group cost ~10 % of ISAC2's
#: CPU time as page faults); at most one is kept, so a process holds at most one store more than it uses
_SPARE_STORES: list = []


def _take_store(least: int, preferred: int) -> np.ndarray:
    """A float32 buffer: the spare one if it has at least ``least`` elements, else a new one of ``preferred``
    elements (a spare that is too small is released first)."""
    if _SPARE_STORES and _SPARE_STORES[0].size >= least:
        return _SPARE_STORES.pop()
    _SPARE_STORES.clear()
    return np.empty(max(least, preferred), np.float32)


def _give_store(buf) -> None:
    """Keep ``buf`` for reuse (the larger of it and the current spare)."""
    if buf is None:
        return
    if not _SPARE_STORES or buf.size > _SPARE_STORES[0].size:
        _SPARE_STORES[:] = [buf]


class SpectraCache:
    """Image ring spectra kept across alignment passes of the same images (opt-in, ``cache=``).

    Repeated passes over a fixed image set (``within_group_refinement``: L runs x ``maxit`` passes per group;
    ``ali2d_base``) move every particle centre by whole translation steps, so the same sampling centres come
    back again and again. With a cache each (image, centre) is polar-sampled, ring-normalisation-measured
    and ring-FFT'd once; later passes only copy the stored spectra.

    Meant for groups (hundreds to a few thousand images; the lattice index costs ~7 kB per image for the
    default geometry). Use one cache per image set and pass the *same images in the same order* to every
    call (a changed image, detected by a content fingerprint, only invalidates its own entries).
    Entries live on a per-image lattice
    ``base + integer offsets`` (``base`` = the centre at the image's first visit); a request is served from the
    lattice point nearest to it when that is within ``tolerance`` pixels (parameters returned as float32
    reproduce centres to ~1e-6 px), otherwise the image's entries are dropped and the lattice restarts. Only
    integer translation steps use the cache. When the store would exceed ``max_bytes`` it is emptied. A
    read-only stack passed again (the same array object) is taken as unchanged and not fingerprinted again.

    Parameters
    ----------
    max_bytes : int
        Bound on the stored spectra (~16 kB per entry for the default rings).
    tolerance : float
        Maximum distance (pixels, per axis) between a requested sampling centre and the stored one.
    """

    def __init__(self, max_bytes: int = 512 * 2**20, tolerance: float = 1e-3):
        self.max_bytes = int(max_bytes)
        self.tolerance = float(tolerance)
        self.hits = 0
        self.misses = 0
        self._sig = None
        self._frozen = None

    def __len__(self) -> int:
        return 0 if self._sig is None else self._size

    def _reset_store(self):
        self._table[:] = -1
        self._release()
        self._size = 0

    def _release(self):
        """Hand the store's buffer back for reuse (:func:`_give_store`)."""
        _give_store(getattr(self, "_buffer", None))
        self._buffer = None
        self._bands = None
        self._stats = None

    def __del__(self):
        try:
            self._release()
        except Exception:                      # interpreter shutdown: nothing to keep
            pass

    def _bind(self, prep: "PreparedReferences", stack: np.ndarray, s: np.ndarray, half: int):
        """Attach to (grid, images); invalidate changed images; (re)start lattices; returns base (n, 2)."""
        n = stack.shape[0]
        sig = (prep.grid.lcirc, prep.grid.maxrin, tuple(prep.grid.radii.tolist()), prep.box, n)
        if sig != self._sig or half > self._half:
            self._sig = sig
            self._half = max(half, getattr(self, "_half", 0))
            w = 2 * self._half + 1
            self._proj = np.random.default_rng(20240229).standard_normal((prep.box * prep.box, 2)).astype(np.float32)
            self._fp = np.full((n, 2), np.nan)
            self._base = np.full((n, 2), np.nan)
            self._table = np.full((n, w, w), -1, dtype=np.int32)
            self._entry = sum((m_hi - m_lo) * 2 * (prep.grid.n_rings - r_first) * 4
                              for (m_lo, m_hi, r_first, _w) in prep.bands) + 16
            self._reset_store()
            self._frozen = None
        if stack is self._frozen and not stack.flags.writeable:
            fp = self._fp                     # the same read-only stack as the last call: taken as unchanged
        else:
            fp = (stack.reshape(n, -1) @ self._proj).astype(np.float64)
        self._frozen = None if stack.flags.writeable else stack
        d = s - self._base
        stale = (~np.all(fp == self._fp, axis=1)) | np.isnan(d).any(axis=1) | \
            (np.abs(d - np.rint(d)) > self.tolerance).any(axis=1)
        if stale.any():
            self._table[stale] = -1
            self._fp[stale] = fp[stale]
            self._base[stale] = s[stale]
        return self._base

    def _lookup(self, prep, images, i0, s, kx, ky, step):
        """Where the band spectra of all trial rows of images [i0, i0 + n) are, computing the missing ones.

        Returns
        -------
        index : (n * n_shifts,) int64
            Row of the store (``>= 0``) or ``-1 - j`` for row ``j`` of ``extra``.
        extra : list of float32 arrays ``(n_extra, m_b, 2 R_b)``
            Spectra of rows that could not be stored (off the lattice, or the store was full).
        mean, std : (n * n_shifts,) float64
            Ring statistics of every row.
        """
        grid = prep.grid
        n, box = images.shape[0], images.shape[1]
        n_sh = kx.size * ky.size
        centre = float(box // 2)
        base = self._base[i0:i0 + n]
        lx = (np.rint(s[:, 0] - base[:, 0]).astype(np.int64)[:, None, None]
              + (kx * int(step)).astype(np.int64)[None, None, :])
        ly = (np.rint(s[:, 1] - base[:, 1]).astype(np.int64)[:, None, None]
              + (ky * int(step)).astype(np.int64)[None, :, None])
        lx, ly = np.broadcast_arrays(lx, ly)
        lx, ly = lx.reshape(n, n_sh), ly.reshape(n, n_sh)
        h = self._half
        inside = (np.abs(lx) <= h) & (np.abs(ly) <= h)
        img = np.broadcast_to(np.arange(i0, i0 + n)[:, None], (n, n_sh))
        if (self._size + n * n_sh) * self._entry > self.max_bytes:
            self._reset_store()
        if inside.all():                                 # the usual case: every trial row is on the lattice
            slots = self._table[img, ly + h, lx + h].astype(np.int64)
        else:
            slots = np.full((n, n_sh), -2, dtype=np.int64)
            slots[inside] = self._table[img[inside], ly[inside] + h, lx[inside] + h]
        flat_slots = slots.reshape(-1)
        todo = np.flatnonzero(flat_slots < 0)
        miss = flat_slots[todo] == -1
        self.misses += int(todo.size)
        self.hits += int(n * n_sh - todo.size)
        extra = [np.zeros((0, m_hi - m_lo, 2 * (grid.n_rings - r_first)), np.float32)
                 for (m_lo, m_hi, r_first, _w) in prep.bands]
        extra_stats = np.zeros((0, 2))
        if todo.size:
            # cacheable rows at their lattice point, the (rare) others at the exact requested centre
            cx, cy = _trial_centres(centre, s, kx, ky, step)
            lat_x = centre + base[:, 0:1] + lx
            lat_y = centre + base[:, 1:2] + ly
            px = np.where(inside, lat_x, cx).reshape(-1)[todo]
            py = np.where(inside, lat_y, cy).reshape(-1)[todo]
            # sample only the images that have missing rows
            used, local = np.unique(todo // n_sh, return_inverse=True)
            polar = _gather_polar(np.ascontiguousarray(images[used]).reshape(-1), box, local.reshape(-1), px, py,
                                  grid, np.zeros(1, np.int64), np.zeros(1, np.int64)).reshape(todo.size, grid.lcirc)
            mean, std = _image_ring_stats(prep, polar)
            bands = _band_spectra(prep, polar)
            stats = np.stack([mean, std], axis=1)
            if miss.any():
                k = int(miss.sum())
                self._grow(bands, k)
                new = np.arange(self._size, self._size + k)
                for sb, b in zip(self._bands, bands):
                    sb[self._size:self._size + k] = b[miss]
                self._stats[new] = stats[miss]
                self._size += k
                rows = todo[miss]
                self._table[img.reshape(-1)[rows], ly.reshape(-1)[rows] + h, lx.reshape(-1)[rows] + h] = new
                flat_slots[rows] = new
            left = ~miss
            if left.any():
                extra = [np.ascontiguousarray(b[left]) for b in bands]
                extra_stats = stats[left]
                flat_slots[todo[left]] = -1 - np.arange(int(left.sum()))
        index = flat_slots.copy()
        ok = index >= 0
        if self._stats is not None and ok.all():
            st = self._stats[index]
        else:
            st = np.empty((index.size, 2))
            if self._stats is not None:
                st[ok] = self._stats[index[ok]]
            st[~ok] = extra_stats[-1 - index[~ok]]
        return index, extra, st[:, 0], st[:, 1]

    def _chunk(self, prep, images, i0, s, kx, ky, step, out_spectra, out_mean, out_std):
        """Band spectra, mean and std of all trial rows of images [i0, i0 + n) into the out arrays."""
        index, extra, mean, std = self._lookup(prep, images, i0, s, kx, ky, step)
        ok = index >= 0
        store = self._store(prep)
        for dst, block in zip(out_spectra, _blocks(prep)):
            sb = store[block.band]
            if ok.all() and block.covers(sb.shape[1]):
                np.take(sb, index, axis=0, out=dst, mode="clip")
            elif ok.all():                              # a band-limited reference reads part of the band
                dst[...] = _block_part(sb, block)[index]
            else:
                if ok.any():
                    dst[ok] = _block_part(sb, block)[index[ok]]
                dst[~ok] = _block_part(extra[block.band], block)[-1 - index[~ok]]
        out_mean[...], out_std[...] = mean, std

    def _store(self, prep):
        """The store's band arrays (empty ones before the first entry)."""
        if self._bands is not None:
            return self._bands
        return [np.zeros((0, m_hi - m_lo, 2 * (prep.grid.n_rings - r_first)), np.float32)
                for (m_lo, m_hi, r_first, _w) in prep.bands]

    def _grow(self, bands, k):
        need = self._size + k
        if self._bands is not None and need <= self._stats.shape[0]:
            return
        # first allocation sized for ~64 centres per image (more than a group's L x maxit passes usually visit),
        # so the store rarely has to be copied into a larger one; untouched pages cost no memory
        expect = 64 * self._table.shape[0] if self._bands is None else 0
        cap = max(256, 2 * need)
        widths = [int(np.prod(b.shape[1:])) for b in bands]
        per_entry = sum(widths) + 4                              # + 4 floats: the float64 statistics
        buffer = _take_store(cap * per_entry, max(cap, min(expect, self.max_bytes // self._entry + 1)) * per_entry)
        cap = buffer.size // per_entry
        new_bands, offset = [], 0
        for b, w in zip(bands, widths):
            new_bands.append(buffer[offset:offset + cap * w].reshape((cap,) + b.shape[1:]))
            offset += cap * w
        new_stats = buffer[offset:offset + 4 * cap].view(np.float64).reshape(cap, 2)
        if self._bands is not None:
            for nb, ob in zip(new_bands, self._bands):
                nb[:self._size] = ob[:self._size]
            new_stats[:self._size] = self._stats[:self._size]
            _give_store(self._buffer)
        self._buffer, self._bands, self._stats = buffer, new_bands, new_stats


def _freq_bands(grid: PolarGrid):
    """Bands of ring frequencies shared by the same rings: (m_lo, m_hi (exclusive), first ring, group index)."""
    bands = []
    m_lo = 0
    for gi, (n_r, r0, _r1, _s0, _s1) in enumerate(grid.groups):
        m_hi = n_r // 2 + 1
        if m_hi > m_lo:
            bands.append((m_lo, m_hi, r0, gi))
        m_lo = m_hi
    return bands


class Block(NamedTuple):
    """A part of a frequency band that the correlations read (:attr:`PreparedReferences.blocks`).

    Frequencies ``m_lo + m_offset ... m_lo + m_offset + m_count - 1`` of band ``band``, its rings from
    ``ring_skip`` on (counted from the band's first ring); ``w`` is the band's weight matrix restricted to
    them, ``(m_count, 2 * (R_b - ring_skip), n_refs * n_cols)``.
    """

    band: int
    m_offset: int
    m_count: int
    ring_skip: int
    w: np.ndarray

    def covers(self, band_freqs: int) -> bool:
        """Whether the block is the whole band (``band_freqs`` frequencies)."""
        return self.m_offset == 0 and self.ring_skip == 0 and self.m_count == band_freqs


def _blocks(prep: "PreparedReferences") -> tuple:
    """The :class:`Block` s the correlations read: ``prep.blocks``, or every band whole."""
    if prep.blocks:
        return prep.blocks
    return tuple(Block(b, 0, m_hi - m_lo, 0, w) for b, (m_lo, m_hi, _r, w) in enumerate(prep.bands))


def _block_part(band_spectra: np.ndarray, block: Block) -> np.ndarray:
    """The part ``(rows, m_count, 2 (R_b - ring_skip))`` of band spectra ``(rows, m_b, 2 R_b)`` a block reads."""
    if block.covers(band_spectra.shape[1]):
        return band_spectra
    return band_spectra[:, block.m_offset:block.m_offset + block.m_count, 2 * block.ring_skip:]


#: frequencies per block of a band-limited reference (each block keeps its own outer rings)
BLOCK_FREQS = 8


def _block_energy_shares(prep: "PreparedReferences"):
    """Per block of :data:`BLOCK_FREQS` frequencies, the largest share of a reference's energy on each ring.

    Returns
    -------
    parts : list of (band, m_offset, m_count)
    share : ndarray, (n_parts, max rings)
        ``max_k E_k(part, ring) / E_k``, rings counted from the band's first ring (0 beyond the band's rings);
        ``E`` is the ring-weighted energy of the reference's coefficients, ``m >= 1`` counted twice as in the
        real correlation curve.
    n_rings : ndarray of int, (n_parts,)
    """
    n_cols = 4 if prep.mirror else 2
    parts, energies = [], []
    for b, (m_lo, m_hi, _r, w) in enumerate(prep.bands):
        a = w.reshape(w.shape[0], w.shape[1] // 2, 2, prep.n_refs, n_cols)[..., 0].astype(np.float64)
        e = (a * a).sum(axis=2)                                                       # (m, rings, K)
        e *= np.where(np.arange(m_lo, m_hi) == 0, 1.0, 2.0)[:, None, None]
        for m_off in range(0, m_hi - m_lo, BLOCK_FREQS):
            m_count = min(BLOCK_FREQS, m_hi - m_lo - m_off)
            parts.append((b, m_off, m_count))
            energies.append(e[m_off:m_off + m_count].sum(axis=0).T)                   # (K, rings)
    total = sum(e.sum(axis=1) for e in energies)
    total = np.where(total > 0, total, 1.0)
    n_rings = np.array([e.shape[1] for e in energies])
    share = np.zeros((len(parts), n_rings.max()))
    for i, e in enumerate(energies):
        share[i, :e.shape[1]] = (e / total[:, None]).max(axis=0)
    return parts, share, n_rings


def _ring_skips(share: np.ndarray, n_rings: np.ndarray, tolerance: float, keep_all: int) -> np.ndarray:
    """Inner rings each block may leave out, together holding at most ``tolerance`` (block ``keep_all`` none).

    A block skips its rings up to the first one whose share reaches a threshold; the threshold is the largest
    (found by bisection) for which the skipped shares add up to at most ``tolerance``.
    """
    share = share.copy()
    share[keep_all] = np.inf
    key = np.maximum.accumulate(share, axis=1)                                        # non-decreasing
    finite = np.where(np.isinf(share), 0.0, share)
    prefix = np.concatenate([np.zeros((len(share), 1)), np.cumsum(finite, axis=1)], axis=1)
    rows = np.arange(len(share))

    def skips(threshold):
        sk = np.minimum((key < threshold).sum(axis=1), n_rings)
        return sk, prefix[rows, sk].sum()

    lo, hi = 0.0, 2.0 * float(finite.max()) + 1e-30
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if skips(mid)[1] <= tolerance:
            lo = mid
        else:
            hi = mid
    return skips(lo)[0]


def band_limit(prep: "PreparedReferences", tolerance: float) -> "PreparedReferences":
    """The references with the ring-frequency coefficients that hold (almost) none of their energy left out.

    Low-pass filtered references (ISAC's references are tanh-filtered at 0.1-0.45 cycles/pixel) have
    (almost) no energy at ring frequencies ``m`` well above ``2 pi r f_c`` on ring ``r``; the products with
    those coefficients add (almost) nothing to the correlation curves. Every frequency band is cut into
    blocks of :data:`BLOCK_FREQS` frequencies; a block leaves out its innermost rings, or is left out whole,
    as long as all the coefficients left out hold together at most ``tolerance`` of the ring-weighted energy
    of every reference (each reference's share measured against its own energy, ``m >= 1`` counted twice as
    in the correlation curve; the largest share over the references is summed). The block holding ``m = 0``
    keeps all its rings (the ring normalisation of the images uses the whole ``m = 0`` term). Neighbouring
    blocks of a band that skip the same rings are merged.

    By Cauchy-Schwarz a curve then changes by at most ``sqrt(tolerance)`` times the product of the norms of
    the image's and the reference's spectra; in practice far less (``docs/deviations.md``).

    Parameters
    ----------
    prep : PreparedReferences
    tolerance : float
        Fraction of the energy that may be left out; 0 returns ``prep`` unchanged.

    Returns
    -------
    PreparedReferences
        ``prep`` with :attr:`PreparedReferences.blocks` set (``bands`` unchanged).
    """
    if not tolerance > 0:
        return prep
    parts, share, n_rings = _block_energy_shares(prep)
    skip = _ring_skips(share, n_rings, tolerance, keep_all=0)
    merged = []                                                 # [band, m_offset, m_count, skip]
    for (b, m_off, m_count), sk, nr in zip(parts, skip, n_rings):
        if sk >= nr:
            continue                                            # the whole block holds (almost) nothing
        last = merged[-1] if merged else None
        if last and last[0] == b and last[3] == sk and last[1] + last[2] == m_off:
            last[2] += m_count
        else:
            merged.append([b, m_off, m_count, int(sk)])
    blocks = tuple(Block(b, m_off, m_count, sk,
                         np.ascontiguousarray(prep.bands[b][3][m_off:m_off + m_count, 2 * sk:]))
                   for b, m_off, m_count, sk in merged)
    return dataclasses.replace(prep, blocks=blocks)


def _lattice_steps(x_range: float, y_range: float, step: float):
    """Whole-step trial offsets ``kx``, ``ky`` (int arrays, ``|k step| <= range``) of a search; checks the arguments."""
    step = float(step)
    if not step > 0:
        raise ValueError(f"step must be > 0, got {step}")
    if x_range < 0 or y_range < 0:
        raise ValueError("x_range and y_range must be >= 0")
    kxmax = int(np.floor(x_range / step + 1e-9))
    kymax = int(np.floor(y_range / step + 1e-9))
    return np.arange(-kxmax, kxmax + 1), np.arange(-kymax, kymax + 1)


def translation_lattice(x_range: float, y_range: float, step: float) -> np.ndarray:
    """Trial translations ``(k_x step, k_y step)``, ``|k_x step| <= x_range``, ``|k_y step| <= y_range``,
    order (y outer, x inner) as in the searches; ``(n_shifts, 2)`` float64 pixels."""
    kx, ky = _lattice_steps(x_range, y_range, step)
    gy, gx = np.meshgrid(ky * float(step), kx * float(step), indexing="ij")
    return np.column_stack([gx.reshape(-1), gy.reshape(-1)])


def _moved_references(refs: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """``(K * n_shifts, N, N)``: reference ``k`` with its point ``centre + u_j`` moved to the centre (row
    ``k * n_shifts + j``); whole-pixel ``u`` by an exact circular shift, others by a Fourier shift."""
    from isavar.core.fft import fourier_shift

    n_sh = len(shifts)
    out = np.empty((refs.shape[0] * n_sh,) + refs.shape[1:], np.float32)
    whole = np.all(shifts == np.rint(shifts))
    for j, (ux, uy) in enumerate(shifts):
        if whole:
            out[j::n_sh] = np.roll(refs, (-int(uy), -int(ux)), axis=(1, 2))
        else:
            out[j::n_sh] = fourier_shift(refs, np.array([-ux, -uy]))
    return out


def _reference_side_rings(refs: np.ndarray, grid: PolarGrid, shifts: np.ndarray):
    """The wider rings and moved references of a reference-side search (:func:`prepare_references`).

    Returns ``(wide, moved)``: ``wide`` has ``grid``'s rings continued (same step) to at least
    ``R + max |u|``; ``moved`` ``(K * n_shifts, M, M)`` are the references cut to the disc of radius ``R + 1/2``,
    padded by ``max |u| + 1`` on every side (so that no reference content wraps or leaves the box) and moved.
    """
    from isavar.core.masks import circular_mask

    reach = float(np.hypot(shifts[:, 0], shifts[:, 1]).max())
    step = int(grid.radii[1] - grid.radii[0]) if grid.n_rings > 1 else 1
    extra = step * int(np.ceil(reach / step - 1e-9))
    wide = polar_grid(int(grid.radii[0]), grid.last_ring + extra, step, grid.mode)
    box = refs.shape[1]
    pad = int(np.ceil(reach)) + 1
    cut = refs * circular_mask(box, grid.last_ring + 0.5).astype(np.float32)
    padded = np.pad(cut, ((0, 0), (pad, pad), (pad, pad)))
    check_fits(wide, padded.shape[1])
    return wide, _moved_references(padded, shifts)


def prepare_references(references, grid: PolarGrid, *, mirror: bool = True,
                       translations: tuple | None = None) -> PreparedReferences:
    """Prepare references for :func:`align_to_references` / :func:`align_to_reference`.

    The references are polar-sampled at the image centre (no shift, no ring normalisation),
    ring-FFT'd and weighted (SPHIRE ``Frngs`` + ``Applyws``, see :func:`isavar.core.polar.reference_spectra`).

    With ``translations = (x_range, y_range, step)`` the search's trial translations go to the reference side
    (isavar; ``docs/deviations.md``): a search then samples every image once, around its current particle centre
    ``s``, instead of around every trial centre. Each reference is cut to the disc of radius ``R + 1/2`` (``R`` the
    grid's last ring; its samples interpolate pixels out to ``R + 1``), moved so that its point ``u`` is at the
    centre, for every translation ``u`` of the lattice (:func:`translation_lattice`), and sampled on rings reaching
    ``R + max |u|``. The correlation of the image around ``s`` with such a reference is then the inner product of
    the image with the reference's disc placed at ``s - u`` in the image: SPHIRE's score for the trial centre
    ``s + d`` with ``d`` the image-frame counterpart of ``u`` (up to the disc's half-pixel edge), with the lattice
    fixed in the reference's frame instead of the image's. (Sampling the reference around ``u`` on the rings up to ``R``
    only would cut the image's disc at ``s`` and bias the search towards the current centre.) An image is
    polar-sampled and ring-FFT'd once per search instead of once per translation: most of the cost with few
    references or a wide translational range.

    Parameters
    ----------
    references : (n_refs, N, N) or (N, N) array_like
    grid : PolarGrid
        Ring geometry (mode "F").
    mirror : bool
        Prepare the mirrored correlation as well.
    translations : (x_range, y_range, step), optional
        Trial translations (pixels) prepared on the reference side; a search with these references must use
        the same ranges and step.

    Returns
    -------
    PreparedReferences
    """
    if grid.mode != "F":
        raise ValueError("the aligner needs a full-circle ('F') polar grid")
    refs = np.asarray(references, dtype=np.float32)
    if refs.ndim == 2:
        refs = refs[None]
    if refs.ndim != 3 or refs.shape[1] != refs.shape[2]:
        raise ValueError(f"references must be (n, N, N) or (N, N) square, got shape {np.shape(references)}")
    box = refs.shape[1]
    check_fits(grid, box)
    shifts = rings = None
    if translations is not None:
        translations = tuple(float(v) for v in translations)
        shifts = translation_lattice(*translations)
        rings = grid
        grid, refs = _reference_side_rings(refs, rings, shifts)
    n_refs = refs.shape[0]
    polar = polar_transform(refs, grid)                                     # (K, L)
    ring_sum = polar.astype(np.float64) @ grid.sample_weights
    spectra = reference_spectra(polar, grid)                                # per group (K, R_g, M_g)
    n_cols = 4 if mirror else 2
    bands = []
    for m_lo, m_hi, r_first, g_first in _freq_bands(grid):
        n_band = m_hi - m_lo
        n_rings = grid.n_rings - r_first
        a = np.empty((n_band, n_rings, n_refs), dtype=np.complex64)        # (m, r, k)
        for g in range(g_first, len(grid.groups)):
            _, r0, r1, _, _ = grid.groups[g]
            a[:, r0 - r_first:r1 - r_first, :] = spectra[g][:, :, m_lo:m_hi].transpose(2, 1, 0)
        # contraction axis interleaved (ring, Re/Im) so that a complex64 image spectrum (m, rows, rings)
        # viewed as float32 is directly the left operand
        w = np.empty((n_band, n_rings, 2, n_refs, n_cols), dtype=np.float32)
        are, aim = a.real, a.imag
        w[:, :, 0, :, 0], w[:, :, 1, :, 0] = are, aim                      # Re sum A conj B
        w[:, :, 0, :, 1], w[:, :, 1, :, 1] = aim, -are                     # Im sum A conj B
        if mirror:
            w[:, :, 0, :, 2], w[:, :, 1, :, 2] = are, -aim                 # Re sum conj(A B)
            w[:, :, 0, :, 3], w[:, :, 1, :, 3] = -aim, -are                # Im sum conj(A B)
        bands.append((m_lo, m_hi, r_first, w.reshape(n_band, 2 * n_rings, n_refs * n_cols)))
    return PreparedReferences(grid=grid, box=box, n_refs=n_refs, mirror=bool(mirror), ring_sum=ring_sum,
                              bands=tuple(bands), translations=translations, shifts=shifts, rings=rings)


def peak_offset(values) -> np.ndarray:
    """Vertex offset of the least-squares parabola through 7 equally spaced samples (SPHIRE ``prb1d``).

    Parameters
    ----------
    values : (..., 7) array_like
        Samples at positions -3 .. 3 around an integer maximum.

    Returns
    -------
    numpy.ndarray
        float64 ``(...)`` offset of the vertex from the centre sample (unclamped; 0 where the fitted
        curvature is 0).
    """
    y = np.asarray(values, dtype=np.float64)
    d = np.arange(-3, 4, dtype=np.float64)
    lin = (y @ d) / 28.0
    quad = (y @ (d * d - 4.0)) / 84.0
    safe = np.where(quad != 0.0, quad, 1.0)
    return np.where(quad != 0.0, -lin / (2.0 * safe), 0.0)


_D7 = np.arange(-3, 4, dtype=np.float64)


def _parabola_vertex(vals: np.ndarray) -> np.ndarray:
    """:func:`peak_offset` for samples stacked along axis 0, ``vals`` (7, Q)."""
    v = vals.astype(np.float64)
    lin = (_D7 @ v) / 28.0
    quad = ((_D7 * _D7 - 4.0) @ v) / 84.0
    safe = np.where(quad != 0.0, quad, 1.0)
    return np.where(quad != 0.0, -lin / (2.0 * safe), 0.0)


def search_offsets(centre, box: int, last_ring: int, search_range: float, step: float):
    """Allowed trial offsets along one axis (SPHIRE ``search_range``).

    Parameters
    ----------
    centre : array_like
        Particle-centre coordinate ``s`` (pixels from ``box // 2``) of every image.
    box, last_ring : int
        Image size N and outer ring radius ``ou``.
    search_range, step : float
        Maximum translation (``xr``) and step (``ts``) in pixels.

    Returns
    -------
    k_lo, k_hi : numpy.ndarray
        int arrays: trial offsets are ``k * step`` for ``k_lo <= k <= k_hi`` (``k_lo <= 0 <= k_hi``), with
        ``left = min(N//2 - ou - 1 + s, xr)``, ``right = min(N - N//2 - 1 - s - ou, xr)`` clipped at 0,
        ``k_lo = -int(left / step)``, ``k_hi = int(right / step)``.
    """
    s = np.asarray(centre, dtype=np.float64)
    left = np.clip(np.minimum(box // 2 - last_ring - 1 + s, search_range), 0.0, None)
    right = np.clip(np.minimum(box - box // 2 - 1 - s - last_ring, search_range), 0.0, None)
    return -np.floor(left / step + 1e-9).astype(np.int64), np.floor(right / step + 1e-9).astype(np.int64)


def _parse_params(initial_params, n: int):
    """(alpha, sx, sy, mirror) float64 arrays (n,) from None, an (n, 4) array or an object with fields."""
    if initial_params is None:
        z = np.zeros(n)
        return z, z.copy(), z.copy(), z.copy()
    if hasattr(initial_params, "alpha"):
        cols = [np.asarray(getattr(initial_params, k), dtype=np.float64) for k in ("alpha", "sx", "sy", "mirror")]
    else:
        arr = np.asarray(initial_params, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != 4:
            raise ValueError(f"initial_params must be (n, 4) [alpha, sx, sy, mirror], got shape {arr.shape}")
        cols = [arr[:, i] for i in range(4)]
    cols = [np.broadcast_to(c, (n,)).astype(np.float64) for c in cols]
    if cols[0].shape != (n,):
        raise ValueError(f"initial_params must describe {n} images")
    return tuple(cols)


def particle_centres(initial_params, n: int, box: int, last_ring: int, *, center_shift=None,
                     out_of_range: str = "clamp") -> np.ndarray:
    """Particle centres ``s = -R(-alpha) t`` (pixels from ``box // 2``) of the current parameters (spec §4.8 steps 1-2).

    Parameters
    ----------
    initial_params : None, (n, 4) array_like or object with alpha/sx/sy/mirror arrays
    n, box, last_ring : int
    center_shift : (2,) array_like, optional
        ``cs``: parameters are first combined with ``(0, -cs, 0)`` (``ali2d_single_iter``).
    out_of_range : {"clamp", "reset", "keep"}
        With ``mashi = box // 2 - last_ring - 1``: "clamp" clips each coordinate of s to ``[-mashi, mashi]``
        (``ali2d_single_iter``), "reset" sets s to 0 when either coordinate exceeds mashi
        (the EQK-means step, where the image's parameters are reset to identity), "keep" leaves s as is.

    Returns
    -------
    (n, 2) float64 array ``(s_x, s_y)``.
    """
    alpha, sx, sy, mirror = _parse_params(initial_params, n)
    if center_shift is not None:
        cs = np.asarray(center_shift, dtype=np.float64).reshape(2)
        # combine(P, (0, -cs, 0)): t - cs without mirror, t + (cs_x, -cs_y) with mirror
        sx = np.where(mirror > 0.5, sx + cs[0], sx - cs[0])
        sy = sy - cs[1]
    a = np.deg2rad(alpha)
    ca, sa = np.cos(a), np.sin(a)
    s = np.stack([-(ca * sx - sa * sy), -(sa * sx + ca * sy)], axis=-1)
    mashi = box // 2 - last_ring - 1
    if out_of_range == "clamp":
        s = np.clip(s, -mashi, mashi)
    elif out_of_range == "reset":
        s[np.any(np.abs(s) > mashi, axis=-1)] = 0.0
    elif out_of_range != "keep":
        raise ValueError(f"out_of_range must be 'clamp', 'reset' or 'keep', got {out_of_range!r}")
    return s


def _discrete_columns(maxrin: int, delta: float) -> np.ndarray | None:
    """Correlation indices examined by a discrete-angle pass (SPHIRE ``Crosrng_ms_delta``), None for delta = 0."""
    if delta <= 0:
        return None
    jstep = max(1, int(delta / 360.0 * maxrin))
    return np.arange(0, maxrin, jstep)


def _curves_peaks(prep: PreparedReferences, spectra, q0: int, q1: int, k0: int, k1: int, delta_cols, pairs=None):
    """Peak of every correlation curve for image rows [q0, q1) x references [k0, k1).

    Returns peak value and peak position (fractional index into the maxrin curve), each
    (q1 - q0, k1 - k0, n_curves) with n_curves = 2 (straight, mirror) or 1. With ``pairs``
    ``(q1 - q0, k1 - k0)`` bool, the inverse FFTs and peak searches (most of the cost) are made only for those
    (row, reference) curves; the others get peak -inf and position 0 (the computed ones are the same numbers
    as without ``pairs``).
    """
    grid = prep.grid
    n_cols = 4 if prep.mirror else 2
    n_curves = n_cols // 2
    n_k = k1 - k0
    n_rows = q1 - q0
    # every frequency is written by a block unless the reference is band-limited (zeros in the gaps)
    x = (np.zeros if prep.blocks else np.empty)((grid.n_freq, n_rows, n_k * n_cols), dtype=np.float32)
    for (band, m_off, m_count, _skip, w), b in zip(_blocks(prep), spectra):  # Block fields
        wk = w[:, :, k0 * n_cols:k1 * n_cols] if (k0, k1) != (0, prep.n_refs) else w
        m0 = prep.bands[band][0] + m_off
        np.matmul(b[q0:q1].transpose(1, 0, 2), wk, out=x[m0:m0 + m_count])
    xc = x.view(np.complex64)                                                # (M, rows, n_k * n_cols / 2)
    shape = (n_rows, n_k, n_curves)
    if pairs is None or pairs.all():
        corr = scipy.fft.irfft(xc, n=grid.maxrin, axis=0)                   # (maxrin, rows, n_k * curves)
        peak, pos = _curve_peaks(corr.reshape(grid.maxrin, -1), delta_cols, grid.maxrin)
        return peak.reshape(shape), pos.reshape(shape)
    chosen = np.flatnonzero(np.repeat(np.asarray(pairs, bool).reshape(-1), n_curves))
    peak = np.full(n_rows * n_k * n_curves, -np.inf)
    pos = np.zeros(n_rows * n_k * n_curves)
    if chosen.size:
        picked = np.ascontiguousarray(xc.reshape(grid.n_freq, -1)[:, chosen])
        corr = scipy.fft.irfft(picked, n=grid.maxrin, axis=0)                # (maxrin, chosen curves)
        peak[chosen], pos[chosen] = _curve_peaks(corr, delta_cols, grid.maxrin)
    return peak.reshape(shape), pos.reshape(shape)


def _curve_peaks(corr, delta_cols, maxrin: int):
    """Peak value and fractional position of every curve (column) of ``corr`` ``(maxrin, Q)``, as
    :func:`_curves_peaks` finds them."""
    if USE_KERNELS:
        return _kernels.curve_peaks_t(corr, delta_cols)
    q = corr.shape[1]
    # peak search along axis 0 without transposing: maximum, then the *last* index reaching it
    # (SPHIRE keeps the later index on ties)
    cand = corr if delta_cols is None else corr[delta_cols]
    peak = cand.max(axis=0)
    # index of the last maximum = max over k of k * [c_k == peak] (contiguous reductions only)
    kdt = np.uint8 if cand.shape[0] <= 256 else np.uint32
    ks = np.arange(cand.shape[0], dtype=kdt)[:, None]
    last = np.multiply((cand == peak).view(np.uint8), ks, dtype=kdt).max(axis=0).astype(np.int64)
    if delta_cols is None:
        rows = (last[None, :] + np.arange(-3, 4)[:, None]) % maxrin         # samples at j + d, d = -3..3
        vals = corr.reshape(-1)[rows * q + np.arange(q)[None, :]]           # (7, Q)
        pos = last + _parabola_vertex(vals)
    else:
        pos = delta_cols[last].astype(np.float64)
    return peak, pos


def _band_spectra(prep: PreparedReferences, polar: np.ndarray) -> list[np.ndarray]:
    """Image ring spectra rearranged per frequency band as float32 ``(rows, m, 2 * rings)`` arrays.

    The last axis interleaves (Re, Im) of every ring of the band (the layout of the weight matrices);
    every row is contiguous (cheap to store and gather), and ``b.transpose(1, 0, 2)`` is a valid
    BLAS operand of the batched product.
    """
    grid = prep.grid
    spectra = ring_spectra(polar, grid)                                      # per group (rows, R_g, M_g)
    rows = polar.shape[0]
    if USE_KERNELS:
        out = [np.empty((rows, m_hi - m_lo, 2 * (grid.n_rings - r_first)), dtype=np.float32)
               for m_lo, m_hi, r_first, _w in prep.bands]
        _kernels.to_bands(spectra, [g[1] for g in grid.groups],
                          [(m_lo, m_hi, r_first) for m_lo, m_hi, r_first, _w in prep.bands], out)
        return out
    out = []
    for m_lo, m_hi, r_first, _w in prep.bands:
        n_rings = grid.n_rings - r_first
        b = np.empty((rows, m_hi - m_lo, n_rings), dtype=np.complex64)
        for g, (_n_r, r0, r1, _s0, _s1) in enumerate(grid.groups):
            if r1 <= r_first:
                continue
            b[:, :, r0 - r_first:r1 - r_first] = spectra[g][:, :, m_lo:m_hi].transpose(0, 2, 1)
        out.append(b.view(np.float32))
    return out


def _trial_centres(centre: float, s: np.ndarray, kx: np.ndarray, ky: np.ndarray, step: float):
    """(n, n_shifts) sampling centres x, y of all trials, order (iy, ix)."""
    offx = np.broadcast_to((kx * step)[None, :], (ky.size, kx.size)).reshape(-1)
    offy = np.broadcast_to((ky * step)[:, None], (ky.size, kx.size)).reshape(-1)
    return centre + s[:, 0:1] + offx[None], centre + s[:, 1:2] + offy[None]


def _image_ring_stats(prep: PreparedReferences, polar: np.ndarray):
    """:func:`_ring_stats` of images sampled on ``prep.grid``, over the search's own rings (SPHIRE normalises
    the rings it correlates; a reference-side ``prep`` samples wider ones, whose first samples are these)."""
    if prep.rings is None:
        return _ring_stats(polar, prep.grid)
    return _ring_stats(polar[:, :prep.rings.lcirc], prep.rings)


def _ring_stats(polar: np.ndarray, grid: PolarGrid):
    """Arc-length weighted mean and std (std 0 -> 1) of polar rows (SPHIRE Normalize_ring statistics)."""
    wts = (grid.sample_weights / grid.sample_weights.sum()).astype(np.float32)
    mean = (polar @ wts).astype(np.float64)
    var = np.maximum((polar * polar) @ wts - mean * mean, 0.0)
    std = np.sqrt(var)
    return mean, np.where(std > 0, std, 1.0)


def _search_chunk(prep: PreparedReferences, images: np.ndarray, s: np.ndarray, kx: np.ndarray, ky: np.ndarray,
                  step: float, valid: np.ndarray, delta_cols, normalize: bool, img_block: int, ref_block: int,
                  cache: SpectraCache | None = None, i0: int = 0, coarse_rows: int = 0, pairs=None):
    """Best (score, alpha, ix, iy, mirror) per (image, reference) for one chunk of images (``pairs``
    ``(n, K)`` bool: only those; the others score -inf)."""
    grid = prep.grid
    n, box = images.shape[0], images.shape[1]
    flat = images.reshape(-1)
    centre = float(box // 2)
    n_sh = ky.size * kx.size
    # polar sampling and ring FFTs in small sub-chunks (memory-bound steps), curves over the whole chunk
    sub = max(1, P_ROWS // n_sh)
    fmax = min(COARSE_SHIFT_FREQ, prep.grid.n_freq - 1)
    if (coarse_rows and cache is not None and prep.n_refs == 1 and n_sh > coarse_rows
            and (delta_cols is None or not np.any(delta_cols * (2 * fmax) % prep.grid.maxrin))):
        return _search_chunk_coarse_to_fine(prep, images, s, kx, ky, step, valid, delta_cols, normalize, cache, i0,
                                            coarse_rows)
    blocks = _blocks(prep)
    spectra = [np.empty((n * n_sh,) + blk.w.shape[:2], np.float32) for blk in blocks]
    mean = np.empty(n * n_sh)
    std = np.empty(n * n_sh)
    if cache is not None:                                                    # one lookup for the whole chunk
        cache._chunk(prep, images, i0, s, kx, ky, step, spectra, mean, std)
    else:
        for j0 in range(0, n, sub):
            j1 = min(n, j0 + sub)
            r0, r1 = j0 * n_sh, j1 * n_sh
            fl = flat[j0 * box * box:j1 * box * box]
            m = j1 - j0
            if float(step).is_integer():
                ox = (kx * int(step)).astype(np.int64)
                oy = (ky * int(step)).astype(np.int64)
                polar = _gather_polar(fl, box, np.arange(m), centre + s[j0:j1, 0], centre + s[j0:j1, 1], grid,
                                      ox, oy)
            else:
                cx, cy = _trial_centres(centre, s[j0:j1], kx, ky, step)
                polar = _gather_polar(fl, box, np.repeat(np.arange(m), n_sh), cx.reshape(-1), cy.reshape(-1),
                                      grid, np.zeros(1, np.int64), np.zeros(1, np.int64))
            polar = polar.reshape(m * n_sh, grid.lcirc)                      # rows = (image, iy, ix)
            if normalize:
                mean[r0:r1], std[r0:r1] = _image_ring_stats(prep, polar)
            band_spec = _band_spectra(prep, polar)
            for dst, blk in zip(spectra, blocks):
                dst[r0:r1] = _block_part(band_spec[blk.band], blk)
    n_refs = prep.n_refs
    n_curves = 2 if prep.mirror else 1
    if coarse_rows and n_refs > 1 and n_sh > coarse_rows and delta_cols is None:
        peak, pos = _peaks_at_shift_candidates(prep, spectra, mean if normalize else None, std, valid,
                                               img_block, ref_block, coarse_rows)
    else:
        peak = np.empty((n, n_sh, n_refs, n_curves), np.float64)
        pos = np.empty((n, n_sh, n_refs, n_curves), np.float64)
        for i0 in range(0, n, img_block):
            i1 = min(n, i0 + img_block)
            for k0 in range(0, n_refs, ref_block):
                k1 = min(n_refs, k0 + ref_block)
                rows = None if pairs is None else np.repeat(pairs[i0:i1, k0:k1], n_sh, axis=0)
                pk, ps = _curves_peaks(prep, spectra, i0 * n_sh, i1 * n_sh, k0, k1, delta_cols, rows)
                peak[i0:i1, :, k0:k1] = pk.reshape(i1 - i0, n_sh, k1 - k0, n_curves)
                pos[i0:i1, :, k0:k1] = ps.reshape(i1 - i0, n_sh, k1 - k0, n_curves)
    if normalize:
        peak -= (mean.reshape(n, n_sh)[:, :, None, None] * prep.ring_sum[None, None, :, None])
        peak /= std.reshape(n, n_sh)[:, :, None, None]
    return _select(peak, pos, valid, kx, ky, step, grid)


def _coarse_row_scores(prep: PreparedReferences, spectra, q0: int, q1: int, mean, std) -> np.ndarray:
    """Coarse score of image rows ``[q0, q1)`` against every reference, ``(q1 - q0, K)`` float64.

    The correlation curves restricted to ring frequencies ``m <= MULTI_SHIFT_FREQ`` (sampled every
    ``180 / MULTI_SHIFT_FREQ`` degrees), best of the straight and mirrored curve, on the scale of the full
    curves and ring-normalised with ``mean``/``std`` (per row; ``mean`` None: not normalised).
    """
    grid = prep.grid
    fmax = min(MULTI_SHIFT_FREQ, grid.n_freq - 1)
    n_cols = 4 if prep.mirror else 2
    x = np.zeros((fmax + 1, q1 - q0, prep.n_refs * n_cols), np.float32)
    for (band, m_off, m_count, _skip, w), b in zip(_blocks(prep), spectra):  # Block fields
        m0 = prep.bands[band][0] + m_off
        top = min(m0 + m_count, fmax + 1)
        if top > m0:
            np.matmul(b[q0:q1, :top - m0].transpose(1, 0, 2), w[:top - m0], out=x[m0:top])
    curves = scipy.fft.irfft(x.view(np.complex64), n=2 * fmax, axis=0)          # (2 fmax, rows, K * curves)
    coarse = curves.max(axis=0).reshape(q1 - q0, prep.n_refs, n_cols // 2).max(axis=-1).astype(np.float64)
    coarse *= 2 * fmax / grid.maxrin
    if mean is not None:
        coarse -= mean[q0:q1, None] * prep.ring_sum[None, :]
        coarse /= std[q0:q1, None]
    return coarse


def _peaks_at_shift_candidates(prep: PreparedReferences, spectra, mean, std, valid, img_block: int,
                               ref_block: int, n_keep: int):
    """Correlation peaks of the ``n_keep`` most promising trial translations of every image (multi-reference).

    Every trial translation of an image is scored coarsely against every reference
    (:func:`_coarse_row_scores`); the ``n_keep`` translations with the highest score against any reference
    (later translations first on ties) get the full correlation curves against every reference, the others
    peak ``-inf``.

    Parameters
    ----------
    prep : PreparedReferences
    spectra : list of ndarray
        The images' block spectra, rows ``(image, translation)``.
    mean, std : ndarray, (n * n_sh,) or None
        Ring statistics of the rows (``mean`` None: the images are not ring-normalised).
    valid : ndarray of bool, (n, n_sh)
        Translations inside the search range.
    img_block, ref_block : int
        Images and references per block of full curves.
    n_keep : int
        Translations per image searched at every frequency, less than ``n_sh``.

    Returns
    -------
    peak, pos : ndarray, (n, n_sh, K, curves) float64
        As the full search's, unnormalised; ``-inf`` (peak) and 0 (pos) at the translations not kept.
    """
    n, n_sh = valid.shape
    n_refs = prep.n_refs
    n_curves = 2 if prep.mirror else 1
    best = np.empty(n * n_sh)
    for i0 in range(0, n, img_block):
        i1 = min(n, i0 + img_block)
        best[i0 * n_sh:i1 * n_sh] = _coarse_row_scores(prep, spectra, i0 * n_sh, i1 * n_sh, mean, std).max(axis=1)
    best = np.where(valid, best.reshape(n, n_sh), -np.inf)
    # the n_keep best translations of every image (later translations first on ties), in translation order
    order = np.sort(n_sh - 1 - np.argsort(-best[:, ::-1], axis=1, kind="stable")[:, :n_keep], axis=1)
    rows = (np.arange(n)[:, None] * n_sh + order).reshape(-1)
    kept = [np.take(b, rows, axis=0) for b in spectra]
    peak = np.full((n, n_sh, n_refs, n_curves), -np.inf)
    pos = np.zeros((n, n_sh, n_refs, n_curves))
    for i0 in range(0, n, img_block):
        i1 = min(n, i0 + img_block)
        image, shift = np.arange(i0, i1)[:, None], order[i0:i1]
        for k0 in range(0, n_refs, ref_block):
            k1 = min(n_refs, k0 + ref_block)
            pk, ps = _curves_peaks(prep, kept, i0 * n_keep, i1 * n_keep, k0, k1, None)
            peak[image, shift, k0:k1] = pk.reshape(i1 - i0, n_keep, k1 - k0, n_curves)
            pos[image, shift, k0:k1] = ps.reshape(i1 - i0, n_keep, k1 - k0, n_curves)
    return peak, pos


def _select(peak, pos, valid, kx, ky, step, grid):
    """Best (score, alpha, ix, iy, mirror) per (image, reference) from peaks ``(n, n_sh, K, curves)``."""
    n_curves = peak.shape[-1]
    n_sh = peak.shape[1]
    if n_curves == 2:
        use_m = peak[..., 1] > peak[..., 0]                                  # straight wins ties
        score = np.where(use_m, peak[..., 1], peak[..., 0])
        p = np.where(use_m, pos[..., 1], pos[..., 0])
    else:
        use_m = np.zeros(peak.shape[:3], bool)
        score = peak[..., 0]
        p = pos[..., 0]
    score = np.where(valid[:, :, None], score, -np.inf)                      # (n, n_sh, K)
    # later translations win ties: first maximum of the reversed translation order
    jrev = np.argmax(score[:, ::-1, :], axis=1)
    best_shift = n_sh - 1 - jrev                                              # (n, K)
    take = best_shift[:, None, :]
    best_score = np.take_along_axis(score, take, axis=1)[:, 0].astype(np.float32)
    p = np.take_along_axis(p, take, axis=1)[:, 0]
    best_alpha = np.mod(360.0 * p / grid.maxrin, 360.0)
    best_mirror = np.take_along_axis(use_m, take, axis=1)[:, 0].astype(np.int8)
    iy = ky[best_shift // kx.size] * step
    ix = kx[best_shift % kx.size] * step
    return best_score, best_alpha, ix, iy, best_mirror


#: highest ring frequency of the coarse curves that pick the trial translations refined exactly
COARSE_SHIFT_FREQ = 16
#: the same for the multi-reference search (``shift_candidates``; 24 chose the full search's translation for
#: the best reference more often than 16 at little more cost: docs/deviations.md)
MULTI_SHIFT_FREQ = 24


def _rows_spectra(store, extra, index, rows, bands):
    """Band spectra ``bands`` of the trial rows ``rows`` (store rows where ``index >= 0``, else ``extra``)."""
    idx = index[rows]
    ok = idx >= 0
    out = []
    for b in bands:
        if ok.all():
            out.append(np.take(store[b], idx, axis=0))
        else:
            dst = np.empty((rows.size,) + store[b].shape[1:], np.float32)
            dst[ok] = store[b][idx[ok]]
            dst[~ok] = extra[b][-1 - idx[~ok]]
            out.append(dst)
    return out


def _search_chunk_coarse_to_fine(prep, images, s, kx, ky, step, valid, delta_cols, normalize, cache, i0,
                                 coarse_rows):
    """:func:`_search_chunk` for one reference with cached spectra, coarse to fine over the translations.

    Every trial translation gets a coarse score (the correlation curves restricted to ring frequencies
    ``m <= COARSE_SHIFT_FREQ``, sampled every ``180 / COARSE_SHIFT_FREQ`` degrees, peak of the straight and
    mirrored curve); the ``coarse_rows`` best translations of each image are then searched exactly (full
    curves, parabola refinement) and the best of them is returned, with the tie rules of the full search.
    """
    grid = prep.grid
    n = images.shape[0]
    n_sh = ky.size * kx.size
    index, extra, mean, std = cache._lookup(prep, images, i0, s, kx, ky, step)
    store = cache._store(prep)
    n_cols = 4 if prep.mirror else 2
    n_curves = n_cols // 2
    fmax = min(COARSE_SHIFT_FREQ, grid.n_freq - 1)
    low = [b for b, band in enumerate(prep.bands) if band[0] <= fmax]
    all_rows = np.arange(n * n_sh)
    low_spec = _rows_spectra(store, extra, index, all_rows, low)
    x = np.zeros((fmax + 1, n * n_sh, n_cols), np.float32)
    for b, spec in zip(low, low_spec):
        m_lo, m_hi, _r, w = prep.bands[b]
        top = min(m_hi, fmax + 1)
        np.matmul(spec[:, :top - m_lo].transpose(1, 0, 2), w[:top - m_lo], out=x[m_lo:top])
    curves = scipy.fft.irfft(x.view(np.complex64), n=2 * fmax, axis=0)          # (2 fmax, rows, curves)
    if delta_cols is not None:                                  # a discrete pass: the same angles, coarsely
        curves = curves[delta_cols * (2 * fmax) // grid.maxrin]
    coarse = curves.max(axis=0).max(axis=-1)
    coarse = coarse.astype(np.float64)
    if normalize:
        coarse = (coarse * (2 * fmax / grid.maxrin) - mean * prep.ring_sum[0]) / std
    coarse = np.where(valid.reshape(-1), coarse, -np.inf).reshape(n, n_sh)
    # the coarse_rows best translations of every image (later translations first on ties)
    order = n_sh - 1 - np.argsort(-coarse[:, ::-1], axis=1, kind="stable")[:, :coarse_rows]   # (n, R)
    rows = (np.arange(n)[:, None] * n_sh + order).reshape(-1)
    spec = _rows_spectra(store, extra, index, rows, range(len(prep.bands)))
    spec = [_block_part(spec[blk.band], blk) for blk in _blocks(prep)]
    pk, ps = _curves_peaks(prep, spec, 0, rows.size, 0, 1, delta_cols)         # (n R, 1, curves)
    peak = pk.reshape(n, coarse_rows, n_curves)
    pos = ps.reshape(n, coarse_rows, n_curves)
    if normalize:
        peak = (peak - (mean[rows] * prep.ring_sum[0]).reshape(n, coarse_rows, 1)) / std[rows].reshape(
            n, coarse_rows, 1)
    if n_curves == 2:
        use_m = peak[..., 1] > peak[..., 0]
        score = np.where(use_m, peak[..., 1], peak[..., 0])
        p = np.where(use_m, pos[..., 1], pos[..., 0])
    else:
        use_m = np.zeros(peak.shape[:2], bool)
        score, p = peak[..., 0], pos[..., 0]
    score = np.where(np.take_along_axis(valid, order, axis=1), score, -np.inf)
    # the best refined translation; ties go to the later translation, as in the full search
    best = _best_later(score, order)
    take = best[:, None]
    shift = np.take_along_axis(order, take, axis=1)[:, 0]
    best_score = np.take_along_axis(score, take, axis=1)[:, 0].astype(np.float32)
    best_alpha = np.mod(360.0 * np.take_along_axis(p, take, axis=1)[:, 0] / grid.maxrin, 360.0)
    best_mirror = np.take_along_axis(use_m, take, axis=1)[:, 0].astype(np.int8)
    iy = ky[shift // kx.size] * step
    ix = kx[shift % kx.size] * step
    return best_score[:, None], best_alpha[:, None], ix[:, None], iy[:, None], best_mirror[:, None]


def _best_later(score, order):
    """Per row, the column of the largest score; among equal scores the one with the larger ``order``."""
    top = score.max(axis=1, keepdims=True)
    cand = np.where(score == top, order, -1)
    return np.argmax(cand, axis=1)


def _assemble(alpha, ix, iy, s):
    """Parameters combine((0, -s, 0), (alpha, R(alpha)(-ix, -iy), m)) = (alpha, -R(alpha)(s + d), m)."""
    a = np.deg2rad(alpha)
    ca, sa = np.cos(a), np.sin(a)
    wx = s[:, 0:1] + ix
    wy = s[:, 1:2] + iy
    sx = -(ca * wx + sa * wy)
    sy = -(-sa * wx + ca * wy)
    return wrap_degrees(alpha), sx, sy


def _run(images, prep: PreparedReferences, *, x_range, y_range, step, delta, normalize, s, chunk_size,
         pair_budget, cache=None, coarse_rows=0, pairs=None):
    grid = prep.grid
    stack = np.asarray(images, dtype=np.float32)
    n, box = stack.shape[0], stack.shape[1]
    if box != prep.box:
        raise ValueError(f"images are {box} px but the references are {prep.box} px")
    step = float(step)
    kx, ky = _lattice_steps(x_range, y_range, step)
    n_sh = kx.size * ky.size
    xlo, xhi = search_offsets(s[:, 0], box, grid.last_ring, x_range, step)
    ylo, yhi = search_offsets(s[:, 1], box, grid.last_ring, y_range, step)
    vx = (kx[None, :] >= xlo[:, None]) & (kx[None, :] <= xhi[:, None])
    vy = (ky[None, :] >= ylo[:, None]) & (ky[None, :] <= yhi[:, None])
    valid = (vy[:, :, None] & vx[:, None, :]).reshape(n, n_sh)
    delta_cols = _discrete_columns(grid.maxrin, float(delta))
    # curves are computed in blocks of ~pair_budget (image x shift x reference) pairs: whole images
    # (all their shifts, about MAX_ROWS rows: the matrix products run near peak speed for ~70 rows x
    # tens of references) x a block of references
    img_block = max(1, max(MAX_ROWS, pair_budget // prep.n_refs) // n_sh)
    ref_block = max(1, min(prep.n_refs, pair_budget // (n_sh * img_block)))
    if chunk_size is None:
        chunk_size = img_block
    chunk_size = int(chunk_size)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    img_block = min(img_block, chunk_size)
    score = np.empty((n, prep.n_refs), np.float32)
    alpha = np.empty((n, prep.n_refs), np.float64)
    ix = np.empty((n, prep.n_refs), np.float64)
    iy = np.empty((n, prep.n_refs), np.float64)
    mirror = np.empty((n, prep.n_refs), np.int8)
    if cache is not None:
        if not isinstance(cache, SpectraCache):
            raise ValueError(f"cache must be a SpectraCache, got {type(cache).__name__}")
        if float(step).is_integer():
            # lattice offsets from an image's first centre: centres stay within +-mashi, trials add +-range
            half = 2 * (box // 2 - grid.last_ring) + max(kx[-1], ky[-1]) * int(step) + 1
            cache._bind(prep, stack, s, half)
        else:
            cache = None                                                      # lattice needs integer steps
    for i0 in range(0, n, chunk_size):
        i1 = min(n, i0 + chunk_size)
        res = _search_chunk(prep, np.ascontiguousarray(stack[i0:i1]), s[i0:i1], kx, ky, step, valid[i0:i1],
                            delta_cols, normalize, img_block, ref_block, cache, i0, coarse_rows,
                            None if pairs is None else pairs[i0:i1])
        score[i0:i1], alpha[i0:i1], ix[i0:i1], iy[i0:i1], mirror[i0:i1] = res
    alpha, sx, sy = _assemble(alpha, ix, iy, s)
    return score, alpha.astype(np.float32), sx.astype(np.float32), sy.astype(np.float32), mirror


def _reference_side(prep: PreparedReferences, x_range, y_range, step) -> bool:
    """Whether ``prep`` holds reference-side translations; they must be the search's."""
    if prep.translations is None:
        return False
    if not np.allclose(prep.translations, (x_range, y_range, step)):
        raise ValueError(f"the references were prepared at translations (x_range, y_range, step) = "
                         f"{prep.translations}, the search asks for {(x_range, y_range, step)}")
    return True


def _fold_translations(prep: PreparedReferences, box: int, s: np.ndarray, score, alpha, sx, sy, mirror):
    """Best translation per (image, reference) of a reference-side search.

    The search aligned every image at its centre ``s`` to every reference sampled around ``u_j``; the result
    ``t'`` (image point ``s`` to the reference's centre) becomes ``t = t' + M^m u_j`` (image point ``s`` to the
    reference point ``u_j``). As in the image-side search (SPHIRE ``search_range``), a translation is allowed
    only if the new particle centre ``-R(-alpha) t`` keeps the rings inside the image (the current centre is
    always allowed); among the allowed ones the best score wins, ties going to the later translation.

    Parameters
    ----------
    prep : PreparedReferences
        With ``shifts`` (``n_shifts`` translations).
    box : int
    s : (n, 2) float64
        Particle centres the images were sampled around.
    score, alpha, sx, sy, mirror : (n, K * n_shifts) arrays
        The search's result per (image, reference column).

    Returns
    -------
    score, alpha, sx, sy, mirror : (n, K) arrays
    """
    n = score.shape[0]
    n_sh = len(prep.shifts)
    shape = (n, prep.n_refs // n_sh, n_sh)
    score, alpha, sx, sy, mirror = (a.reshape(shape) for a in (score, alpha, sx, sy, mirror))
    ux, uy = prep.shifts[:, 0], prep.shifts[:, 1]
    flip = mirror > 0
    tx = sx.astype(np.float64) + np.where(flip, -ux, ux)
    ty = sy.astype(np.float64) + uy
    a = np.deg2rad(alpha.astype(np.float64))
    ca, sa = np.cos(a), np.sin(a)
    cx, cy = -(ca * tx - sa * ty), -(sa * tx + ca * ty)
    last = prep.rings.last_ring
    lo, hi = -(box // 2 - last - 1) - 1e-6, box - box // 2 - 1 - last + 1e-6
    allowed = (cx >= lo) & (cx <= hi) & (cy >= lo) & (cy <= hi)
    allowed |= np.all(prep.shifts == 0.0, axis=1)                            # the current centre
    masked = np.where(allowed, score, -np.inf)
    best = n_sh - 1 - np.argmax(masked[:, :, ::-1], axis=2)                  # later translations win ties
    take = best[:, :, None]
    pick = lambda v: np.take_along_axis(v, take, axis=2)[:, :, 0]           # noqa: E731
    return (pick(score), pick(alpha), pick(tx).astype(np.float32), pick(ty).astype(np.float32), pick(mirror))


def _as_images(images, grid: PolarGrid):
    stack = np.asarray(images, dtype=np.float32)
    if stack.ndim == 2:
        stack = stack[None]
    if stack.ndim != 3 or stack.shape[1] != stack.shape[2]:
        raise ValueError(f"images must be (n, N, N) square, got shape {np.shape(images)}")
    check_fits(grid, stack.shape[1])
    return stack


def align_to_references(images, references, grid: PolarGrid, *, x_range: float, y_range: float, step: float,
                        mirror: bool = True, delta: float = 0.0, normalize_images: bool = True,
                        initial_params=None, out_of_range: str = "reset", chunk_size: int | None = None,
                        pair_budget: int = DEFAULT_PAIR_BUDGET, cache: SpectraCache | None = None,
                        shift_candidates: int = 0, pairs=None) -> MultiRefAlignment:
    """Align every image to every reference (the EQK-means search of ISAC2, spec §6.2 / §4.8).

    For each image: particle centre ``s`` from its current parameters (``initial_params``; identity if None),
    trial translations ``k * step`` around it within ``x_range``/``y_range`` (limited so the rings stay inside the
    image, SPHIRE ``search_range``), full rotational search (straight and, if ``mirror``, x-mirrored) against
    every reference with sub-sample peak refinement, best translation per reference.

    Parameters
    ----------
    images : (n, N, N) array_like
        Images (already normalised as the caller wants, e.g. spec §5.2).
    references : (K, N, N) array_like or PreparedReferences
        References (unweighted, as images; they are sampled at the centre, never ring-normalised).
    grid : PolarGrid
        Ring geometry (:func:`isavar.core.polar.polar_grid`), mode "F".
    x_range, y_range, step : float
        Translation search half-ranges and step in pixels (SPHIRE ``xr``, ``yr``, ``ts``).
    mirror : bool
        Also search the x-mirrored image.
    delta : float
        > 0: discrete-angle pass, only angles ``j * jstep * 360 / maxrin`` with
        ``jstep = max(1, int(delta / 360 * maxrin))`` and no sub-sample refinement (spec §4.7).
    normalize_images : bool
        Ring-normalise the image at every trial translation (SPHIRE ``Normalize_ring``, spec §4.2).
    initial_params : None, (n, 4) array_like or object with ``alpha, sx, sy, mirror`` arrays
        Current parameters; only the particle centre ``-R(-alpha) t`` is used (angle and mirror are searched
        globally). Centres beyond ``mashi = N//2 - last_ring - 1`` are handled by ``out_of_range``.
    out_of_range : {"reset", "clamp"}
        "reset" (EQK-means): such an image is searched around the image centre (its parameters reset);
        "clamp" (``ali2d_single_iter``): the centre is clipped to ``[-mashi, mashi]``.
    chunk_size : int, optional
        Images per batch (default: enough for ``pair_budget`` pairs; polar sampling and ring FFTs run in
        sub-batches of about 72 image-translation rows).
    pair_budget : int
        (image x translation x reference) pairs whose correlation curves are computed at once
        (~4 kB per pair).
    cache : SpectraCache, optional
        Reuse image ring spectra across calls on the same images (repeated passes); see :class:`SpectraCache`.
    shift_candidates : int
        0 (default): every trial translation is searched exactly against every reference. ``R > 0``: every
        translation gets a low-frequency score against every reference (ring frequencies
        ``<= MULTI_SHIFT_FREQ``) and only the ``R`` translations of each image with the highest score against
        any reference are searched exactly (with ``delta = 0``); not SPHIRE's search (``docs/deviations.md``).
    pairs : (n, K) bool array_like, optional
        Search only these (image, reference) pairs: their results are the same numbers as without ``pairs``;
        the others get score -inf (and meaningless parameters). The batched products still cover every pair,
        but the correlation curves' inverse FFTs and peak searches, most of the cost, only the chosen ones.
        Not with ``shift_candidates``.

    Returns
    -------
    MultiRefAlignment
        ``(n, K)`` arrays: score, alpha, sx, sy, mirror — the parameters that applied to the image align it
        to the reference; ties go to the later translation (outer loop y, inner x), straight before mirror.
    """
    prep = references if isinstance(references, PreparedReferences) else prepare_references(
        references, grid, mirror=mirror)
    own = prep.grid if prep.rings is None else prep.rings
    if own is not grid and (own.lcirc != grid.lcirc or own.maxrin != grid.maxrin):
        raise ValueError("prepared references were built for a different polar grid")
    if prep.mirror != bool(mirror):
        raise ValueError(f"prepared references have mirror={prep.mirror}, but mirror={mirror} was requested")
    stack = _as_images(images, grid)
    if pairs is not None:
        pairs = np.asarray(pairs, dtype=bool)
        if pairs.shape != (stack.shape[0], prep.n_references):
            raise ValueError(f"pairs must be (n images, n references) = {(stack.shape[0], prep.n_references)}, "
                             f"got {pairs.shape}")
        if shift_candidates:
            raise ValueError("pairs and shift_candidates cannot be combined")
    s = particle_centres(initial_params, stack.shape[0], stack.shape[1], grid.last_ring, out_of_range=out_of_range)
    score, alpha, sx, sy, mir = _search(stack, prep, x_range, y_range, step, delta, normalize_images, s,
                                        chunk_size, pair_budget, cache, int(shift_candidates), pairs)
    return MultiRefAlignment(score=score, alpha=alpha, sx=sx, sy=sy, mirror=mir)


def _search(stack, prep, x_range, y_range, step, delta, normalize, s, chunk_size, pair_budget, cache,
            coarse_rows, pairs=None):
    """:func:`_run` with the translations on the image side, or on the reference side when ``prep`` has them."""
    if not _reference_side(prep, x_range, y_range, step):
        return _run(stack, prep, x_range=x_range, y_range=y_range, step=step, delta=delta, normalize=normalize,
                    s=s, chunk_size=chunk_size, pair_budget=pair_budget, cache=cache, coarse_rows=coarse_rows,
                    pairs=pairs)
    columns = None if pairs is None else np.repeat(pairs, len(prep.shifts), axis=1)   # every translation
    res = _run(stack, prep, x_range=0.0, y_range=0.0, step=step, delta=delta, normalize=normalize, s=s,
               chunk_size=chunk_size, pair_budget=pair_budget, cache=cache, pairs=columns)
    return _fold_translations(prep, stack.shape[1], s, *res)


def align_to_reference(images, reference, grid: PolarGrid, *, x_range: float, y_range: float, step: float,
                       mirror: bool = True, delta: float = 0.0, normalize_images: bool = False,
                       initial_params=None, center_shift=None, out_of_range: str = "clamp",
                       chunk_size: int | None = None, pair_budget: int = DEFAULT_PAIR_BUDGET,
                       cache: SpectraCache | None = None, coarse_rows: int = 0) -> RefAlignment:
    """One alignment pass of every image to one reference (SPHIRE ``ali2d_single_iter`` / ``ormq``, spec §4.8).

    Same search as :func:`align_to_references` with one reference; defaults follow ``ali2d_single_iter``:
    no ring normalisation, current centre clamped to ``[-mashi, mashi]``, optional centring shift ``cs``
    (``params := combine(params, (0, -cs, 0))`` before the centre is taken). With ``delta > 0`` (the ``dst``
    passes of ``ali2d_base`` / ``within_group_refinement``) only multiples of the discrete step are returned,
    absolute angles (the previous angle is discarded).

    Parameters
    ----------
    images : (n, N, N) array_like
    reference : (N, N) array_like or PreparedReferences with one reference
    grid : PolarGrid
    x_range, y_range, step, mirror, delta, normalize_images, initial_params, out_of_range, chunk_size, pair_budget, cache
        As :func:`align_to_references`.
    center_shift : (2,) array_like, optional
        Centring shift ``cs`` in pixels (``ali2d_base`` with ``center_method = -1`` and friends).
    coarse_rows : int
        0 (default): every trial translation is searched exactly. ``R > 0`` (with a ``cache``): coarse to fine,
        every translation gets a low-frequency score (ring frequencies ``<= COARSE_SHIFT_FREQ``) and only the
        ``R`` best per image are searched exactly; not SPHIRE's search (``docs/deviations.md``).

    Returns
    -------
    RefAlignment
        ``(n,)`` arrays score, alpha, sx, sy, mirror.
    """
    if isinstance(reference, PreparedReferences):
        prep = reference
    else:
        ref = np.asarray(reference, dtype=np.float32)
        if ref.ndim == 3 and ref.shape[0] == 1:
            ref = ref[0]
        if ref.ndim != 2:
            raise ValueError(f"reference must be one (N, N) image, got shape {np.shape(reference)}")
        prep = prepare_references(ref, grid, mirror=mirror)
    if prep.n_references != 1:
        raise ValueError(f"align_to_reference needs exactly one reference, got {prep.n_references}")
    if prep.mirror != bool(mirror):
        raise ValueError(f"prepared reference has mirror={prep.mirror}, but mirror={mirror} was requested")
    stack = _as_images(images, grid)
    s = particle_centres(initial_params, stack.shape[0], stack.shape[1], grid.last_ring,
                         center_shift=center_shift, out_of_range=out_of_range)
    score, alpha, sx, sy, mir = _search(stack, prep, x_range, y_range, step, delta, normalize_images, s,
                                        chunk_size, pair_budget, cache, int(coarse_rows))
    return RefAlignment(score=score[:, 0], alpha=alpha[:, 0], sx=sx[:, 0], sy=sy[:, 0], mirror=mir[:, 0])


def _band_layout(grid: PolarGrid):
    """Bands ``(m_lo, m_hi, first_ring, None)`` of a grid (the layout :func:`_band_spectra` needs)."""
    return tuple((m_lo, m_hi, grid.groups[g][1], None) for m_lo, m_hi, _r, g in _freq_bands(grid))


def _groups_from_bands(bands, layout, grid: PolarGrid) -> list[np.ndarray]:
    """Per-group ring spectra ``(n_rings_g, n_r // 2 + 1)`` from band spectra ``(m_b, n_band_rings)``."""
    out = []
    for n_r, r0, r1, _s0, _s1 in grid.groups:
        g = np.zeros((r1 - r0, n_r // 2 + 1), np.complex64)
        for (m_lo, m_hi, r_first, _w), b in zip(layout, bands):
            if m_lo < n_r // 2 + 1 and r_first <= r0:
                g[:, m_lo:m_hi] = b[:, r0 - r_first:r1 - r_first].T
        out.append(g)
    return out


def aligned_average(images, params, grid: PolarGrid, *, cache: SpectraCache | None = None,
                    chunk_size: int = 256) -> np.ndarray:
    """Mean of the aligned images, built from their ring spectra (no real-space interpolation per image).

    For every image the rings are sampled around its particle centre ``s = -R(-alpha) t`` (bilinear, as in the
    search), rotated by ``alpha`` in the ring-frequency domain (``B(m) exp(-i m alpha)``, exact for the ring
    samples; the x-mirror conjugates the spectrum) and summed; the mean rings are resampled on the pixel grid
    with :func:`isavar.core.polar.polar_to_image`. Inside ``last_ring`` this equals the mean of
    ``transform_images(image, params)`` up to interpolation error; outside it is zero.

    With a :class:`SpectraCache` shared with the alignment passes of the same images, the spectra of centres
    already visited by a search are reused, so an average costs about one complex multiply-add per
    ring coefficient and image.

    Parameters
    ----------
    images : (n, N, N) array_like
    params : (n, 4) array_like
        ``(alpha deg, sx, sy, mirror)`` applied to each image (§0.1).
    grid : PolarGrid
        Ring geometry (mode "F").
    cache : SpectraCache, optional
    chunk_size : int
        Images per batch.

    Returns
    -------
    numpy.ndarray
        float32 ``(N, N)``.
    """
    if grid.mode != "F":
        raise ValueError("aligned_average needs a full-circle ('F') polar grid")
    stack = _as_images(images, grid)
    n, box = stack.shape[0], stack.shape[1]
    alpha, _sx, _sy, mirror = _parse_params(params, n)
    a_rad = np.deg2rad(alpha)
    s = particle_centres(params, n, box, grid.last_ring, out_of_range="keep")
    layout = _band_layout(grid)
    prep = PreparedReferences(grid=grid, box=box, n_refs=0, mirror=True, ring_sum=np.zeros(0), bands=layout)
    zero = np.zeros(1, np.int64)
    if cache is not None:
        if not isinstance(cache, SpectraCache):
            raise ValueError(f"cache must be a SpectraCache, got {type(cache).__name__}")
        half = getattr(cache, "_half", 0) if cache._sig is not None else 2 * (box // 2 - grid.last_ring) + 2
        cache._bind(prep, stack, s, half)
    sums = [np.zeros((m_hi - m_lo, grid.n_rings - r_first), np.complex128) for m_lo, m_hi, r_first, _ in layout]
    mir = mirror > 0.5
    for i0 in range(0, n, chunk_size):
        i1 = min(n, i0 + chunk_size)
        m = i1 - i0
        spectra = [np.empty((m, m_hi - m_lo, 2 * (grid.n_rings - r_first)), np.float32)
                   for m_lo, m_hi, r_first, _ in layout]
        if cache is not None:
            cache._chunk(prep, stack[i0:i1], i0, s[i0:i1], zero, zero, 1.0, spectra, np.empty(m), np.empty(m))
        else:
            polar = _gather_polar(stack[i0:i1].reshape(-1), box, np.arange(m), box // 2 + s[i0:i1, 0],
                                  box // 2 + s[i0:i1, 1], grid, zero, zero).reshape(m, grid.lcirc)
            spectra = _band_spectra(prep, polar)
        # the rotation phases of every frequency at once, (M, 1, m): straight images, mirrored ones
        ph = np.exp(-1j * np.arange(layout[-1][1])[None, :] * a_rad[i0:i1, None]).astype(np.complex64)
        ph_s = np.where(mir[i0:i1, None], 0, ph).T[:, None, :]
        ph_m = np.where(mir[i0:i1, None], ph, 0).T[:, None, :]
        for acc, (m_lo, m_hi, _r, _w), b in zip(sums, layout, spectra):
            bt = b.view(np.complex64).transpose(1, 0, 2)                        # (M_b, m, R_b)
            acc += (ph_s[m_lo:m_hi] @ bt)[:, 0] + np.conj((ph_m[m_lo:m_hi] @ bt)[:, 0])
    rings = rings_from_spectra(_groups_from_bands([a / n for a in sums], layout, grid), grid)
    return polar_to_image(rings, grid, box)


def subset_references(prep: PreparedReferences, indices) -> PreparedReferences:
    """The prepared references ``indices`` (in that order) of ``prep``, without recomputing them.

    Parameters
    ----------
    prep : PreparedReferences
    indices : (k,) int array_like
        Reference numbers (0-based).

    Returns
    -------
    PreparedReferences
        With ``k`` references (and the translations of a reference-side ``prep``); searching it gives the same
        numbers as searching the full set and keeping the columns ``indices``.
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size == 0 or idx.min() < 0 or idx.max() >= prep.n_references:
        raise ValueError(f"reference indices must lie in [0, {prep.n_references}), got {idx.tolist()[:10]}")
    if prep.shifts is not None:                   # every reference with all its translations
        n_sh = len(prep.shifts)
        idx = (idx[:, None] * n_sh + np.arange(n_sh)[None, :]).reshape(-1)
    n_cols = 4 if prep.mirror else 2

    def columns(w):
        w4 = w.reshape(w.shape[0], w.shape[1], prep.n_refs, n_cols)
        return np.ascontiguousarray(w4[:, :, idx]).reshape(w.shape[0], w.shape[1], idx.size * n_cols)

    bands = [(m_lo, m_hi, r_first, columns(w)) for m_lo, m_hi, r_first, w in prep.bands]
    blocks = tuple(blk._replace(w=columns(blk.w)) for blk in prep.blocks)
    return dataclasses.replace(prep, n_refs=int(idx.size), ring_sum=prep.ring_sum[idx].copy(), bands=tuple(bands),
                               blocks=blocks)


def coarse_scores(images, prep: PreparedReferences, *, initial_params=None, out_of_range: str = "reset",
                  normalize_images: bool = True, max_freq: int = 16, chunk_size: int = 256) -> np.ndarray:
    """Cheap approximate scores of every image against every reference (candidate pre-selection).

    The rotational correlation of :func:`align_to_references` restricted to ring frequencies ``m <= max_freq``
    (a low-pass in angle: the curve sampled every ``180 / max_freq`` degrees), at the current particle centre
    only (no trial translations, no peak refinement), straight and mirrored; the score is the larger peak,
    ring-normalised like the full search and on the same scale (the ``m = 0`` term of both curves is equal).
    It costs about ``1 / (9 * 4)`` of the full search per (image, reference) with the ISAC defaults and is
    used to choose the references an image is aligned to exactly.

    Parameters
    ----------
    images : (n, N, N) array_like
    prep : PreparedReferences
        With ``mirror=True`` or False.
    initial_params, out_of_range, normalize_images
        As :func:`align_to_references`.
    max_freq : int
        Highest ring frequency used (>= 1); a power of two keeps the angular sampling regular.
    chunk_size : int
        Images per batch.

    Returns
    -------
    numpy.ndarray
        float32 ``(n, n_refs)``; larger is better.
    """
    grid = prep.grid
    stack = _as_images(images, grid)
    n, box = stack.shape[0], stack.shape[1]
    if box != prep.box:
        raise ValueError(f"images are {box} px but the references are {prep.box} px")
    max_freq = int(min(max_freq, grid.n_freq - 1))
    if max_freq < 1:
        raise ValueError("max_freq must be >= 1")
    s = particle_centres(initial_params, n, box, grid.last_ring, out_of_range=out_of_range)
    n_cols = 4 if prep.mirror else 2
    n_len = 2 * max_freq
    out = np.empty((n, prep.n_refs), np.float32)
    zero = np.zeros(1, np.int64)
    centre = float(box // 2)
    for i0 in range(0, n, chunk_size):
        i1 = min(n, i0 + chunk_size)
        m = i1 - i0
        polar = _gather_polar(stack[i0:i1].reshape(-1), box, np.arange(m), centre + s[i0:i1, 0],
                              centre + s[i0:i1, 1], grid, zero, zero).reshape(m, grid.lcirc)
        spectra = _band_spectra(prep, polar)
        x = np.zeros((max_freq + 1, m, prep.n_refs * n_cols), np.float32)
        for (m_lo, m_hi, _r, w), b in zip(prep.bands, spectra):
            if m_lo > max_freq:
                continue
            top = min(m_hi, max_freq + 1)
            np.matmul(b[:, :top - m_lo].transpose(1, 0, 2), w[:top - m_lo], out=x[m_lo:top])
        corr = scipy.fft.irfft(x.view(np.complex64), n=n_len, axis=0)        # (n_len, m, n_refs * curves)
        peak = corr.max(axis=0).reshape(m, prep.n_refs, n_cols // 2).max(axis=2).astype(np.float64)
        peak *= n_len / grid.maxrin                                            # the scale of the full curves
        if normalize_images:
            mean, std = _ring_stats(polar, grid)
            peak = (peak - mean[:, None] * prep.ring_sum[None, :]) / std[:, None]
        out[i0:i1] = peak
    return out

