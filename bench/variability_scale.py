"""3D variability against the number of particles: wall and CPU time, memory of every process, accuracy.

The particles are the first N rows of one simulated set (``isavar simulate --phantom two_state --weights 0.3
0.7 --box 128 --apix 1.5 --snr 0.1 --shift-sd 3 --n 200000 --seed 7``): for each N a STAR file with those
rows is written next to the set's ``particles.star`` (so it names the same ``.mrcs``), and ``isavar
3dvariability`` runs on it in a subprocess (``--fl 0.1 --aa 0.2 --CTF --img_per_grp 100`` and the
executor options given). Every 0.5 s the script reads ``/proc`` for the whole process tree:

* ``rss``: resident memory (VmRSS), which includes the pages of the memory-mapped input stack the
  process has touched (clean file pages the kernel can drop at any time);
* ``anon``: anonymous resident memory (RssAnon + RssShmem), the memory the run itself allocates.

Peaks are recorded for the sum over the tree and for each process (the controlling process, the largest
worker or rank). CPU time = user + system of the whole tree (``RUSAGE_CHILDREN``). Accuracy = Pearson r
between var3D and the planted standard-deviation map ``sqrt(p (1 - p)) |V_0 - V_1|`` inside the particle
sphere (p = 0.3, the weight of ``volume_0``), as in ``bench/variability.md``.

Usage::

    python bench/variability_scale.py --sim /tmp/sim200k --n 20000 50000 100000 200000 \\
        --workdir /tmp/varscale --out bench/variability_scale.json --plot bench/variability_scale.png
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

P = 0.3
SRC = Path(__file__).resolve().parents[1] / "src"


def _status(pid: int) -> dict | None:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key = line.split(":")[0]
                if key in ("VmRSS", "RssAnon", "RssShmem", "RssFile"):
                    out[key] = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return out


def _tree(pid: int) -> list[int]:
    pids, stack = [], [pid]
    while stack:
        p = stack.pop()
        pids.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    stack += [int(c) for c in fh.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return pids


def run_measured(cmd: list[str], env: dict) -> dict:
    """Run a command; return wall and CPU seconds and memory peaks (bytes)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    peaks = {"tree_rss": 0, "tree_anon": 0, "main_rss": 0, "main_anon": 0, "worker_rss": 0, "worker_anon": 0,
             "processes": 0}

    def sample():
        while proc.poll() is None:
            tree_rss = tree_anon = 0
            pids = _tree(proc.pid)
            for p in pids:
                st = _status(p)
                if not st:
                    continue
                rss, anon = st.get("VmRSS", 0), st.get("RssAnon", 0) + st.get("RssShmem", 0)
                tree_rss += rss
                tree_anon += anon
                who = "main" if p == proc.pid else "worker"
                peaks[f"{who}_rss"] = max(peaks[f"{who}_rss"], rss)
                peaks[f"{who}_anon"] = max(peaks[f"{who}_anon"], anon)
            peaks["tree_rss"] = max(peaks["tree_rss"], tree_rss)
            peaks["tree_anon"] = max(peaks["tree_anon"], tree_anon)
            peaks["processes"] = max(peaks["processes"], len(pids))
            time.sleep(0.5)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    th.join()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        raise RuntimeError(f"command failed ({rc}): {' '.join(cmd)}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, **peaks}


def subset_star(sim: Path, n: int) -> Path:
    """``particles_nN.star`` next to ``particles.star``: its first ``n`` particles (cached)."""
    import starfile

    out = sim / f"particles_n{n}.star"
    if not out.exists():
        blocks = starfile.read(sim / "particles.star", always_dict=True)
        blocks["particles"] = blocks["particles"].iloc[:n].reset_index(drop=True)
        tmp = out.with_suffix(".tmp.star")
        starfile.write(blocks, tmp)
        os.replace(tmp, out)
    return out


def accuracy(var3d: np.ndarray, sim: Path) -> dict:
    """r and slope of var3D against the planted standard-deviation map inside the particle sphere."""
    sys.path.insert(0, str(SRC))
    from isavar.io import read_volume
    from isavar.synthetic.simulate import particle_radius_px

    a, b = read_volume(sim / "volume_0.mrc")[0], read_volume(sim / "volume_1.mrc")[0]
    truth = np.sqrt(P * (1 - P)) * np.abs(a - b)
    box = a.shape[0]
    c = box // 2
    z, y, x = np.ogrid[:box, :box, :box]
    mask = (z - c) ** 2 + (y - c) ** 2 + (x - c) ** 2 <= particle_radius_px(a) ** 2
    return {"r": float(np.corrcoef(var3d[mask], truth[mask])[0, 1]),
            "slope": float(np.polyfit(truth[mask], var3d[mask], 1)[0])}


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = np.array([r["n"] for r in results], float)
    gb = 1e-9
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, style in (("tree_anon", "all processes, anonymous", "o-"),
                              ("main_anon", "main process, anonymous", "s-"),
                              ("worker_anon", "largest worker, anonymous", "^-"),
                              ("tree_rss", "all processes, RSS (with mapped input pages)", "o:")):
        ax[0].plot(n, [r[key] * gb for r in results], style, label=label)
    proj = np.array([1e6])
    for key in ("tree_anon", "main_anon"):
        fit = np.polyfit(n, [r[key] * gb for r in results], 1)
        ax[0].plot([n[0], proj[0]], np.polyval(fit, [n[0], proj[0]]), "--", color="grey", lw=0.8)
    ax[0].axhline(2.0, color="red", lw=0.8, label="2 GB target")
    ax[0].set_xscale("log")
    ax[0].set_xlabel("particles N")
    ax[0].set_ylabel("peak memory (GB)")
    ax[0].legend(fontsize=7)
    ax[0].set_title("memory (dashed: linear fit projected to 10^6)", fontsize=9)
    ax[1].plot(n, [r["wall_s"] for r in results], "o-", label="wall")
    ax[1].plot(n, [r["cpu_s"] for r in results], "s-", label="CPU (all processes)")
    ax[1].set_xscale("log")
    ax[1].set_yscale("log")
    ax[1].set_xlabel("particles N")
    ax[1].set_ylabel("seconds")
    ax[1].legend(fontsize=8)
    ax[1].set_title("time", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sim", type=Path, required=True, help="isavar simulate output (particles.star, volume_*.mrc)")
    ap.add_argument("--n", type=int, nargs="+", default=[20000, 50000, 100000, 200000])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more 3dvariability options")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    results = json.loads(args.out.read_text()) if args.out and args.out.exists() else []
    done = {r["n"] for r in results}
    args.workdir.mkdir(parents=True, exist_ok=True)
    for n in args.n:
        if n in done:
            continue
        star = subset_star(args.sim, n)
        out = args.workdir / f"n{n}"
        cmd = [sys.executable, "-m", "isavar", "3dvariability", str(star), str(out), "--fl", "0.1", "--aa", "0.2",
               "--CTF", "--img_per_grp", "100", "--workers", str(args.workers), "-q", *args.extra]
        res = {"n": n, "workers": args.workers, "command": " ".join(cmd[1:]), **run_measured(cmd, env)}
        sys.path.insert(0, str(SRC))
        from isavar.io import read_volume

        res.update(accuracy(read_volume(out / "var3D.mrc")[0], args.sim))
        summary = json.loads((out / "summary.json").read_text())
        res["timings_s"] = summary.get("timings_s")
        res["working_box"] = summary.get("working_box")
        results.append(res)
        results.sort(key=lambda r: r["n"])
        print(json.dumps(res), flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
    if args.plot and results:
        plot(results, args.plot)
    print("| N | wall (s) | CPU (s) | peak anon, all (GB) | main (GB) | largest worker (GB) | peak RSS all (GB) | r |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['n']:,} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {r['tree_anon'] / 1e9:.2f} | "
              f"{r['main_anon'] / 1e9:.2f} | {r['worker_anon'] / 1e9:.2f} | {r['tree_rss'] / 1e9:.2f} | "
              f"{r['r']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
