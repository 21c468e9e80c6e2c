"""Diagnostic: how pure are ISAC2's EQK-means classes, from a random start and from the oracle's classes?

Runs only the equal-size k-means iterations of one generation (spec isac2 §6.2-6.3: 6 iterations per
round over the filter ramp FL -> FH, no within-group stage) on the working stack of a finished benchmark
run, and scores every round's classes against the simulated true views (purity15, as in
``isac2_bench.py``; all non-noise particles, not only the accounted ones).

``--init random``: ISAC2's start (``K`` random images as references).
``--init oracle``: the classes start as the oracle's (spherical k-means of the true views) and are held
fixed for ``--fixed`` iterations so that the alignment converges within each class; the purity of one
assignment against those near-ideal references is reported (greedy equal-size and unconstrained argmax),
then the ordinary EQK iterations continue from them.

Options that differ from SPHIRE's defaults in the run being examined are given with ``--set OPTION=VALUE``
(or ``--set FLAG``; parsed as ``isavar isac2`` parses them)
(e.g. the test-suite size runs of bench/isac2.md, "Uniform views at test-suite size").

Usage (after ``isac2_bench.py --n 10000``)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/isac2_eqk_purity.py \\
        --run /tmp/isac2_bench/isac2_10000 --star /tmp/isac2_bench/data/particles_10000.star --init random
    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/isac2_eqk_purity.py \\
        --run /tmp/isac2_bench/isac2_10000 --star /tmp/isac2_bench/data/particles_10000.star --init oracle
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from isavar.isac import generation as gen
from isavar.isac.kmeans import assign_groups
from isavar.isac.run import make_grid, subset_images
from isavar.parallel.partition import task_rngs
from isavar.parallel.pool import PoolExecutor
from isavar.report.validation import oracle_view_classes, view_purity

from isac2_bench import particle_table, true_views  # same folder


class FixedThenGreedy:
    """Assignment rule: fixed classes for the first ``n_fixed`` calls (noise images by argmax), then greedy.

    Records the scores of the last fixed call, so the assignment against those references can be scored.
    """

    def __init__(self, labels, noise, n_fixed):
        self.labels, self.noise, self.n_fixed = labels, noise, n_fixed
        self.calls, self.last_fixed_scores = 0, None

    def __call__(self, scores):
        self.calls += 1
        if self.calls > self.n_fixed:
            return assign_groups(scores)
        self.last_fixed_scores = scores.copy()
        out = self.labels.copy()
        out[self.noise] = np.argmax(scores[:, self.noise], axis=0)
        return out


def run_parameters(radius, seed, options):
    """ISAC2 parameters of the run being examined: ``--radius``, ``--CTF``, the seed and ``options``
    (``["name=value" or "name", ...]``), parsed by ``isavar isac2``'s own option parser."""
    from isavar.cli.isac2 import add_arguments
    from isavar.isac.params import from_sphire_options

    parser = argparse.ArgumentParser(prog="isac2 options")
    add_arguments(parser)
    argv = ["stack", "outdir", f"--radius={radius}", "--CTF", f"--rand_seed={seed}"]
    return from_sphire_options(parser.parse_args(argv + [f"--{o}" for o in options]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="isavar isac2 output directory (holds stack_ali2d.npy)")
    ap.add_argument("--star", required=True, help="the simulated input STAR file (true views)")
    ap.add_argument("--init", choices=["random", "oracle"], default="random")
    ap.add_argument("--rounds", type=int, default=4, help="EQK rounds (6 iterations each) after the start")
    ap.add_argument("--fixed", type=int, default=5, help="oracle start: iterations with the classes held fixed")
    ap.add_argument("--radius", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="OPTION[=VALUE]",
                    help="an isac2 option differing from SPHIRE's default, as in the run (repeatable), "
                         "e.g. --set target_radius=18 --set img_per_grp=30 --set skip_prealignment")
    args = ap.parse_args(argv)

    dirs, noise = true_views(particle_table(args.star))
    real = ~noise
    p = run_parameters(args.radius, args.seed, args.set)
    grid = make_grid(p)
    working = np.load(Path(args.run) / "stack_ali2d.npy", mmap_mode="r")
    images = subset_images(working, np.arange(len(working)), p)
    state = gen.start_generation(images, p, main=1, gen=1)
    refs, params = state.refs, state.params
    n_classes = len(refs)
    oracle = oracle_view_classes(dirs[real], n_classes)
    report = {"n": len(images), "classes": n_classes, "init": args.init,
              "oracle_purity15": view_purity(dirs[real], oracle), "rounds": []}
    rule = assign_groups
    executor = PoolExecutor(args.workers)
    it_global = 0

    def iterate(fl, rule):
        nonlocal refs, params, it_global
        rng = task_rngs(p.rand_seed, 1, key=gen.stream_key(1, 1, 0, it_global, gen._CENTRE))[0]
        refs, params, assignment = gen.eqk_iteration(images, refs, params, fl, p, grid, executor, rng, assign=rule)
        it_global += 1
        return assignment

    if args.init == "oracle":
        labels = np.zeros(len(images), dtype=np.int64)
        labels[real] = oracle
        rule = FixedThenGreedy(labels, noise, args.fixed)
        for _ in range(args.fixed):
            iterate(p.FH, rule)
        scores = rule.last_fixed_scores
        report["near_ideal_references"] = {
            "greedy_purity15": view_purity(dirs[real], assign_groups(scores)[real]),
            "argmax_purity15": view_purity(dirs[real], np.argmax(scores, axis=0)[real]),
        }
        print("one assignment against the oracle classes' references:", report["near_ideal_references"])
    for rnd in range(args.rounds):
        t0 = time.perf_counter()
        for fl in gen.filter_ramp(p.FL, p.FH):
            assignment = iterate(fl, rule)
        purity = view_purity(dirs[real], assignment[real])
        report["rounds"].append({"round": rnd + 1, "purity15": purity, "seconds": time.perf_counter() - t0})
        print(f"round {rnd + 1}: purity15 {purity:.3f} (oracle {report['oracle_purity15']:.3f}), "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    out = Path(args.run) / f"eqk_purity_{args.init}.json"
    out.write_text(json.dumps(report, indent=2))
    print("wrote", out)


if __name__ == "__main__":
    main()
