"""Diagnostic: how spread out in true viewing direction are the classes of ISAC2 runs, main iteration by main
iteration?

The purity ratio of ``isac2_bench.py`` counts the members within 15° of their class's medoid view and divides
by an oracle's; between two codes on the same data its per-seed difference has a standard deviation of about
0.08 at 2,000 particles, so a systematic change of 0.02 needs many seeds to show. This script looks at the
same classes with two finer measures, over the real (not pure-noise) members:

* the mean angle between the true viewing axes of two members of a class (a view and its opposite are one
  axis), averaged over the classes: smaller is tighter, and it does not jump when one member crosses 15°;
* the classes split by the main iteration that accepted them (``mainNNN/processed_images.txt`` of the run
  holds the accounted images after each main iteration): the first main iteration's classes hold about
  95 % of the accounted particles, the later ones are made from the left-over images.

Usage (from the repository root, after ``isac2_bench.py``)::

    PYTHONPATH=src python bench/isac2_class_spread.py RUN_A1/isac2_2000 RUN_A2/isac2_2000 ... \\
        [--against RUN_B1/isac2_2000 RUN_B2/isac2_2000 ...]

With ``--against`` (one run per run, e.g. the same seeds of another code) it also prints the mean paired
difference A − B of the first main iteration's mean pairwise angle and purity15, with its standard error.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from isac2_bench import particle_table, true_views


def first_main_iteration(run: Path, rows: np.ndarray) -> np.ndarray:
    """The main iteration (1-based) that first accounted each image of ``rows`` (0-based stack rows)."""
    first = np.zeros(rows.max() + 1 if rows.size else 0, dtype=int)
    for m, path in enumerate(sorted(run.glob("main[0-9][0-9][0-9]/processed_images.txt")), start=1):
        done = np.loadtxt(path, dtype=int, ndmin=1)
        done = done[done < first.size]
        first[done[first[done] == 0]] = m
    return first[rows]


def class_spread(run: Path) -> list:
    """Per accepted class of a finished run: ``(main iteration, real members, members within 15° of the
    medoid view, mean pairwise angle in degrees)``."""
    from isavar.io.star import split_image_names
    from isavar.report.validation import axis_angles_deg, view_purity

    table = particle_table(run / "particles.star")
    dirs, noise = true_views(table)
    rows, _codes, _paths = split_image_names(table["rlnImageName"], run / "particles.star")
    main = first_main_iteration(run, np.asarray(rows))
    labels = table["rlnClassNumber"].to_numpy()
    out = []
    for k in np.unique(labels):
        sel = labels == k
        v = dirs[sel & ~noise]
        if len(v) < 2:
            continue
        within = int(round(view_purity(v, np.zeros(len(v), dtype=int)) * len(v)))
        pairwise = axis_angles_deg(v, v)[np.triu_indices(len(v), 1)]
        out.append((int(main[sel].min()), len(v), within, float(pairwise.mean())))
    return out


def first_main_figures(classes: list) -> tuple:
    """purity15 and mean pairwise angle (degrees, averaged over classes) of the first main iteration's
    classes."""
    c = np.array([x for x in classes if x[0] == 1], dtype=float)
    return c[:, 2].sum() / c[:, 1].sum(), c[:, 3].mean()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="isac2_N folders of finished benchmark runs")
    ap.add_argument("--against", nargs="+", type=Path, default=[], help="as many runs to pair with")
    args = ap.parse_args(argv)
    if args.against and len(args.against) != len(args.runs):
        ap.error(f"--against has {len(args.against)} runs, {len(args.runs)} expected")
    spreads = [class_spread(r) for r in args.runs]
    for run, classes in zip(args.runs, spreads):
        pur, ang = first_main_figures(classes)
        later = [x for x in classes if x[0] > 1]
        print(f"{run}: main 1: {sum(x[0] == 1 for x in classes)} classes, {sum(x[1] for x in classes if x[0] == 1)} "
              f"real members, purity15 {pur:.3f}, mean pairwise angle {ang:.2f}°; later main iterations: "
              f"{len(later)} classes, {sum(x[1] for x in later)} real members")
    pooled = {}
    for classes in spreads:
        for m, n, within, _ang in classes:
            p = pooled.setdefault(min(m, 2), [0, 0, 0])
            p[0] += 1
            p[1] += n
            p[2] += within
    for m, (k, n, within) in sorted(pooled.items()):
        label = "main iteration 1" if m == 1 else "later main iterations"
        print(f"all runs, {label}: {k} classes, {n} real members, purity15 {within / n:.3f}")
    if args.against:
        diff = np.array([np.subtract(first_main_figures(a), first_main_figures(class_spread(b)))
                         for a, b in zip(spreads, args.against)])
        se = diff.std(0, ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else np.full(2, np.nan)
        print(f"paired, main iteration 1 (n = {len(diff)}): purity15 {diff[:, 0].mean():+.4f} ± {se[0]:.4f}, "
              f"mean pairwise angle {diff[:, 1].mean():+.2f}° ± {se[1]:.2f}°")


if __name__ == "__main__":
    main()
