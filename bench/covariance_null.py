"""False-positive rate and power of 3dva's "above noise" decision, measured on repeated simulations.

For each seed, two data sets with the same settings as the test suite's recovery tests (box --box,
--n particles, CTF with defocus 0.8-2.5 µm, origins with 3 Å standard deviation, white noise at
--snr): ``homogeneous`` (the two-state phantom's state B only) and ``two_state`` (its domain in 30 %
of the particles). ``isavar.covariance.covariance`` runs with K = --components on each (serial, default
parameters). Reported: the fraction of homogeneous runs with any component flagged above the noise
level (family-wise false-positive rate) and the fraction of flagged components; on two-state data the
fraction of runs whose first component is flagged (power) and whose extra components are flagged
(false positives beside a real component).

Usage::

    PYTHONPATH=src python bench/covariance_null.py --seeds 8 --out /tmp/null_a.json
    PYTHONPATH=src python bench/covariance_null.py --seeds 8 --first-seed 8 --merge /tmp/null_a.json \
        --out bench/covariance_null.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def run_one(case: str, seed: int, n: int, box: int, snr: float, k: int) -> dict:
    """Simulate one data set and fit it; the figures of the decision."""
    from isavar.covariance import CovarianceParams, covariance
    from isavar.synthetic import phantom_volume, simulate_particles
    from isavar.variability.run import particle_geometry

    pix = 3.0 * 64 / box
    a, b = phantom_volume("two_state", box, pix)
    vols = [a, b] if case == "two_state" else [b, b]
    images, table = simulate_particles(vols, n, pixel_size_A=pix, snr=snr, ctf=True, weights=[0.3, 0.7],
                                       shift_sd_A=3.0, rng=1000 + seed)
    geo = particle_geometry(table, pix, need_ctf=True)
    t0 = time.perf_counter()
    res = covariance(table, images, CovarianceParams(n_components=k, ctf=True), geometry=geo, pixel_size_A=pix)
    energy = float((res.mean.astype(np.float64) ** 2).sum())
    return {"case": case, "seed": seed, "above_noise": [bool(x) for x in res.above_noise()],
            "eig_over_mean_energy": [float(x) / energy for x in res.eigenvalues],
            "half_set_snr": [float(x) for x in res.half_snr], "trend": [float(x) for x in res.eigenvalue_trend()],
            "iterations": len(res.history), "seconds": round(time.perf_counter() - t0, 1)}


def main(argv=None) -> int:
    """Run the repeated simulations and print the rates."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--merge", type=Path, nargs="*", default=[], help="earlier --out files to include in the rates")
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--box", type=int, default=32)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--components", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("covariance_null.json"))
    args = ap.parse_args(argv)
    rows = [r for f in args.merge for r in json.loads(f.read_text())["runs"]]
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for case in ("homogeneous", "two_state"):
            row = run_one(case, seed, args.n, args.box, args.snr, args.components)
            rows.append(row)
            print(json.dumps(row), flush=True)
            args.out.write_text(json.dumps({"runs": rows}, indent=1) + "\n")
    hom = [r for r in rows if r["case"] == "homogeneous"]
    two = [r for r in rows if r["case"] == "two_state"]
    summary = {
        "homogeneous_runs": len(hom),
        "homogeneous_any_flagged": sum(any(r["above_noise"]) for r in hom),
        "homogeneous_components_flagged": sum(sum(r["above_noise"]) for r in hom),
        "homogeneous_components": sum(len(r["above_noise"]) for r in hom),
        "two_state_runs": len(two),
        "two_state_first_flagged": sum(r["above_noise"][0] for r in two),
        "two_state_extra_flagged": sum(sum(r["above_noise"][1:]) for r in two),
        "two_state_extra_components": sum(len(r["above_noise"]) - 1 for r in two),
        "largest_homogeneous_half_set_snr": max(max(r["half_set_snr"]) for r in hom) if hom else None,
        "smallest_two_state_half_set_snr": min(r["half_set_snr"][0] for r in two) if two else None,
    }
    args.out.write_text(json.dumps({"summary": summary, "runs": rows}, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
