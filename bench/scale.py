"""How the cost of ISAC2's EQK iterations and SAC rounds grows with the number of particles.

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/scale.py --stack RUN/stack_ali2d.npy \\
        --n 10000 20000 50000 100000 --out bench/scale.json --plot bench/scale.png
    # the coarse step restricted to each image's previous class and its 32 nearest references:
    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/scale.py --stack RUN/stack_ali2d.npy \\
        --n 10000 20000 50000 100000 --eqk_neighbours 32 --out bench/scale_neighbours32.json
    # SPHIRE's flat search for comparison (its cost grows as N x K):
    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/scale.py --stack RUN/stack_ali2d.npy \\
        --n 10000 20000 --eqk_search flat --out bench/scale_flat.json

Data: the working stack (``stack_ali2d.npy``, 76 x 76 after pre-alignment) of the 10,000-particle benchmark
set of ``bench/isac2.md``. Larger sets are made from it: copy ``j`` of image ``i`` is rotated by a multiple
of 90 degrees and/or x-mirrored (exact pixel operations) and gets fresh Gaussian noise (0.5 x the image's
standard deviation), so every image is distinct. ISAC2 defaults (``img_per_grp`` 200, so ``K = N / 200``).

Measured, in CPU seconds (user + system of this process and of the pool's worker processes, read from
``/proc``; the machine is shared, so CPU time, not wall time, is the figure):

* **EQK iteration**: ``--iterations`` iterations of one generation from ISAC2's random start (each after the
  first gets the previous iteration's classes, as in a run); the first iteration and the mean of the
  following ones are reported.
* **within-group stage** of a SAC round: ``--classes`` classes of the last EQK assignment run
  :func:`isavar.isac.stability.class_stability_task` (serially, with the stability test), and the cost is
  scaled to all ``K`` classes (the stage is one independent task per class of ``img_per_grp`` images, so
  its cost per class does not depend on ``N``).
* **SAC round** = 6 EQK iterations (the FL -> FH ramp) + the within-group stage.

The log-log slopes of both against ``N`` are fitted and plotted.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its living child processes (from /proc)."""
    def stat(pid):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields  # fields[1] = ppid, [11] utime, [12] stime (0-based after the name)

    tick = os.sysconf("SC_CLK_TCK")
    me = os.getpid()
    total = 0.0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            f = stat(name)
        except OSError:
            continue
        if int(name) == me or int(f[1]) == me:
            total += (int(f[11]) + int(f[12])) / tick
    return total


