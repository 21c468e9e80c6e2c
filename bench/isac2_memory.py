"""Memory of ISAC2 against the number of particles, per process and all processes together.

Usage::

    # per-process memory against N: the first EQK iterations of ISAC2's first generation on a working stack
    # of N images kept on disk (memory-mapped), pool of 2 workers
    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/isac2_memory.py scale --stack RUN/stack_ali2d.npy \\
        --n 20000 50000 100000 200000 --iterations 2 --workdir /tmp/isac2_mem \\
        --out bench/isac2_memory.json --plot bench/isac2_memory.png

    # a whole ISAC2 command, every process of it sampled, until a line appears in its log (or it ends)
    PYTHONPATH=src python bench/isac2_memory.py run --log OUT/log.txt --until "round 1:" \\
        --out bench/isac2_memory_run.json -- python -m isavar isac2 particles.star OUT --radius 50 ...

Sampling: every 0.2 s, ``/proc/PID/status`` of the measured process and all its descendants (pool workers,
MPI ranks under ``mpirun``). Two figures per process:

* **private** = ``RssAnon + RssShmem``: memory the process owns (arrays, Python objects, buffers); the
  working stack file's pages are not in it;
* **resident** = ``VmRSS``: the above plus the file pages the process has mapped and touched (the memory-
  mapped working stack and libraries). File pages are page cache: shared between processes and dropped by
  the kernel under memory pressure, so the sum of the processes' resident sizes overstates what a run needs.

The peak of the sum over processes is taken at each sample (the processes' peaks need not coincide).

Data of ``scale``: copies of the working stack ``--stack`` (76 x 76), rotated by multiples of 90 degrees
and/or mirrored with fresh noise (as ``bench/scale.py``), written to ``--workdir/stack_N.npy`` in chunks.
ISAC2 defaults (``img_per_grp`` 200, so K = N / 200; ``--eqk_search candidates``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _status(pid: int) -> dict | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            text = fh.read()
    except OSError:
        return None
    out = {}
    for key in ("RssAnon", "RssShmem", "VmRSS", "PPid"):
        m = re.search(rf"^{key}:\s+(\d+)", text, re.M)
        out[key] = int(m.group(1)) * (1024 if key != "PPid" else 1) if m else 0
    return out


def _tree(root: int) -> list[int]:
    """``root`` and all its living descendants."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = _status(int(name))
            if st:
                parents[int(name)] = st["PPid"]
    out, frontier = [root], [root]
    while frontier:
        nxt = [pid for pid, pp in parents.items() if pp in frontier and pid not in out]
        out += nxt
        frontier = nxt
    return out


class Sampler:
    """Peak memory of a process tree (see the module docstring)."""

    def __init__(self, root: int):
        self.root = root
        self.peak_private = 0
        self.peak_resident = 0
        self.per_process: dict[int, dict] = {}
        self.samples = []
        self.t0 = time.time()

    def sample(self) -> None:
        tot_p = tot_r = 0
        for pid in _tree(self.root):
            st = _status(pid)
            if not st:
                continue
            private = st["RssAnon"] + st["RssShmem"]
            rec = self.per_process.setdefault(pid, {"private": 0, "resident": 0, "role": "main" if pid == self.root
                                                    else "child"})
            rec["private"] = max(rec["private"], private)
            rec["resident"] = max(rec["resident"], st["VmRSS"])
            tot_p += private
            tot_r += st["VmRSS"]
        self.peak_private = max(self.peak_private, tot_p)
        self.peak_resident = max(self.peak_resident, tot_r)
        self.samples.append((round(time.time() - self.t0, 1), tot_p, tot_r))


