"""Benchmark of ``isavar isac2``: wall time, peak memory, time per stage, quality vs an oracle, RELION ratio.

Usage::

    python bench/isac2_bench.py --n 2000 --workers 2 --out /tmp/isac2_bench
    python bench/isac2_bench.py --n 10000 --workers 2 --relion      # also RELION 3.1 Class2D on the same data
    python bench/isac2_bench.py --n 2000 --workers 2 --set within_stop=0.5 --set maxit=18   # other parameters

Data: the simulator's asymmetric "blob" phantom, box 128, 2 Å/pixel, uniformly random views, CTF
(defocus 0.8-2.5 µm), SNR 0.05, 10 % pure-noise images. ISAC2 with SPHIRE defaults (--radius 50, --CTF).

Quality: purity15 = fraction of accounted particles within 15° of their class's medoid true viewing
direction (a view and its opposite count as one, since ISAC aligns with mirrors); the oracle is k-means on
the sphere (antipodally symmetric) of the same particles' true views with the same number of classes.
Results go to OUT/bench_N.json and are printed as a Markdown table row.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


from isavar.report.validation import oracle_view_classes as oracle_kmeans  # noqa: E402
from isavar.report.validation import view_purity as purity15  # noqa: E402


def particle_table(path):
    """The particle loop of a STAR file as a DataFrame (RELION 3.1 files hold optics and particles)."""
    import starfile

    table = starfile.read(path)
    return table["particles"] if isinstance(table, dict) else table


def true_views(table):
    """True viewing directions ``(n, 3)`` and pure-noise flags ``(n,)`` of simulated particles."""
    from isavar.conventions import viewing_direction

    dirs = viewing_direction(table["rlnIsavar_true_angle_rot_deg"], table["rlnIsavar_true_angle_tilt_deg"])
    return dirs, table["rlnIsavar_true_is_noise"].to_numpy() == 1


def view_scores(table, n_classes):
    """purity15 of the classes in ``table`` (noise images count as impure) and the oracle's purity15 for
    its real particles with ``n_classes`` classes."""
    dirs, noise = true_views(table)
    labels = table["rlnClassNumber"].to_numpy()
    pur = purity15(dirs[~noise], labels[~noise]) * int((~noise).sum()) / max(len(table), 1)
    return pur, purity15(dirs[~noise], oracle_kmeans(dirs[~noise], n_classes))


def simulate(n, folder, seed=0):
    from isavar.io import write_particles
    from isavar.synthetic import phantom_volume, simulate_particles

    path = Path(folder) / f"particles_{n}.star"
    if path.exists():
        return path
    vol = phantom_volume("blob", 128, 2.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    images, table = simulate_particles(vol, n, pixel_size_A=2.0, snr=0.05, defocus_range_A=(8000.0, 25000.0),
                                       shift_sd_A=4.0, noise_fraction=0.1, rng=seed)
    write_particles(path, images, table)
    return path


def run_relion(star, outdir, n_classes, threads, iterations=25):
    """RELION 3.1 Class2D (GUI-default-like settings) on the same data; returns wall seconds.

    Run in the STAR file's folder (RELION resolves image paths relative to the working directory).
    """
    outdir = Path(outdir).resolve()
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True)
    cmd = ["relion_refine", "--i", Path(star).name, "--o", str(outdir / "run"), "--dont_combine_weights_via_disc",
           "--ctf", "--iter", str(iterations), "--tau2_fudge", "2", "--particle_diameter", "200", "--K", str(n_classes),
           "--flatten_solvent", "--zero_mask", "--oversampling", "1", "--psi_step", "12", "--offset_range", "5",
           "--offset_step", "2", "--norm", "--scale", "--j", str(threads), "--pool", "30", "--pad", "2"]
    t = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(star).resolve().parent)
    wall = time.time() - t
    (outdir / "relion_stdout.txt").write_text(res.stdout + "\n" + res.stderr)
    return wall, res.returncode, " ".join(cmd)


def relion_iteration_times(outdir, started):
    """Initialisation time and per-iteration times of a RELION run from its ``run_itNNN_model.star`` files."""
    stamps = sorted((int(f.name[6:9]), f.stat().st_mtime) for f in Path(outdir).glob("run_it[0-9][0-9][0-9]_model.star"))
    if not stamps:
        return None, []
    times = [t for _, t in stamps]
    init = times[0] - started if stamps[0][0] == 0 else None
    return init, [b - a for a, b in zip(times, times[1:])]


def relion_record(star, out, args, n_classes, isac_wall):
    """Run RELION Class2D and express ISAC2's wall time as a ratio of RELION's 25-iteration time.

    With fewer iterations, the 25-iteration time is extrapolated: the measured initialisation and iterations
    plus the last measured iteration for each one not run. (The first iterations are the slowest: at 2,000
    particles the first took 272 s, the second 105-123 s and the following ones about 20 s each.)
    """
    started = time.time()
    rwall, code, cmd = run_relion(star, out / f"relion_{args.n}", n_classes, args.workers, args.relion_iter)
    init, iters = relion_iteration_times(out / f"relion_{args.n}", started)
    if iters and init is not None:
        estimate = init + sum(iters[:25]) + max(25 - len(iters), 0) * iters[-1]
    else:
        estimate = rwall / args.relion_iter * 25
    rec = {"relion_wall_s": rwall, "relion_iterations": args.relion_iter, "relion_returncode": code,
           "relion_command": cmd, "relion_init_s": init, "relion_iteration_s": iters,
           "relion_25iter_s_estimate": estimate, "relion_classes": n_classes}
    if isac_wall:
        rec["isac_over_relion25"] = isac_wall / estimate
    rec.update(relion_quality(out / f"relion_{args.n}", n_classes))
    return rec


def relion_quality(outdir, n_classes):
    """purity15 of RELION's last iteration over all particles (RELION keeps every particle; noise counts as
    impure), with the oracle for the same real particles and number of classes."""
    data = sorted(Path(outdir).glob("run_it[0-9][0-9][0-9]_data.star"))
    if not data:
        return {}
    table = particle_table(data[-1])
    pur, pur_oracle = view_scores(table, n_classes)
    return {"relion_scored_file": data[-1].name, "relion_purity15": pur, "relion_purity15_oracle": pur_oracle,
            "relion_purity_ratio": pur / pur_oracle,
            "relion_nonempty_classes": int(table["rlnClassNumber"].nunique())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default="/tmp/isac2_bench")
    ap.add_argument("--relion", action="store_true", help="also run relion_refine Class2D")
    ap.add_argument("--relion_iter", type=int, default=25,
                    help="RELION iterations (fewer: the 25-iteration time is extrapolated per iteration)")
    ap.add_argument("--relion_only", action="store_true", help="skip ISAC2 (use OUT/bench_N.json for K)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="tiny settings to test this script (not a benchmark)")
    ap.add_argument("--skip_prealignment", action="store_true", help="ISAC2's --skip_prealignment")
    ap.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                    help="override an ISAC2 parameter (an Isac2Params field, e.g. maxit=30); repeatable")
    args = ap.parse_args(argv)

    from isavar._allocator import tune_allocator
    from isavar._logging import configure_logging
    from isavar.isac.params import Isac2Params
    from isavar.parallel import make_executor
    from isavar.workflows.isac2 import run_isac2

    out = Path(args.out)
    tune_allocator()                      # as the command line does (isavar.cli.main)
    configure_logging(verbosity=0)
    star = simulate(args.n, out / "data")
    if args.relion_only:
        path = out / f"bench_{args.n}.json"
        record = json.loads(path.read_text()) if path.exists() else {"n": args.n}
        record.update(relion_record(star, out, args, max(int(record.get("classes", 1)), 1), record.get("wall_s")))
        path.write_text(json.dumps(record, indent=2))
        print(json.dumps(record, indent=2))
        return 0
    run_dir = out / f"isac2_{args.n}"
    shutil.rmtree(run_dir, ignore_errors=True)
    executor = make_executor("pool" if args.workers > 1 else "serial", args.workers)
    t = time.time()
    extra = dict(img_per_grp=100, minimum_grp_size=30, maxit=6, init_iter=1, stab_ali=3) if args.quick else {}
    if args.skip_prealignment:
        extra["skip_prealignment"] = True
    for item in args.set:
        key, _, value = item.partition("=")
        kind = type(getattr(Isac2Params(radius=50), key))
        extra[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    params = Isac2Params(radius=50, CTF=True, rand_seed=args.seed, **extra)
    result = run_isac2(star, run_dir, params, executor=executor)
    wall = time.time() - t
    getattr(executor, "close", lambda: None)()
    # CPU seconds (user + system) of this process and of the pool's workers (reaped by close()); on a shared
    # machine this, not the wall time, is the figure to compare
    ru_self, ru_children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = ru_self.ru_utime + ru_self.ru_stime + ru_children.ru_utime + ru_children.ru_stime
    peak_mb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024.0
    summary = json.loads((run_dir / "summary.json").read_text())
    provenance = json.loads((run_dir / "provenance.json").read_text())
    acc = particle_table(run_dir / "particles.star")
    una = particle_table(run_dir / "unaccounted_particles.star")
    c = result.n_classes
    pur, pur_oracle = view_scores(acc, c) if c else (0.0, float("nan"))
    noise_total = int((acc["rlnIsavar_true_is_noise"] == 1).sum() + (una["rlnIsavar_true_is_noise"] == 1).sum())
    noise_unacc = int((una["rlnIsavar_true_is_noise"] == 1).sum()) / max(noise_total, 1)
    record = {"n": args.n, "workers": args.workers, "overrides": args.set, "wall_s": wall, "cpu_s": cpu_s, "peak_rss_MB": peak_mb,
              "classes": c, "accounted": len(acc), "accounted_fraction": len(acc) / args.n,
              "purity15": pur, "purity15_oracle": pur_oracle,
              "purity_ratio": pur / pur_oracle if c else float("nan"), "noise_unaccounted": noise_unacc,
              "timings_s": provenance.get("timings_s"), "generations": len(summary.get("generations", []))}
    if args.relion and shutil.which("relion_refine"):
        record.update(relion_record(star, out, args, max(c, 1), wall))
    (out / f"bench_{args.n}.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
