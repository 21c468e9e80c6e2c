"""Run isavar end to end on the embedded demo data set and summarise what it did.

The demo data are simulated on the spot from isavar's built-in phantom (an
asymmetric, protein-like density), so nothing is downloaded. The demo runs the
same subcommands a user would and prints each command line:

  1. isavar simulate   -- 600 particles of the "blob" phantom, 64 px at 3 Å/px,
                          CTF (defocus 1-2.5 µm), shifts, SNR 0.2, with ground truth
  2. isavar convert    -- RELION STAR -> SPHIRE HDF -> cryoSPARC .cs -> RELION STAR,
                          checking that images and metadata survive the round trip
  3. isavar info       -- a summary of each file (also saved in 3_info/)
  4. isavar isac2      -- ISAC2 on the particles of step 1 (img_per_grp 100, a shortened
                          schedule: --init_iter 2 --maxit 15), about half a minute on 2 cores;
                          the classes are scored against the true views (purity15)
  5. isavar simulate   -- 3000 particles of a two-state phantom (a domain present in
                          30 % of them), CTF, SNR 0.2
  6. isavar 3dvariability -- var3D.mrc from groups of 100 neighbours, compared with the
                          true variability map sqrt(p(1-p))|V1 - V2| (Pearson r)
  7. isavar 3dva       -- the covariance (PPCA) analysis of the same particles: var3D,
                          components and per-particle latents; compare_variability.png
                          shows the truth, the SPHIRE-method map and the 3dva map side by side

OUT receives one folder per step, demo.log and provenance.json. Re-running the
demo into the same OUT replaces the previous demo's results (and refuses a
folder that is not a demo output).

Examples
--------
  isavar demo demo_out
  isavar demo demo_out --seed 3 -q
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from isavar.cli._common import add_verbosity_arguments, non_negative_int, positive_int, setup_logging
from isavar.errors import InputError

log = logging.getLogger("isavar.cli.demo")

MARKER = "isavar_demo"
STEPS = ("1_simulate", "2_convert", "3_info", "4_isac2", "5_simulate_two_state", "6_3dvariability", "7_3dva")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``demo`` options."""
    parser.add_argument("out", metavar="OUT", help="output folder (created; a previous demo output is replaced)")
    parser.add_argument("--seed", type=non_negative_int, default=2026,
                        help="random seed of the simulation (default 2026)")
    parser.add_argument("--n", type=positive_int, default=600, help="particles of the first data set (default 600)")
    parser.add_argument("--n-variability", type=positive_int, default=3000,
                        help="particles of the two-state data set (default 3000)")
    parser.add_argument("--workers", type=positive_int, default=2,
                        help="processes for ISAC2 and 3D variability (default 2)")
    add_verbosity_arguments(parser)


def _prepare_out(out: Path) -> None:
    from isavar.workflows.outputs import create_output_dir

    from isavar.workflows.outputs import check_can_write

    check_can_write(out)
    create_output_dir(out, marker=MARKER)
    for name in STEPS:
        if (out / name).exists():
            shutil.rmtree(out / name)
    (out / MARKER).write_text("made by isavar demo\n", encoding="utf-8")


def _step(args: argparse.Namespace, argv: list[str]) -> None:
    """Run one isavar subcommand in-process, echoing its command line."""
    from isavar.cli import main

    quiet = ["-q"] if args.quiet and argv[0] != "info" else []
    log.info("$ isavar %s", " ".join(argv))
    status = main(argv + quiet)
    setup_logging(args, log_file=Path(args.out) / "demo.log")
    if status != 0:
        raise RuntimeError(f"isavar {argv[0]} failed with status {status}")


def _compare_round_trip(first: Path, last: Path) -> dict:
    """Compare two particle files: largest image difference and metadata differences."""
    from isavar.io import read_particles
    from isavar.io.particles import CANONICAL_COLUMNS

    a, b = read_particles(first), read_particles(last)
    if len(a.images) != len(b.images):
        raise RuntimeError(f"round trip changed the particle count: {len(a.images)} -> {len(b.images)}")
    image_diff = 0.0
    for start, stop, chunk in a.images.chunks(256):
        image_diff = max(image_diff, float(np.abs(chunk - b.images[start:stop]).max()))
    truth = [c for c in a.table.columns if c.startswith("true_")]
    numeric = [c for c in [*CANONICAL_COLUMNS, *truth] if c in a.table and c in b.table
               and pd.api.types.is_numeric_dtype(a.table[c]) and c != "image_index"]
    meta_diff = {c: float(np.abs(a.table[c].to_numpy(float) - b.table[c].to_numpy(float)).max()) for c in numeric}
    return {"images_max_abs_diff": image_diff, "metadata_max_abs_diff": meta_diff,
            "ground_truth_columns_kept": [c for c in truth if c in b.table.columns]}


