"""ISAC2 at test-suite size over many seeds: how often is an impure class accepted?

The data are the workflow tests' kind (250 simulated particles of box 48, four planted views, SNR 0.3, 10 %
pure-noise images, CTF); ISAC2 runs with the test-suite settings (working box 28, rings 1-10,
``img_per_grp`` 50, ``minimum_grp_size`` 20, ``maxit`` 8, two SAC rounds, four stability runs) and any
overrides given, once per ISAC seed. One line per seed: classes, the lowest class purity (fraction of the
class's particles from its most common view; noise images count as impure), accounted particles and the
fraction of the noise images left out.

    # SPHIRE's search, then isavar's defaults
    PYTHONPATH=src python bench/isac2_small_study.py '{"within_stop": 0, "band_tol": 0, "round_stop": "sphire"}' 1,2,3
    PYTHONPATH=src python bench/isac2_small_study.py '{}' 1,2,3

Results: ``docs/deviations.md`` ("Test-suite-size quality, with more seeds").
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import starfile

from isavar.io import write_particles
from isavar.isac.params import Isac2Params
from isavar.synthetic import phantom_volume, simulate_particles
from isavar.workflows.isac2 import run_isac2

#: the workflow tests' ISAC2 settings
TEST_SUITE = dict(radius=18, target_radius=10, target_nx=28, img_per_grp=50, minimum_grp_size=20, maxit=8,
                  init_iter=2, stab_ali=4, thld_err=0.7, CTF=True)


def simulate(folder: Path) -> Path:
    """The 250-particle data set (fixed simulation seed); returns its STAR file."""
    vol = phantom_volume("blob", 48, 3.0)
    images, table = simulate_particles(vol, 250, pixel_size_A=3.0, snr=0.3, orientations="views:4",
                                       shift_sd_A=3.0, noise_fraction=0.1, rng=11)
    path = folder / "particles.star"
    write_particles(path, images, table)
    return path


def _table(path):
    data = starfile.read(path)
    return data["particles"] if isinstance(data, dict) else data


def score(outdir: Path) -> dict:
    """Classes, lowest class purity, accounted particles and noise left out of one run."""
    accounted, unaccounted = _table(outdir / "particles.star"), _table(outdir / "unaccounted_particles.star")
    purities = []
    for _k, members in accounted.groupby("rlnClassNumber"):
        views = members["rlnIsavar_true_view"].to_numpy()
        purities.append(np.bincount(views[views >= 0], minlength=1).max() / len(views))
    noise = int((accounted["rlnIsavar_true_is_noise"] == 1).sum() + (unaccounted["rlnIsavar_true_is_noise"] == 1).sum())
    return {"classes": len(purities), "min_purity": min(purities, default=0.0), "accounted": len(accounted),
            "noise_left_out": float((unaccounted["rlnIsavar_true_is_noise"] == 1).sum() / max(noise, 1))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", help="JSON object of Isac2Params fields, e.g. '{\"band_tol\": 0}'")
    ap.add_argument("seeds", help="comma-separated ISAC seeds")
    args = ap.parse_args(argv)
    overrides = json.loads(args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        star = simulate(Path(tmp))
        for seed in (int(s) for s in args.seeds.split(",")):
            params = Isac2Params(**{**TEST_SUITE, "rand_seed": seed, **overrides})
            out = Path(tmp) / f"run{seed}"
            run_isac2(star, out, params)
            r = score(out)
            print(overrides, "seed", seed, "classes", r["classes"], "min purity %.2f" % r["min_purity"],
                  "accounted", r["accounted"], "noise out %.2f" % r["noise_left_out"], flush=True)


if __name__ == "__main__":
    main()
