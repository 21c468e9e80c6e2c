"""Diagnostic: do the accounted particles of an ISAC2 run correlate with their class average, noise or not?

For every class of a finished benchmark run (``isac2_bench.py``; the simulated STAR file marks the pure-noise
images), every accounted member's working image is brought into the class frame with its final parameters
(``all_parameters.txt``, working pixels) and correlated, inside the working mask, with the mean of the *other*
members (leave-one-out, so a member does not correlate with itself). The script prints the distribution of
these correlations for real and noise members, and what the run's scores (``isac2_bench.py``'s purity ratio,
accounted fraction and noise left out) would be after dropping the members whose correlation is below
``--fraction`` times their class's median. Nothing is re-run: this measures a possible member check after
the stability test (``bench/isac2.md``, twelfth pass; built in since as ``--member_check``, thirteenth pass).

Usage (from the repository root, after ``isac2_bench.py``)::

    PYTHONPATH=src python bench/isac2_member_cc.py RUN/isac2_2000 [RUN2/isac2_2000 ...] --fraction 0.5
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from isac2_bench import particle_table, view_scores


def member_correlations(run: Path, accounted) -> np.ndarray:
    """Leave-one-out correlation of every accounted particle with its class (rows of ``accounted``)."""
    from isavar.io.star import split_image_names
    from isavar.isac import _ops
    from isavar.isac.stability import correlations_with_others

    radius = json.loads((run / "manifest.json").read_text())["params"]["target_radius"]
    stack = np.load(run / "stack_ali2d.npy", mmap_mode="r")
    params = np.loadtxt(run / "all_parameters.txt", ndmin=2)
    mask = _ops.circle(stack.shape[-1], radius) > 0.5
    rows, _codes, _paths = split_image_names(accounted["rlnImageName"], run / "particles.star")
    classes = accounted["rlnClassNumber"].to_numpy()
    out = np.empty(len(accounted))
    for k in np.unique(classes):
        sel = np.flatnonzero(classes == k)
        aligned = _ops.transform(np.asarray(stack[rows[sel]], np.float32), params[rows[sel]])
        out[sel] = correlations_with_others(aligned, mask)
    return out


def scores(accounted, n_particles: int, noise_total: int) -> tuple[float, float, float]:
    """Purity ratio, accounted fraction and noise left out of the accounted table (as ``isac2_bench.py``)."""
    n_classes = accounted["rlnClassNumber"].nunique()
    pur, oracle = view_scores(accounted, n_classes)
    noise_in = int((accounted["rlnIsavar_true_is_noise"] == 1).sum())
    return pur / oracle, len(accounted) / n_particles, 1.0 - noise_in / max(noise_total, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="isavar isac2 output directories of isac2_bench.py runs")
    ap.add_argument("--fraction", type=float, default=0.5,
                    help="drop members whose correlation is below this fraction of their class's median")
    args = ap.parse_args(argv)
    rows = []
    for run in args.runs:
        acc = particle_table(run / "particles.star")
        una = particle_table(run / "unaccounted_particles.star")
        noise = acc["rlnIsavar_true_is_noise"].to_numpy() == 1
        noise_total = int(noise.sum() + (una["rlnIsavar_true_is_noise"] == 1).sum())
        n = len(acc) + len(una)
        cc = member_correlations(run, acc)
        medians = acc.assign(cc=cc).groupby("rlnClassNumber")["cc"].transform("median").to_numpy()
        keep = cc >= args.fraction * medians
        before, after = scores(acc, n, noise_total), scores(acc[keep], n, noise_total)
        rec = {"run": str(run), "real_cc_p5_p50": np.percentile(cc[~noise], [5, 50]).round(3).tolist(),
               "noise_cc_p50_p95": np.percentile(cc[noise], [50, 95]).round(3).tolist() if noise.any() else None,
               "before": np.round(before, 4).tolist(), "after": np.round(after, 4).tolist(),
               "dropped_noise": int((~keep & noise).sum()), "dropped_real": int((~keep & ~noise).sum())}
        rows.append(rec)
        print(json.dumps(rec))
    b = np.array([r["before"] for r in rows])
    a = np.array([r["after"] for r in rows])
    print(f"{len(rows)} runs, mean (purity ratio, accounted, noise left out): before {b.mean(0).round(3).tolist()}, "
          f"after {a.mean(0).round(3).tolist()}; dropped {sum(r['dropped_noise'] for r in rows)} noise and "
          f"{sum(r['dropped_real'] for r in rows)} real members")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