def write_stack(base, n: int, path: Path, seed: int = 0, chunk: int = 2000) -> None:
    """``n`` images from ``base`` as in ``bench/scale.py`` (rotated/mirrored copies, fresh noise), in chunks."""
    m = len(base)
    rng = np.random.default_rng(seed)
    sd = float(np.std(base[: min(m, 500)]))
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n,) + tuple(base.shape[1:]))
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        block = np.empty((e - s,) + tuple(base.shape[1:]), np.float32)
        for i in range(s, e):
            j, r = divmod(i, m)
            img = np.array(base[r], dtype=np.float32)
            if j:
                img = np.rot90(img, k=j % 4)
                if (j // 4) % 2:
                    img = img[:, ::-1]
            block[i - s] = img
        noisy = (np.arange(s, e) // m) > 0
        block[noisy] += (0.5 * sd) * rng.standard_normal((int(noisy.sum()),) + block.shape[1:]).astype(np.float32)
        out[s:e] = block
    out.flush()
    del out


def _eqk_child(args) -> None:
    """Run in the measured process: start a generation on the mapped stack and run EQK iterations."""
    from isavar.isac import generation as gen
    from isavar.isac.params import Isac2Params
    from isavar.isac.run import make_grid
    from isavar.isac.working import MappedStack, SubsetImages
    from isavar.parallel import make_executor
    from isavar.parallel.partition import task_rngs

    p = Isac2Params(radius=50, CTF=True, rand_seed=1)
    grid = make_grid(p)
    executor = make_executor("pool" if args.workers > 1 else "serial", args.workers)
    images = SubsetImages(MappedStack(args.stack), None, p.target_radius)
    state = gen.start_generation(images, p, main=1, gen=1)
    refs, params = state.refs, state.params
    for it in range(args.iterations):
        rng = task_rngs(p.rand_seed, 1, key=gen.stream_key(1, 1, 0, it, gen._CENTRE))[0]
        t = time.perf_counter()
        refs, params, _ = gen.eqk_iteration(images, refs, params, p.FL, p, grid, executor, rng)
        print(f"EQK iteration {it + 1}: {time.perf_counter() - t:.1f} s wall", flush=True)
    executor.close()


def measure(cmd, *, log=None, until=None, limit=None, env=None) -> dict:
    """Run ``cmd`` and sample its process tree until it ends, ``until`` appears in ``log`` or ``limit`` s pass."""
    proc = subprocess.Popen(cmd, env=env)
    sampler = Sampler(proc.pid)
    reason = "finished"
    t0 = time.time()
    while proc.poll() is None:
        sampler.sample()
        if until and log and Path(log).exists() and re.search(until, Path(log).read_text()):
            reason = f"reached {until!r}"
            break
        if limit and time.time() - t0 > limit:
            reason = f"time limit {limit} s"
            break
        time.sleep(0.2)
    if proc.poll() is None:
        proc.terminate()                      # the process this script started, by its id
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    roles = sorted(sampler.per_process.values(), key=lambda r: -r["private"])
    return {"command": [str(c) for c in cmd], "stopped": reason, "wall_s": round(time.time() - t0, 1),
            "peak_private_total_MB": sampler.peak_private / 2**20,
            "peak_resident_total_MB": sampler.peak_resident / 2**20,
            "per_process_peak_private_MB": [r["private"] / 2**20 for r in roles],
            "per_process_peak_resident_MB": [r["resident"] / 2**20 for r in roles],
            "main_peak_private_MB": max((r["private"] for r in roles if r["role"] == "main"), default=0) / 2**20,
            "worker_peak_private_MB": max((r["private"] for r in roles if r["role"] == "child"), default=0) / 2**20,
            "timeline": sampler.samples[:: max(1, len(sampler.samples) // 200)]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("scale")
    s.add_argument("--stack", required=True)
    s.add_argument("--n", type=int, nargs="+", default=[20000, 50000, 100000, 200000])
    s.add_argument("--iterations", type=int, default=2)
    s.add_argument("--workers", type=int, default=2)
    s.add_argument("--workdir", default="/tmp/isac2_mem")
    s.add_argument("--out", default=str(HERE / "isac2_memory.json"))
    s.add_argument("--plot", default=None)
    s.add_argument("--keep", action="store_true", help="keep the generated stacks")
    r = sub.add_parser("run")
    r.add_argument("--log", help="the run's log.txt")
    r.add_argument("--until", help="stop when this regular expression appears in --log")
    r.add_argument("--limit", type=float, default=None, help="stop after this many seconds")
    r.add_argument("--out", required=True)
    r.add_argument("cmd", nargs=argparse.REMAINDER)
    c = sub.add_parser("_eqk")
    c.add_argument("--stack", required=True)
    c.add_argument("--iterations", type=int, default=2)
    c.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)

    if args.mode == "_eqk":
        _eqk_child(args)
        return
    if args.mode == "run":
        cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
        res = measure(cmd, log=args.log, until=args.until, limit=args.limit)
        Path(args.out).write_text(json.dumps(res, indent=1))
        print(json.dumps({k: v for k, v in res.items() if k != "timeline"}, indent=1))
        return
    out = Path(args.out)
    record = json.loads(out.read_text()) if out.exists() else {"runs": {}}
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    base = np.load(args.stack, mmap_mode="r")
    for n in args.n:
        path = work / f"stack_{n}.npy"
        if not path.exists():
            print(f"writing {path}", flush=True)
            write_stack(base, n, path)
        print(f"N = {n}: {args.iterations} EQK iterations, {args.workers} workers", flush=True)
        res = measure([sys.executable, __file__, "_eqk", "--stack", str(path), "--iterations", str(args.iterations),
                       "--workers", str(args.workers)])
        res["n"] = n
        record["runs"][str(n)] = res
        out.write_text(json.dumps(record, indent=1))
        print({k: v for k, v in res.items() if k not in ("timeline", "command")}, flush=True)
        if not args.keep:
            path.unlink()
    if args.plot:
        plot(record, args.plot)


def plot(record, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(record["runs"].values(), key=lambda r: r["n"])
    ns = np.array([r["n"] for r in runs], float)
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("main_peak_private_MB", "main process (private)"),
                       ("worker_peak_private_MB", "each pool worker (private)"),
                       ("peak_private_total_MB", "all processes together (private)")):
        ys = np.array([r[key] for r in runs])
        ax.plot(ns, ys, "o-", label=label)
        if len(ns) >= 2:
            a, b = np.polyfit(ns, ys, 1)
            ax.plot([ns[0], 1e6], [a * ns[0] + b, a * 1e6 + b], ":", color=ax.lines[-1].get_color(),
                    label=f"  linear fit: {b:.0f} MB + {a * 1e5:.0f} MB per 100k")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("particles N (K = N / 200 classes)")
    ax.set_ylabel("peak memory (MB)")
    ax.set_title("ISAC2 first EQK iterations, pool of 2 workers")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
