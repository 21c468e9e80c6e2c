"""How evenly MPI ranks share the exact alignments of one candidate EQK iteration: equal task counts against
equal task costs (``parallel.partition.balanced_ranges`` / ``weighted_ranges``).

Usage (a finished or running ISAC2 output directory with its working stack and a main-iteration checkpoint)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/mpi_balance.py --run OUT --n 50000 --time 40

The candidate groups of one EQK iteration are computed on the first ``--n`` images of the working stack
with the checkpoint's class averages as references (topped up with images to ``K = n / img_per_grp``). Each
group is one task, of cost ``images x references``. ``--time G`` (at least 3) times the exact alignment of ``G``
groups and fits time = a x images + b x images x references, to check the cost model the executor is given
(images x references). The figure of merit for ``P`` ranks is the
slowest rank's work over the mean (1 = perfect balance): with equal work per rank the EQK iteration's
exact part takes ``total / P``; otherwise the slowest rank's share.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from isavar.isac import _ops
from isavar.isac import generation as G
from isavar.isac.params import Isac2Params
from isavar.isac.run import make_grid, subset_images
from isavar.isac.working import MappedStack, resolve
from isavar.parallel.partition import balanced_ranges, weighted_ranges
from isavar.parallel.serial import SerialExecutor


def iteration_inputs(run: Path, n: int, p: Isac2Params):
    """The first ``n`` working images of a run, ``K = n / img_per_grp`` references (the first main
    iteration's class averages, topped up with images), the images' parameters, the alignment mask and grid.
    """
    stack = MappedStack(run / "stack_ali2d.npy")
    ends = sorted((run / "checkpoints").glob("main_*_end.npz"))
    if not ends:
        raise SystemExit(f"{run}: no checkpoints/main_*_end.npz (the first main iteration has not ended)")
    ck = np.load(ends[0])
    images = subset_images(stack, np.arange(n), p)
    k = n // p.img_per_grp
    refs = np.array(ck["averages"][:k], np.float32)
    if len(refs) < k:
        refs = np.concatenate([refs, np.array(images.take(np.arange(k - len(refs))), np.float32)])
    params = np.array(ck["params"][:n])
    params[params[:, 3] < 0] = 0.0
    return images, refs, params, _ops.circle(images.shape[-1], p.target_radius), make_grid(p)


def run_params(run: Path) -> Isac2Params:
    """The parameters a run recorded in its manifest."""
    return Isac2Params.from_dict(json.loads((run / "manifest.json").read_text())["params"])


def groups_of_one_iteration(run: Path, n: int, p: Isac2Params):
    """Candidate groups ``[(members, union)]`` and what their exact alignment needs."""
    images, refs, params, mask, grid = iteration_inputs(run, n, p)
    prep = _ops.prepare(G.normalise_references(refs, mask), grid, band_tol=p.band_tol)
    groups, _local, _ = G.eqk_search_candidates(images, prep, params, p, grid, _NoExact())
    return groups, images, prep, params, grid


class _NoExact(SerialExecutor):
    """Runs the coarse step; the exact step's tasks are only listed (``map_sum`` of the second call skipped)."""

    def __init__(self):
        self.calls = 0

    def map_sum(self, fn, tasks, on_result=None, *, shared=None, exact=False, cost=None):
        self.calls += 1
        if self.calls == 1:
            return super().map_sum(fn, tasks, on_result, shared=shared, exact=exact)
        return None


def imbalance(costs, n_ranks: int, weighted: bool) -> float:
    """The slowest rank's summed cost over the mean."""
    costs = np.asarray(costs, np.float64)
    ranges = weighted_ranges(costs, n_ranks) if weighted else balanced_ranges(len(costs), n_ranks)
    per_rank = np.array([costs[a:b].sum() for a, b in ranges])
    return float(per_rank.max() / (costs.sum() / n_ranks))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="ISAC2 output directory (stack_ali2d.npy, checkpoints/)")
    ap.add_argument("--n", type=int, default=50000)
    ap.add_argument("--time", type=int, default=0, help="time the exact alignment of this many groups")
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 16, 64, 256])
    ap.add_argument("--project_groups", type=int, default=5000,
                    help="also the balance for this many groups (1,000,000 particles: about 5,000), their costs "
                         "drawn from the measured ones (mean of 20 draws)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    p = run_params(Path(args.run))
    groups, images, prep, params, grid = groups_of_one_iteration(Path(args.run), args.n, p)
    costs = np.array([idx.size * union.size for idx, union in groups], np.float64)
    sizes = np.array([idx.size for idx, _ in groups])
    record = {"n": args.n, "groups": len(groups), "images_per_group": [int(sizes.min()), float(sizes.mean()),
                                                                       int(sizes.max())],
              "cost_cv": float(costs.std() / costs.mean()), "ranks": {}}
    for r in args.ranks:
        record["ranks"][r] = {"equal_counts": imbalance(costs, r, False), "equal_costs": imbalance(costs, r, True)}
    if args.project_groups:
        rng = np.random.default_rng(0)
        draws = [rng.choice(costs, args.project_groups) for _ in range(20)]
        record["projected"] = {"groups": args.project_groups, "ranks": {
            r: {"equal_counts": float(np.mean([imbalance(c, r, False) for c in draws])),
                "equal_costs": float(np.mean([imbalance(c, r, True) for c in draws]))} for r in args.ranks}}
    if args.time >= 3:
        pick = np.random.default_rng(0).choice(len(groups), min(args.time, len(groups)), replace=False)
        secs = []
        for g in pick:
            idx, union = groups[g]
            x = resolve(images.for_task(idx))
            t = time.process_time()
            _ops.align_multi(x, _ops.subset(prep, union), grid, p, params[idx])
            secs.append(time.process_time() - t)
        secs = np.array(secs)
        # time ~ a x images + b x images x references (polar sampling per image, products per pair)
        design = np.column_stack([sizes[pick], costs[pick]]).astype(np.float64)
        (a, b), *_ = np.linalg.lstsq(design, secs, rcond=None)
        model = design @ np.array([a, b])
        record["timed_groups"] = {"n": len(pick), "s_per_image": float(a), "s_per_image_reference": float(b),
                                  "correlation_time_vs_cost": float(np.corrcoef(costs[pick], secs)[0, 1]),
                                  "correlation_time_vs_model": float(np.corrcoef(model, secs)[0, 1]),
                                  "share_of_time_per_image": float((a * sizes[pick]).sum() / secs.sum())}
    print(json.dumps(record, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