def make_images(stack, n, seed=0):
    """``n`` images from ``stack``: copies rotated by multiples of 90 degrees / mirrored, fresh noise."""
    m = len(stack)
    rng = np.random.default_rng(seed)
    out = np.empty((n,) + stack.shape[1:], np.float32)
    sd = float(np.std(stack[: min(m, 500)]))
    for s in range(0, n, m):
        e = min(n, s + m)
        j = s // m
        block = np.array(stack[: e - s], dtype=np.float32)
        if j:
            block = np.rot90(block, k=j % 4, axes=(1, 2))
            if (j // 4) % 2:
                block = block[:, :, ::-1]
            block = block + (0.5 * sd) * rng.standard_normal(block.shape).astype(np.float32)
        out[s:e] = block
    return out


def measure(images, p, grid, executor, iterations, n_classes_sampled):
    from isavar.isac import generation as gen
    from isavar.isac.stability import class_stability_task
    from isavar.parallel.partition import task_rngs

    state = gen.start_generation(images, p, main=1, gen=1)
    refs, params, assignment = state.refs, state.params, None
    eqk = []
    for it in range(iterations):
        rng = task_rngs(p.rand_seed, 1, key=gen.stream_key(1, 1, 0, it, gen._CENTRE))[0]
        c0, w0 = cpu_seconds(), time.perf_counter()
        refs, params, assignment = gen.eqk_iteration(images, refs, params, p.FL, p, grid, executor, rng,
                                                     previous=assignment)
        eqk.append({"cpu_s": cpu_seconds() - c0, "wall_s": time.perf_counter() - w0})
        print(f"  EQK iteration {it + 1}: {eqk[-1]['cpu_s']:.1f} CPU s ({eqk[-1]['wall_s']:.1f} s wall)", flush=True)
    n_classes = len(refs)
    rngs = task_rngs(p.rand_seed, n_classes, key=gen.stream_key(1, 1, 0, 0, gen._WITHIN))
    picks = np.linspace(0, n_classes - 1, min(n_classes_sampled, n_classes)).round().astype(int)
    c0 = time.process_time()
    for k in picks:
        g = np.flatnonzero(assignment == k)
        class_stability_task((images[g], params[g], p, grid, rngs[k], True))
    per_class = (time.process_time() - c0) / len(picks)
    return {"classes": n_classes, "eqk": eqk, "within_group_cpu_s_per_class": per_class,
            "within_group_cpu_s": per_class * n_classes}


def slope(ns, ts):
    return float(np.polyfit(np.log(ns), np.log(ts), 1)[0])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stack", help="working stack (stack_ali2d.npy) of the 10,000 set (needed with --n)")
    ap.add_argument("--n", type=int, nargs="*", default=[10000, 20000, 50000, 100000],
                    help="particle counts to measure (none: only fit and plot the runs already in --out)")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--classes", type=int, default=3, help="classes whose within-group stage is measured")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--eqk_search", default="candidates", choices=["candidates", "flat"])
    ap.add_argument("--eqk_neighbours", type=int, default=0,
                    help="ISAC2's --eqk_neighbours (0, the default: coarse scores against every reference)")
    ap.add_argument("--out", default="bench/scale.json")
    ap.add_argument("--plot", default=None, help="PNG of the log-log plot")
    args = ap.parse_args(argv)

    from isavar.isac.params import Isac2Params
    from isavar.isac.run import make_grid
    from isavar.parallel.pool import PoolExecutor

    stack = np.load(args.stack, mmap_mode="r") if args.n else None
    p = Isac2Params(radius=50, CTF=True, rand_seed=1, eqk_search=args.eqk_search,
                    eqk_neighbours=args.eqk_neighbours)
    grid = make_grid(p)
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {}
    record.setdefault("runs", {})
    if args.n:
        record.update({"eqk_search": args.eqk_search, "eqk_neighbours": args.eqk_neighbours, "maxit": p.maxit,
                       "workers": args.workers, "stack": str(args.stack)})
    executor = PoolExecutor(args.workers) if args.n else None
    try:
        for n in args.n:
            print(f"N = {n}", flush=True)
            from isavar.isac.generation import normalise_for_alignment
            from isavar.isac import _ops

            images = normalise_for_alignment(make_images(stack, n), _ops.circle(p.box, p.target_radius))
            r = measure(images, p, grid, executor, args.iterations, args.classes)
            steady = [e["cpu_s"] for e in r["eqk"][1:]] or [r["eqk"][0]["cpu_s"]]
            r["eqk_cpu_s_first"] = r["eqk"][0]["cpu_s"]
            r["eqk_cpu_s_per_iteration"] = float(np.mean(steady))
            r["sac_round_cpu_s"] = 6 * r["eqk_cpu_s_per_iteration"] + r["within_group_cpu_s"]
            record["runs"][str(n)] = r
            out.write_text(json.dumps(record, indent=2))
            print(json.dumps({k: v for k, v in r.items() if k != "eqk"}), flush=True)
            del images
    finally:
        if executor is not None:
            executor.close()
    ns = sorted(int(k) for k in record["runs"])
    if len(ns) >= 2:
        eq = [record["runs"][str(n)]["eqk_cpu_s_per_iteration"] for n in ns]
        sac = [record["runs"][str(n)]["sac_round_cpu_s"] for n in ns]
        record["slope_eqk_iteration"] = slope(ns, eq)
        record["slope_sac_round"] = slope(ns, sac)
        out.write_text(json.dumps(record, indent=2))
        print(f"log-log slopes: EQK iteration {record['slope_eqk_iteration']:.2f}, "
              f"SAC round {record['slope_sac_round']:.2f}")
        if args.plot:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(5.5, 4))
            ax.loglog(ns, sac, "o-", label=f"SAC round (slope {record['slope_sac_round']:.2f})")
            ax.loglog(ns, eq, "s-", label=f"EQK iteration (slope {record['slope_eqk_iteration']:.2f})")
            ref = np.array([ns[0], ns[-1]], float)
            ax.loglog(ref, eq[0] * ref / ref[0], "k:", lw=1, label="linear")
            ax.loglog(ref, eq[0] * (ref / ref[0]) ** 2, "k--", lw=1, label="quadratic (flat N x K)")
            ax.set_xlabel("particles N (K = N / 200 classes)")
            ax.set_ylabel("CPU seconds")
            ax.set_title(f"ISAC2 cost against N ({args.eqk_search} EQK search)")
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(args.plot, dpi=120)
            print("wrote", args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
