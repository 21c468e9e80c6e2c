"""Kill a 3D variability run with SIGKILL after a checkpoint, run the same command again, compare with a reference.

The reference is an uninterrupted run of the same command (e.g. one of ``variability_scale.py``'s output
directories). The run is started in its own process group, and once ``checkpoints/groups.npz`` has been written
``--checkpoints`` times the whole group (main process and pool workers) receives SIGKILL; the same command is
then run to completion, and every map and 2D stack is compared byte for byte with the reference.

Usage::

    python bench/variability_resume.py --star /tmp/sim200k/particles_n20000.star --ref /tmp/varscale/n20000 \\
        --out /tmp/varresume/n20000 --checkpoints 2
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
OUTPUTS = ("var3D.mrc", "ave3D.mrc", "var2D.mrcs", "ave2D.mrcs")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--star", type=Path, required=True)
    ap.add_argument("--ref", type=Path, required=True, help="output directory of an uninterrupted run")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--checkpoints", type=int, default=1, help="kill after this many checkpoints")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=str(SRC) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "isavar", "3dvariability", str(args.star), str(args.out), "--fl", "0.1", "--aa",
           "0.2", "--CTF", "--img_per_grp", "100", "--workers", str(args.workers), "-q"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    ck = args.out / "checkpoints" / "groups.npz"
    seen, last = 0, None
    while proc.poll() is None and seen < args.checkpoints:
        if ck.exists():
            m = ck.stat().st_mtime_ns
            if m != last:
                seen, last = seen + 1, m
        time.sleep(0.2)
    if proc.poll() is not None:
        print("the run ended before it could be killed")
        return 1
    with __import__("numpy").load(ck) as state:
        rounds = int(state["blocks_done"]), int(state["n_blocks"])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = time.perf_counter() - t0
    t1 = time.perf_counter()
    rc = subprocess.run(cmd, env=env).returncode
    resumed = time.perf_counter() - t1
    # streamed comparison: the 2D stacks are 13 GB each at 200,000 particles (reading both whole would not fit)
    same = {name: filecmp.cmp(args.ref / name, args.out / name, shallow=False) for name in OUTPUTS}
    log = (args.out / "log.txt").read_text()
    report = {"killed_after_s": round(killed_at, 1), "blocks_done_at_kill": rounds, "rerun_exit": rc,
              "rerun_s": round(resumed, 1), "continued": "continuing an interrupted run" in log,
              "identical": same}
    print(json.dumps(report))
    return 0 if rc == 0 and all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