def _isac2_demo(args: argparse.Namespace, out: Path, particles: Path) -> dict:
    """Run ISAC2 on the demo particles and score its classes against the true views."""
    import json

    from isavar.conventions import viewing_direction
    from isavar.io import read_particles
    from isavar.report.validation import oracle_view_classes, view_purity

    result = out / STEPS[3]
    _step(args, ["isac2", str(particles), str(result), "--radius=26", "--CTF", "--img_per_grp=100",
                 "--minimum_grp_size=40", "--init_iter=2", "--maxit=15", f"--rand_seed={args.seed}",
                 f"--workers={args.workers}"])
    summary = json.loads((result / "summary.json").read_text())
    n_classes = int(summary["classes"])
    if n_classes == 0:
        return {"particles": summary["particles_in"], "accounted": 0, "classes": 0, "purity15": float("nan"),
                "purity15_oracle": float("nan")}
    accounted = read_particles(result / "particles.star").table
    dirs = viewing_direction(accounted["true_angle_rot_deg"], accounted["true_angle_tilt_deg"])
    purity = view_purity(dirs, accounted["class_number"].to_numpy())
    oracle = view_purity(dirs, oracle_view_classes(dirs, n_classes))
    return {"particles": summary["particles_in"], "accounted": summary["particles_accounted"],
            "classes": n_classes, "purity15": purity, "purity15_oracle": oracle}


def _variability_demo(args: argparse.Namespace, out: Path) -> dict:
    """Simulate a two-state set, run 3dvariability on it and compare var3D with the truth."""
    from isavar.io import read_volume
    from isavar.report.validation import masked_correlation, mixture_std_map, sphere_mask
    from isavar.synthetic.simulate import particle_radius_px

    data, result = out / STEPS[4], out / STEPS[5]
    weights = (0.7, 0.3)
    _step(args, ["simulate", str(data), "--phantom", "two_state", "--weights", *map(str, weights), "--n",
                 str(args.n_variability), "--box", "64", "--apix", "3.0", "--snr", "0.2", "--defocus", "1.0", "2.5",
                 "--seed", str(args.seed + 1)])
    _step(args, ["3dvariability", str(data / "particles.star"), str(result), "--img_per_grp=100", "--CTF",
                 "--fl=0.15", "--aa=0.1", f"--workers={args.workers}"])
    volumes = [read_volume(data / f"volume_{k}.mrc")[0] for k in range(2)]
    var3d = read_volume(result / "var3D.mrc")[0]
    truth = mixture_std_map(volumes, weights)
    mask = sphere_mask(truth.shape[0], particle_radius_px(volumes[0]))
    return {"particles": args.n_variability, "img_per_grp": 100, "pearson_r": masked_correlation(var3d, truth, mask)}


def _covariance_demo(args: argparse.Namespace, out: Path, sphire: dict) -> dict:
    """Run 3dva on the two-state set; score var3D and latent 1; one picture beside the SPHIRE-method map."""
    import json

    from isavar.io import read_particles, read_volume
    from isavar.report.validation import masked_correlation, mixture_std_map, sphere_mask
    from isavar.synthetic.simulate import particle_radius_px

    data, sphire_dir, result = out / STEPS[4], out / STEPS[5], out / STEPS[6]
    _step(args, ["3dva", str(data / "particles.star"), str(result), "--components", "2", "--CTF",
                 "--iterations", "10", f"--seed={args.seed}", f"--workers={args.workers}"])
    weights = (0.7, 0.3)
    volumes = [read_volume(data / f"volume_{k}.mrc")[0] for k in range(2)]
    truth = mixture_std_map(volumes, weights)
    mask = sphere_mask(truth.shape[0], particle_radius_px(volumes[0]))
    var3d = read_volume(result / "var3D.mrc")[0]
    table = read_particles(result / "particles.star").table
    z, state = table["latent_1"].to_numpy(), table["true_conformation"].to_numpy()
    from scipy.stats import rankdata

    ranks = rankdata(z)
    n1, n0 = int((state == 1).sum()), int((state == 0).sum())
    auc = (ranks[state == 1].sum() - n1 * (n1 + 1) / 2) / max(n1 * n0, 1)
    summary = json.loads((result / "summary.json").read_text())
    res = {"pearson_r": masked_correlation(var3d, truth, mask), "latent1_auc": max(auc, 1 - auc),
           "eigenvalues": summary["eigenvalues"], "above_noise": summary["above_noise"]}
    try:
        _comparison_png(out / "compare_variability.png", truth,
                        read_volume(sphire_dir / "var3D.mrc")[0], var3d, sphire["pearson_r"], res["pearson_r"])
    except ImportError as exc:  # matplotlib missing: the picture is optional
        log.warning("compare_variability.png not written (%s)", exc)
    return res


