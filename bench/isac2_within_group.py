"""CPU cost of ISAC2's within-group stage per group, and of the compiled kernels it leans on.

Single core, CPU seconds of this process (``time.process_time``); run on an idle machine::

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/isac2_within_group.py --stack RUN/stack_ali2d.npy
    # another checkout, same data, for a before/after comparison:
    OMP_NUM_THREADS=1 PYTHONPATH=/path/to/other/src python bench/isac2_within_group.py --stack RUN/stack_ali2d.npy

* **within-group stage**: :func:`isavar.isac.stability.class_stability_task` (``stab_ali`` randomised
  alignment runs and the stability test) on ``--groups`` consecutive blocks of ``--size`` images of the working
  stack (``stack_ali2d.npy`` of an ``isavar isac2`` run, e.g. the 2,000-particle set of ``bench/isac2.md``),
  from zero parameters, ISAC2 defaults (``--radius 50``); mean CPU seconds per group, and the process's minor
  page faults over the groups.
* **polar sampling**: the compiled bilinear gather per sample, for 1 x 1 (a cache miss), 3 x 3 (a search with
  ``xr = 1``) and 9 x 9 (the pre-alignment's full range) trial centres inside the image (best of 5).
* **image transform**: quadratic interpolation of a 76 x 76 image (best of 5).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np


def best_cpu(fn, repeats=5) -> float:
    """Smallest CPU time (s) of ``repeats`` calls of ``fn``."""
    best = np.inf
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def within_group(stack, n_groups, size):
    from isavar.isac import _ops
    from isavar.isac.params import Isac2Params
    from isavar.isac.run import make_grid
    from isavar.isac.stability import class_stability_task
    from isavar.isac.working import normalise_for_alignment

    p = Isac2Params(radius=50, CTF=True, rand_seed=1)
    grid = make_grid(p)
    images = normalise_for_alignment(np.array(stack[:n_groups * size]), _ops.circle(stack.shape[-1], p.target_radius))
    class_stability_task((images[:30], np.zeros((30, 4)), p, grid, np.random.default_rng(0), True))   # compile
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time.process_time()
    for k in range(n_groups):
        g = slice(k * size, (k + 1) * size)
        class_stability_task((images[g], np.zeros((size, 4)), p, grid, np.random.default_rng(k), True))
    return {"cpu_s_per_group": (time.process_time() - t) / n_groups,
            "page_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults}


def kernels():
    from isavar.core import _kernels
    from isavar.core.polar import polar_grid

    rng = np.random.default_rng(0)
    grid = polar_grid(1, 29, 1)
    images = rng.standard_normal((200, 76, 76)).astype(np.float32)
    out = {}
    for k, copies in ((1, 9), (3, 1), (9, 1)):
        offsets = np.arange(k) - k // 2
        n = 200 * copies
        idx = np.repeat(np.arange(200), copies)
        cx, cy = 38 + rng.uniform(-2, 2, n), 38 + rng.uniform(-2, 2, n)
        buf = np.empty((n, k, k, grid.lcirc), np.float32)
        sec = best_cpu(lambda: _kernels.polar_gather(images, idx, cx, cy, grid.sample_dx, grid.sample_dy,
                                                     offsets, offsets, 0, buf))
        out[f"polar_gather_{k}x{k}_ns_per_sample"] = sec / buf.size * 1e9
    a = rng.uniform(0, 2 * np.pi, 200)
    shifts = rng.uniform(-3, 3, (2, 200))
    mirror = rng.integers(0, 2, 200).astype(np.int64)
    res = np.empty_like(images)
    sec = best_cpu(lambda: _kernels.rot_shift(images, np.cos(a).astype(np.float32), np.sin(a).astype(np.float32),
                                              shifts[0], shifts[1], mirror, 0, True, res))
    out["rot_shift_quadratic_us_per_image"] = sec / 200 * 1e6
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stack", required=True, help="working stack stack_ali2d.npy of an isavar isac2 run")
    ap.add_argument("--groups", type=int, default=6)
    ap.add_argument("--size", type=int, default=200, help="images per group (ISAC2's img_per_grp)")
    args = ap.parse_args(argv)
    stack = np.load(args.stack, mmap_mode="r")
    record = {**kernels(), **within_group(stack, args.groups, args.size)}
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
