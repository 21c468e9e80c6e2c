"""Benchmark of ``isavar 3dvariability``: wall time, peak memory and accuracy on simulated data.

For each particle count: simulate (once, cached in --workdir) a two-state mixture (the
``two_state`` phantom, domain present with p = 0.3) and a homogeneous control with the same seed
(same orientations, origins, defocus and noise realisation), box 128, CTF (defocus 0.8-2.5 µm),
SNR 0.1; run the full workflow (files in, output directory out) in a subprocess with the chosen
executor; record wall time, peak resident memory of the whole process tree (sampled every 0.2 s)
and the Pearson r between var3D and the true map sqrt(p(1-p)) |V1 - V2| inside the particle sphere,
plus the homogeneous control's r and peak ratio.

Usage::

    python bench/variability_bench.py --sizes 5000 20000 --workers 2
    python bench/variability_bench.py --sizes 2000 --box 64 --group 50     # quick look

Results are printed as a Markdown table and written to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

P = 0.3


def _tree_rss_kb(pid: int) -> int:
    """Resident memory (kB) of a process and all its descendants (Linux /proc)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
                        break
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    stack += [int(c) for c in fh.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def _run_measured(cmd: list[str]) -> tuple[float, float]:
    """Run a command; return (wall seconds, peak tree RSS in MB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = [0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], _tree_rss_kb(proc.pid))
            time.sleep(0.2)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    th.join()
    if rc != 0:
        raise RuntimeError(f"command failed ({rc}): {' '.join(cmd)}")
    return time.perf_counter() - t0, peak[0] / 1024.0


def simulate(workdir: Path, n: int, box: int, snr: float, seed: int = 7) -> dict:
    """Write two_state.star and homogeneous.star (+ .mrcs) for n particles (cached)."""
    from isavar.io import write_particles
    from isavar.synthetic import phantom_volume, plan_simulation

    pix = 1.5 * 128 / box
    d = workdir / f"n{n}_box{box}_snr{snr}"
    a, b = phantom_volume("two_state", box, pix)
    paths = {"two_state": d / "two_state.star", "homogeneous": d / "homogeneous.star"}
    if all(p.exists() for p in paths.values()):
        return {"dir": d, "pix": pix, "paths": paths, "volumes": (a, b)}
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    for name, vols, w in (("two_state", [a, b], [P, 1 - P]), ("homogeneous", [b], None)):
        t = time.perf_counter()
        plan = plan_simulation(vols, n, pixel_size_A=pix, snr=snr, ctf=True, weights=w,
                               defocus_range_A=(8000.0, 25000.0), shift_sd_A=2 * pix, rng=seed)
        write_particles(paths[name], plan.image_chunks(1000), plan.table, pixel_size_A=pix)
        print(f"simulated {name} n={n} box={box} in {time.perf_counter() - t:.0f} s", flush=True)
    return {"dir": d, "pix": pix, "paths": paths, "volumes": (a, b)}


def accuracy(var3d_two: np.ndarray, var3d_hom: np.ndarray, volumes) -> dict:
    """r against the true std map inside the particle sphere; homogeneous-control checks."""
    from isavar.synthetic.simulate import particle_radius_px

    a, b = volumes
    truth = np.sqrt(P * (1 - P)) * np.abs(a - b)
    box = a.shape[0]
    c = box // 2
    z, y, x = np.ogrid[:box, :box, :box]
    mask = (z - c) ** 2 + (y - c) ** 2 + (x - c) ** 2 <= particle_radius_px(a) ** 2
    slope = np.polyfit(truth[mask], var3d_two[mask], 1)[0]
    return {"r": float(np.corrcoef(var3d_two[mask], truth[mask])[0, 1]),
            "slope": float(slope),
            "r_homogeneous": float(np.corrcoef(var3d_hom[mask], truth[mask])[0, 1]),
            "peak_ratio_homogeneous": float(var3d_hom[mask].max() / var3d_two[mask].max())}


def child(args) -> None:
    """Run the workflow (called in a subprocess so its memory is measured alone)."""
    from isavar.parallel import make_executor
    from isavar.variability.params import VariabilityParams
    from isavar.workflows.variability import run_variability

    prm = VariabilityParams(img_per_grp=args.group, ctf=True, lowpass_fl=args.fl, lowpass_aa=args.aa,
                            auto_decimate=not args.full_box)
    ex = make_executor("pool" if args.workers > 1 else "serial", args.workers)
    try:
        run_variability(args.stack, args.outdir, prm, executor=ex)
    finally:
        ex.close()


def peer_commands() -> list[str]:
    """Installed peers that compute a comparable 3D variability map (SPHIRE/SPARX)."""
    return [c for c in ("sp_3dvariability.py", "sx3dvariability.py") if shutil.which(c)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000])
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--group", type=int, default=100)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--fl", type=float, default=0.05, help="low-pass, cycles/pixel of the input (default 0.05)")
    ap.add_argument("--aa", type=float, default=0.2)
    ap.add_argument("--full-box", action="store_true", help="no filter-driven working-box reduction")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/isavar_variability_bench"))
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("variability_results.json"))
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--stack", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--outdir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    import mrcfile

    rows = []
    for n in args.sizes:
        sim = simulate(args.workdir, n, args.box, args.snr)
        res = {"n": n, "box": args.box, "group": args.group, "snr": args.snr, "fl": args.fl, "aa": args.aa,
               "workers": args.workers, "full_box": args.full_box}
        vols = {}
        for name, path in sim["paths"].items():
            out = sim["dir"] / f"out_{name}_{'full' if args.full_box else 'auto'}"
            if out.exists():
                shutil.rmtree(out)
            cmd = [sys.executable, __file__, "--child", "--stack", str(path), "--outdir", str(out),
                   "--group", str(args.group), "--fl", str(args.fl), "--aa", str(args.aa),
                   "--workers", str(args.workers)] + (["--full-box"] if args.full_box else [])
            wall, peak = _run_measured(cmd)
            vols[name] = mrcfile.read(out / "var3D.mrc")
            summary = json.loads((out / "summary.json").read_text())
            res[f"{name}_wall_s"] = round(wall, 1)
            res[f"{name}_peak_MB"] = round(peak)
            res["working_box"] = summary.get("working_box")
            print(f"n={n} {name}: {wall:.1f} s, peak {peak:.0f} MB (working box {res['working_box']})", flush=True)
        res.update(accuracy(vols["two_state"], vols["homogeneous"], sim["volumes"]))
        rows.append(res)
        print(json.dumps(res), flush=True)
    peers = peer_commands()
    report = {"machine": {"cpus": os.cpu_count(), "load_avg_at_end": os.getloadavg()},
              "peers": peers or "none installed (SPHIRE/SPARX sx3dvariability not found on PATH)", "runs": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n| N | box | working box | G | wall (s) | peak RSS (MB) | r | slope | r homog. | peak ratio homog. |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['box']} | {r['working_box']} | {r['group']} | {r['two_state_wall_s']} | "
              f"{r['two_state_peak_MB']} | {r['r']:.3f} | {r['slope']:.2f} | {r['r_homogeneous']:.3f} | "
              f"{r['peak_ratio_homogeneous']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