def _comparison_png(path: Path, truth, sphire, cov, r_sphire: float, r_cov: float) -> None:
    """Slices through the truth's peak (rows xy, xz, yz) of the true std map, the SPHIRE-method var3D and
    the 3dva var3D; each map on its own scale from 0 to its maximum."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z0, y0, x0 = np.unravel_index(int(np.argmax(truth)), truth.shape)
    cols = [("truth sqrt(p(1-p))|V1-V2|", truth), (f"3dvariability (SPHIRE), r = {r_sphire:.2f}", sphire),
            (f"3dva (covariance), r = {r_cov:.2f}", cov)]
    fig, axes = plt.subplots(3, 3, figsize=(9, 9))
    for j, (title, vol) in enumerate(cols):
        top = float(np.max(vol)) or 1.0
        for i, sl in enumerate((vol[z0], vol[:, y0, :], vol[:, :, x0])):
            axes[i, j].imshow(sl, cmap="magma", origin="lower", vmin=0.0, vmax=top)
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
        axes[0, j].set_title(title, fontsize=9)
    for i, name in enumerate((f"xy (z = {z0})", f"xz (y = {y0})", f"yz (x = {x0})")):
        axes[i, 0].set_ylabel(name)
    fig.suptitle("Two-state set: true standard deviation and the two estimates (slices through the true peak)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Run ``isavar demo``; returns the exit status."""
    from isavar.workflows.outputs import write_json, write_provenance

    out = Path(args.out)
    if args.n < 10 or args.n_variability < 200:
        raise InputError("--n must be at least 10 and --n-variability at least 200")
    _prepare_out(out)
    setup_logging(args, log_file=out / "demo.log")
    t0 = time.perf_counter()
    sim = out / "1_simulate"
    _step(args, ["simulate", str(sim), "--phantom", "blob", "--n", str(args.n), "--box", "64", "--apix", "3.0",
                 "--snr", "0.2", "--defocus", "1.0", "2.5", "--shift-sd", "4", "--seed", str(args.seed)])
    conv = out / "2_convert"
    conv.mkdir()
    chain = [sim / "particles.star", conv / "particles.hdf", conv / "particles.cs", conv / "particles_back.star"]
    for src, dst in zip(chain, chain[1:]):
        _step(args, ["convert", str(src), str(dst)])
    check = _compare_round_trip(chain[0], chain[-1])
    write_json(conv / "round_trip.json", check)
    info_dir = out / "3_info"
    info_dir.mkdir()
    for k, path in enumerate(chain):
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            _step(args, ["info", str(path)])
        (info_dir / f"{k}_{path.name}.txt").write_text(buffer.getvalue(), encoding="utf-8")
        if not args.quiet:
            print(buffer.getvalue(), end="")
    isac2 = _isac2_demo(args, out, chain[0])
    variability = _variability_demo(args, out)
    covariance = _covariance_demo(args, out, variability)
    elapsed = time.perf_counter() - t0
    summary = {"particles": args.n, "seed": args.seed, "round_trip": check, "isac2": isac2, "variability": variability,
               "covariance": covariance, "seconds": round(elapsed, 1)}
    write_json(out / "summary.json", summary)
    write_provenance(out, command="demo", parameters={"n": args.n}, seed=args.seed)
    worst = max(check["metadata_max_abs_diff"].values(), default=0.0)
    log.info("demo finished in %.0f s: %d particles simulated; STAR -> HDF -> cs -> STAR kept the images "
             "(max difference %.2g) and metadata (max difference %.2g) and %d ground-truth columns; "
             "results in %s", elapsed, args.n, check["images_max_abs_diff"], worst,
             len(check["ground_truth_columns_kept"]), out)
    log.info("ISAC2: %d stable classes, %d of %d particles accounted; purity15 %.2f (an oracle clustering the true "
             "views into as many classes: %.2f); montage in %s", isac2["classes"], isac2["accounted"],
             isac2["particles"], isac2["purity15"], isac2["purity15_oracle"], out / STEPS[3] / "class_averages.png")
    log.info("3D variability of the two-state set: Pearson r = %.2f between var3D.mrc and the true variability "
             "map inside the particle (see %s)", variability["pearson_r"], out / STEPS[5] / "var3D_slices.png")
    log.info("3dva (covariance) of the same set: Pearson r = %.2f, latent 1 separates the states with ROC AUC %.3f; "
             "side by side in %s", covariance["pearson_r"], covariance["latent1_auc"], out / "compare_variability.png")
    return 0
