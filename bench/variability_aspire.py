"""Peer comparison: ``isavar 3dvariability`` vs ASPIRE's 3D covariance estimator.

Both programs get the same simulated particles (``isavar simulate``, two-state phantom); each
variability map is compared with the true one inside the particle sphere (Pearson r), and wall time
and peak resident memory are recorded.

ASPIRE (PyPI ``aspire``) is a peer, never a dependency of isavar: install it in its own virtual
environment so that its pinned numpy/scipy cannot disturb isavar's::

    python3 -m venv /tmp/aspire_venv && /tmp/aspire_venv/bin/pip install aspire   # 0.14.3 used

Then, from the repository root, with isavar's own Python::

    PYTHONPATH=src python bench/variability_aspire.py --aspire-python /tmp/aspire_venv/bin/python \\
        --work /tmp/peer --n 2000 --box 32 --apix 6 --snr 1 --aspire-L 8 12 [--ctf]

Arguments (``--help`` lists them all):

``--work DIR``          scratch directory (data, outputs, ``results.json``); re-used if present
``--n/--box/--apix/--snr/--seed/--shift-sd/--ctf``   the simulation (two_state phantom, p = 0.3)
``--img-per-grp``       isavar group size (default 100)
``--aspire-L L ...``    ASPIRE works on images downsampled to L x L: its covariance kernel is a
                        (2L)^6 array (L = 16: 4 GiB in float32 before its FFT), so L <= 12 here
``--aspire-python``     the venv interpreter that has ``aspire``
``--tol``               conjugate-gradient tolerance of both ASPIRE estimators (default 1e-5)

What is compared.  isavar: ``var3D`` reconstructed from 2D neighbourhood variances, with
``--var3D-stat var`` (compared with the variance map p(1-p)(V1-V2)^2) and the default std
(compared with sqrt(p(1-p))|V1-V2|), on the full box and Fourier-cropped to ASPIRE's L.  ASPIRE:
the diagonal of the estimated 3D covariance (compared with the true variance map of the volumes
downsampled by ASPIRE itself to L), its square root (vs the std map), and the rank-1 variance
lambda_1 v_1(x)^2 of its top eigenvector (the two-state covariance has rank 1).

The script runs itself a second time inside the ASPIRE venv (``--aspire-worker``); that mode
imports only aspire, numpy and mrcfile.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


# ----------------------------------------------------------------------------- ASPIRE worker
def aspire_worker(args: argparse.Namespace) -> int:
    """Run ASPIRE's mean + covariance estimation on ``args.star``; write maps and timings."""
    import logging

    import mrcfile
    import numpy as np

    t_start = time.perf_counter()
    import aspire
    from aspire.basis import FBBasis3D
    from aspire.covariance import CovarianceEstimator
    from aspire.noise import WhiteNoiseEstimator
    from aspire.reconstruction import MeanEstimator
    from aspire.source import RelionSource
    from aspire.utils import eigs
    from aspire.volume import Volume

    logging.getLogger("aspire").setLevel(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # the mean estimator's CG checkpoints land here
    timings = {"import_s": time.perf_counter() - t_start}
    L = args.L

    t0 = time.perf_counter()
    src = RelionSource(args.star)
    info = {"aspire_version": aspire.__version__, "n": int(src.n), "L_in": int(src.L),
            "pixel_size_in": float(src.pixel_size), "dtype": str(src.dtype),
            "filters": sorted({type(f).__name__ for f in (src.unique_filters or [])})}
    src = src.downsample(L)
    src = src.cache()  # load and downsample every image once
    timings["load_downsample_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    noise_var = float(WhiteNoiseEstimator(src, batch_size=512).estimate())
    timings["noise_s"] = time.perf_counter() - t0

    basis = FBBasis3D((L, L, L), dtype=src.dtype)
    t0 = time.perf_counter()
    mean_estimator = MeanEstimator(src, basis=basis, batch_size=512, checkpoint_iterations=None)
    mean_est = mean_estimator.estimate(tol=args.tol)
    timings["mean_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    cov_estimator = CovarianceEstimator(src, basis, mean_kernel=mean_estimator.kernel, batch_size=512)
    cov = cov_estimator.estimate(mean_est, noise_var, tol=args.tol)
    timings["covariance_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    n_eigs = 4
    eig_vecs, eig_vals = eigs(cov, n_eigs)
    timings["eigs_s"] = time.perf_counter() - t0
    timings["total_in_process_s"] = time.perf_counter() - t_start

    cov2 = np.asarray(cov, dtype=np.float64).reshape(L**3, L**3)
    variance = np.diagonal(cov2).reshape(L, L, L)
    lam = np.diagonal(np.asarray(eig_vals, dtype=np.float64))
    vecs = np.asarray(eig_vecs, dtype=np.float64).reshape(L, L, L, n_eigs)
    rank1 = lam[0] * vecs[..., 0] ** 2

    # the truth, downsampled by ASPIRE's own volume downsampling (same Fourier crop as the images)
    truth = []
    for k in range(2):
        with mrcfile.open(Path(args.star).parent / f"volume_{k}.mrc", permissive=True) as m:
            vol = np.asarray(m.data, dtype=np.float32)
        truth.append(np.asarray(Volume(vol).downsample(L).asnumpy()[0], dtype=np.float32))

    def save(name, arr):
        with mrcfile.new(out / name, overwrite=True) as m:
            m.set_data(np.asarray(arr, dtype=np.float32))

    save("mean.mrc", mean_est.asnumpy()[0])
    save("variance.mrc", variance)
    save("rank1_variance.mrc", rank1)
    save("volume_0_L.mrc", truth[0])
    save("volume_1_L.mrc", truth[1])
    info.update(noise_variance_est=noise_var, eigenvalues=[float(x) for x in lam],
                timings=timings, cg_tol=args.tol)
    (out / "aspire.json").write_text(json.dumps(info, indent=2))
    return 0


# ----------------------------------------------------------------------------- driver helpers
def run_measured(cmd, log_path, env=None, cwd=None):
    """Run ``cmd``; return (wall seconds, peak RSS MiB of the child, return code)."""
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    return wall, usage.ru_maxrss / 1024.0, proc.returncode


def fourier_crop(vol, L):
    """Centred Fourier crop of a cubic volume to ``L`` (amplitude-preserving; Nyquist zeroed)."""
    import numpy as np

    n = vol.shape[0]
    if L == n:
        return np.asarray(vol, dtype=np.float64)
    f = np.fft.fftshift(np.fft.fftn(vol))
    lo = n // 2 - L // 2
    f = f[lo:lo + L, lo:lo + L, lo:lo + L].copy()
    if L % 2 == 0:
        f[0, :, :] = 0
        f[:, 0, :] = 0
        f[:, :, 0] = 0
    return np.real(np.fft.ifftn(np.fft.ifftshift(f))) * (L / n) ** 3


def read_map(path):
    import mrcfile
    import numpy as np

    with mrcfile.open(path, permissive=True) as m:
        return np.asarray(m.data, dtype=np.float64)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--aspire-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--star", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--L", type=int, help=argparse.SUPPRESS)
    p.add_argument("--work", default="/tmp/peer_aspire")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--box", type=int, default=32)
    p.add_argument("--apix", type=float, default=6.0)
    p.add_argument("--snr", default="1")
    p.add_argument("--seed", type=int, default=3)
    p.add_argument("--shift-sd", type=float, default=0.0, help="origin shifts, Å (tests offsets)")
    p.add_argument("--ctf", action="store_true", help="simulate with CTF and run isavar with --CTF")
    p.add_argument("--img-per-grp", type=int, default=100)
    p.add_argument("--aspire-L", type=int, nargs="+", default=[8, 12])
    p.add_argument("--aspire-python", default="/tmp/aspire_venv/bin/python")
    p.add_argument("--tol", type=float, default=1e-5)
    p.add_argument("--skip-aspire", action="store_true", help="only (re)run isavar and the scoring")
    args = p.parse_args(argv)
    if args.aspire_worker:
        return aspire_worker(args)

    import numpy as np

    from isavar.report.validation import masked_correlation, mixture_std_map, sphere_mask
    from isavar.synthetic.simulate import particle_radius_px

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    src_dir = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src_dir + os.pathsep + env.get("PYTHONPATH", "")
    data = work / "data"
    star = data / "particles.star"
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["settings"] = {k: v for k, v in vars(args).items() if k not in ("star", "out", "L")}

    if not star.exists():
        cmd = [sys.executable, "-m", "isavar", "simulate", str(data), "--phantom", "two_state",
               "--weights", "0.7", "0.3", "--n", str(args.n), "--box", str(args.box),
               "--apix", str(args.apix), "--snr", str(args.snr), "--seed", str(args.seed),
               "--shift-sd", str(args.shift_sd), "-q"]
        if not args.ctf:
            cmd.append("--no-ctf")
        wall, _, rc = run_measured(cmd, work / "simulate.log", env=env)
        if rc:
            raise SystemExit(f"simulate failed, see {work / 'simulate.log'}")

    # ---- isavar: variance and std statistics; unfiltered, and low-passed to each ASPIRE band
    # (tanh half-power at ASPIRE's Nyquist L / (2 box) cycles/px, relative fall-off 0.2)
    runs = [(stat, None) for stat in ("var", "std")]
    runs += [(stat, L) for L in args.aspire_L for stat in ("var", "std")]
    for stat, L in runs:
        name = f"isavar_{stat}" + ("" if L is None else f"_fl{L}")
        out = work / name
        if out.exists():
            continue
        cmd = [sys.executable, "-m", "isavar", "3dvariability", str(star), str(out),
               f"--img_per_grp={args.img_per_grp}", "--var3D-stat", stat, "--executor", "serial", "-q"]
        if L is not None:
            cmd += [f"--fl={0.5 * L / args.box}", "--aa=0.2"]
        if args.ctf:
            cmd.append("--CTF")
        wall, rss, rc = run_measured(cmd, work / f"{name}.log", env=env)
        if rc:
            raise SystemExit(f"isavar failed, see {work / f'{name}.log'}")
        results[name] = {"wall_s": wall, "peak_rss_mib": rss, "cmd": " ".join(cmd[1:])}

    # ---- ASPIRE at each L
    for L in args.aspire_L:
        key = f"aspire_L{L}"
        out = work / key
        if args.skip_aspire or (out / "aspire.json").exists():
            continue
        cmd = [args.aspire_python, str(Path(__file__).resolve()), "--aspire-worker",
               "--star", str(star.resolve()), "--out", str(out.resolve()), "--L", str(L),
               "--tol", str(args.tol)]
        aenv = {k: v for k, v in env.items() if k != "PYTHONPATH"}
        wall, rss, rc = run_measured(cmd, work / f"{key}.log", env=aenv)
        results[key] = {"wall_s": wall, "peak_rss_mib": rss, "returncode": rc}
        if rc:
            results[key]["error"] = (work / f"{key}.log").read_text()[-2000:]
            print(f"ASPIRE L={L} failed (rc {rc}); see {work / f'{key}.log'}", file=sys.stderr)
        else:
            results[key].update(json.loads((out / "aspire.json").read_text()))
        results_path.write_text(json.dumps(results, indent=2))

    # ---- scoring
    import starfile

    table = starfile.read(star)
    particles = table["particles"] if isinstance(table, dict) else table
    p1 = float(np.mean(particles["rlnIsavar_true_conformation"].to_numpy() == 1))
    vols = [read_map(data / f"volume_{k}.mrc") for k in range(2)]
    w = [1.0 - p1, p1]
    true_std = mixture_std_map(vols, w)
    true_var = true_std**2
    radius = particle_radius_px(vols[0])
    n = vols[0].shape[0]
    mask = sphere_mask(n, radius)
    results["truth"] = {"p_state1_empirical": p1, "radius_px": radius, "box": n}
    scores = {}
    iv = read_map(work / "isavar_var" / "var3D.mrc")
    isd = read_map(work / "isavar_std" / "var3D.mrc")
    scores["isavar_var_full"] = masked_correlation(iv, true_var, mask)
    scores["isavar_std_full"] = masked_correlation(isd, true_std, mask)
    for L in args.aspire_L:
        out = work / f"aspire_L{L}"
        if not (out / "aspire.json").exists():
            continue
        vL = [read_map(out / f"volume_{k}_L.mrc") for k in range(2)]
        tstd_L = mixture_std_map(vL, w)
        tvar_L = tstd_L**2
        mask_L = sphere_mask(L, radius * L / n)
        mean_true_L = w[0] * vL[0] + w[1] * vL[1]
        a_mean = read_map(out / "mean.mrc")
        a_var = read_map(out / "variance.mrc")
        a_r1 = read_map(out / "rank1_variance.mrc")
        ivf = read_map(work / f"isavar_var_fl{L}" / "var3D.mrc")
        isdf = read_map(work / f"isavar_std_fl{L}" / "var3D.mrc")
        s = {
            "radius_px": radius * L / n,
            "aspire_mean_vs_mixture_mean": masked_correlation(a_mean, mean_true_L, mask_L),
            "aspire_var_diag": masked_correlation(a_var, tvar_L, mask_L),
            "aspire_std_diag": masked_correlation(np.sqrt(np.maximum(a_var, 0)), tstd_L, mask_L),
            "aspire_var_rank1": masked_correlation(a_r1, tvar_L, mask_L),
            "aspire_std_rank1": masked_correlation(np.sqrt(a_r1), tstd_L, mask_L),
            "isavar_var_cropped": masked_correlation(fourier_crop(iv, L), tvar_L, mask_L),
            "isavar_std_cropped": masked_correlation(fourier_crop(isd, L), tstd_L, mask_L),
            "isavar_fl_var_full": masked_correlation(ivf, true_var, mask),
            "isavar_fl_std_full": masked_correlation(isdf, true_std, mask),
            "isavar_fl_var_cropped": masked_correlation(fourier_crop(ivf, L), tvar_L, mask_L),
            "isavar_fl_std_cropped": masked_correlation(fourier_crop(isdf, L), tstd_L, mask_L),
            # sanity: our crop of the truth against ASPIRE's downsampling of it
            "crop_check": masked_correlation(fourier_crop(vols[0], L), vL[0], mask_L),
        }
        scores[f"L{L}"] = s
    results["scores"] = scores
    results_path.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
