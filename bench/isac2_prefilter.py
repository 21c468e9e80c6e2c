"""Could a cheaper first filter pre-select the EQK candidates? Two measurements (not used by isavar).

The candidate search scores every image against every reference coarsely (N x K pairs). Two cheaper first
filters are measured against that coarse score on one EQK iteration of a finished run (the references are
the first main iteration's averages, tanh-filtered at 0.3, as ``bench/mpi_balance.py`` takes them):

* ``invariant``: rotation- and mirror-invariant features of every image and reference (the amplitudes of the
  angular Fourier coefficients 1..8 of every ring, at the current centre), one matrix product for all
  pairs; how often is the coarse score's best reference among the invariant score's ``L`` best?
* ``twolevel``: the references grouped by their mutual coarse scores (farthest-point medoids, then 10 medoid
  updates); how often is the coarse best among the members of an image's ``g`` best groups, and how many
  coarse pairs per image does that need?

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/isac2_prefilter.py invariant --run OUT/isac2_50000 --n 20000
    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/isac2_prefilter.py twolevel --run OUT/isac2_50000 --n 50000 \\
        --groups 24

Figures: ``bench/isac2.md`` ("Issue 11, fourth pass").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from isavar.core import align2d
from isavar.core.polar import ring_spectra
from isavar.isac import _ops
from isavar.isac import generation as G
from isavar.isac.working import resolve
from mpi_balance import iteration_inputs, run_params

#: Ring frequencies of the coarse score and of the invariant features.
MAX_FREQ = 8


def invariant_features(images, params, grid) -> np.ndarray:
    """Normalised amplitudes of the angular frequencies 1..MAX_FREQ of every ring, (m, rings x MAX_FREQ)."""
    x = np.asarray(images, np.float32)
    m, box = len(x), x.shape[-1]
    s = align2d.particle_centres(params, m, box, grid.last_ring, out_of_range="reset")
    zero = np.zeros(1, np.int64)
    polar = align2d._gather_polar(x.reshape(-1), box, np.arange(m), box // 2 + s[:, 0], box // 2 + s[:, 1], grid,
                                  zero, zero).reshape(m, grid.lcirc)
    parts = []
    for spectrum in ring_spectra(polar, grid):                           # per ring group (m, rings, freqs)
        a = np.abs(spectrum[:, :, 1:MAX_FREQ + 1])
        parts.append(np.pad(a, ((0, 0), (0, 0), (0, MAX_FREQ - a.shape[2]))))
    f = np.concatenate(parts, axis=1).reshape(m, -1)
    f -= f.mean(1, keepdims=True)
    f /= np.linalg.norm(f, axis=1, keepdims=True) + 1e-12
    return f.astype(np.float32)


def coarse_and_invariant(images, params, nrefs, prep, grid, want_features: bool):
    """Coarse scores (n, K) and, if asked, the invariant features of the images, in chunks of 512."""
    n = len(images)
    coarse = np.empty((n, prep.n_refs), np.float32)
    feats = None
    for s in range(0, n, 512):
        e = min(n, s + 512)
        x = resolve(images.for_task(np.arange(s, e)))
        coarse[s:e] = _ops.coarse_scores(x, prep, params[s:e], MAX_FREQ)
        if want_features:
            f = invariant_features(x, params[s:e], grid)
            feats = np.empty((n, f.shape[1]), np.float32) if feats is None else feats
            feats[s:e] = f
    return coarse, feats


def invariant_recall(coarse, feats, ref_feats) -> None:
    best = np.argmax(coarse, 1)
    top8 = np.argsort(-coarse, 1)[:, :8]
    ranked = np.argsort(-(feats @ ref_feats.T), 1)
    for top in (8, 16, 24, 32, 48):
        inside = ranked[:, :top]
        hit1 = np.mean((inside == best[:, None]).any(1))
        hit8 = np.mean([np.isin(top8[i], inside[i]).mean() for i in range(len(coarse))])
        print(f"invariant top-{top}: coarse best inside {hit1:.4f}, coarse top-8 inside {hit8:.4f}")


def medoid_groups(similarity, n_groups: int, rng) -> tuple[np.ndarray, list]:
    """Group labels of the references and the medoids (farthest-point start, 10 medoid updates)."""
    k = len(similarity)
    med = [int(rng.integers(k))]
    for _ in range(n_groups - 1):
        med.append(int(np.argmin(similarity[:, med].max(1))))
    for _ in range(10):
        lab = np.argmax(similarity[:, med], 1)
        med = [int(np.flatnonzero(lab == g)[np.argmax(similarity[np.ix_(lab == g, lab == g)].sum(1))])
               for g in range(len(med)) if (lab == g).any()]
    return np.argmax(similarity[:, med], 1), med


def twolevel_recall(coarse, similarity, n_groups: int) -> None:
    lab, med = medoid_groups(0.5 * (similarity + similarity.T), n_groups, np.random.default_rng(0))
    sizes = np.bincount(lab, minlength=len(med))
    print("K", len(lab), "groups", len(med), "sizes", sizes.min(), sizes.mean(), sizes.max())
    best = np.argmax(coarse, 1)
    top8 = np.argsort(-coarse, 1)[:, :8]
    order = np.argsort(-coarse[:, med], 1)                  # an image against the medoids: len(med) pairs
    for g in (2, 3, 4, 6, 8):
        chosen = order[:, :g]
        ok_best = np.mean((chosen == lab[best][:, None]).any(1))
        ok8 = np.mean([np.isin(lab[top8[i]], chosen[i]).mean() for i in range(len(coarse))])
        pairs = len(med) + sizes[chosen].sum(1).mean()
        print(f"top {g} groups: coarse best inside {ok_best:.4f}, coarse top-8 inside {ok8:.4f}, "
              f"coarse pairs per image {pairs:.0f} of {len(lab)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=["invariant", "twolevel"])
    ap.add_argument("--run", required=True, help="ISAC2 output directory (stack_ali2d.npy, checkpoints/)")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--groups", type=int, default=24, help="twolevel: medoid groups to start from")
    args = ap.parse_args(argv)
    run = Path(args.run)
    p = run_params(run)
    images, refs, params, mask, grid = iteration_inputs(run, args.n, p)
    nrefs = G.normalise_references(_ops.tanh_lowpass(refs, 0.3, p.FF), mask)
    prep = _ops.truncate(_ops.prepare(nrefs, grid, band_tol=p.band_tol), MAX_FREQ)
    coarse, feats = coarse_and_invariant(images, params, nrefs, prep, grid, args.mode == "invariant")
    if args.mode == "invariant":
        invariant_recall(coarse, feats, invariant_features(nrefs, np.zeros((len(nrefs), 4)), grid))
    else:
        twolevel_recall(coarse, _ops.coarse_scores(nrefs, prep, np.zeros((len(nrefs), 4)), MAX_FREQ), args.groups)


if __name__ == "__main__":
    main()
