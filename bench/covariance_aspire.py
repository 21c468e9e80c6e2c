"""``isavar 3dva`` on the data of the ASPIRE comparison (``variability_aspire.py``), scored the same way.

Simulates the same particles as ``variability_aspire.py`` (``isavar simulate --phantom two_state
--weights 0.7 0.3 --n 2000 --box 32 --apix 6 --snr 1 --seed 3``, ``--no-ctf`` unless ``--ctf``; the
simulation is deterministic, so the files are those ASPIRE and ``3dvariability`` were measured on),
runs ``isavar 3dva --components 2`` on them (serial, ``OMP_NUM_THREADS=1``, as the other two programs
were run) and reports wall time, peak RSS and Pearson r of the variance (var3D^2) and standard
deviation (var3D) maps with the truth inside the particle sphere: on the full box and Fourier-cropped
to ASPIRE's L = 8 and 12 (``fourier_crop`` of ``variability_aspire.py``; the truth cropped the same
way, which equals ASPIRE's own downsampling, r = 1.000).

Usage::

    PYTHONPATH=src python bench/covariance_aspire.py --work /tmp/cov_aspire [--ctf]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from variability_aspire import fourier_crop, read_map, run_measured  # noqa: E402


def main(argv=None) -> int:
    """Run and score."""
    import numpy as np

    from isavar.report.validation import masked_correlation, mixture_std_map, sphere_mask
    from isavar.synthetic.simulate import particle_radius_px

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/isavar_cov_aspire"))
    p.add_argument("--ctf", action="store_true")
    p.add_argument("--L", type=int, nargs="+", default=[8, 12])
    args = p.parse_args(argv)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    data = work / "data"
    star = data / "particles.star"
    if not star.exists():
        cmd = [sys.executable, "-m", "isavar", "simulate", str(data), "--phantom", "two_state", "--weights", "0.7",
               "0.3", "--n", "2000", "--box", "32", "--apix", "6", "--snr", "1", "--seed", "3", "--shift-sd", "0",
               "-q"] + ([] if args.ctf else ["--no-ctf"])
        if run_measured(cmd, work / "simulate.log", env=env)[2]:
            raise SystemExit("simulate failed")
    out = work / "3dva"
    if not out.exists():
        cmd = [sys.executable, "-m", "isavar", "3dva", str(star), str(out), "--components", "2", "--executor",
               "serial", "-q"] + (["--CTF"] if args.ctf else [])
        wall, rss, rc = run_measured(cmd, work / "3dva.log", env=env)
        if rc:
            raise SystemExit(f"3dva failed, see {work / '3dva.log'}")
        (work / "run.json").write_text(json.dumps({"wall_s": wall, "peak_rss_mib": rss}))
    run = json.loads((work / "run.json").read_text())
    import starfile

    parts = starfile.read(star)
    parts = parts["particles"] if isinstance(parts, dict) else parts
    p1 = float(np.mean(parts["rlnIsavar_true_conformation"].to_numpy() == 1))
    vols = [read_map(data / f"volume_{k}.mrc") for k in range(2)]
    tstd = mixture_std_map(vols, [1 - p1, p1])
    radius, n = particle_radius_px(vols[0]), vols[0].shape[0]
    sd = read_map(out / "var3D.mrc")
    res = {**run, "ctf": args.ctf, "r_var_full": masked_correlation(sd**2, tstd**2, sphere_mask(n, radius)),
           "r_std_full": masked_correlation(sd, tstd, sphere_mask(n, radius))}
    for L in args.L:
        m = sphere_mask(L, radius * L / n)
        tl = mixture_std_map([fourier_crop(v, L) for v in vols], [1 - p1, p1])
        comps = [read_map(out / f"component_0{k}.mrc") for k in (1, 2)]
        var_l = sum(fourier_crop(c, L) ** 2 for c in comps)  # crop the components, then square: the model's map
        res[f"r_var_L{L}"] = masked_correlation(var_l, tl**2, m)
        res[f"r_std_L{L}"] = masked_correlation(np.sqrt(var_l), tl, m)
    (work / "results.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
