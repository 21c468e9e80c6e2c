"""Benchmark and validation of ``isavar 3dva`` beside ``isavar 3dvariability`` on the same files.

Cases (each simulated once into --workdir with ``isavar.synthetic``, written as STAR + MRCS, box
--box, CTF with defocus 0.8-2.5 µm, origins with 3 Å standard deviation, white noise at --snr):

* ``two_state``     the ``two_state`` phantom, the domain present in 30 % of the particles;
* ``homogeneous``   the control: state B only, the same seed (same orientations, defocus, noise);
* ``ubiquitin``     a real atomic model (tests/data/1ubi.pdb, gemmi): state A the whole protein, state B
                    without its alpha helix (residues 23-34), 30 % / 70 %, 1.2 Å/px, 4 Å resolution;
* ``rotation``      continuous motion: the phantom's compact domain turned about a pivot by an angle
                    uniform in [-30, 30] degrees (13 equally likely steps of 5 degrees).

Runs (subprocesses, pool executor with --workers): ``isavar 3dva --CTF --components K`` (K = 2, and
K = 4 on ``two_state``: more than the truth) and, on ``two_state``/``homogeneous``/``ubiquitin``,
``isavar 3dvariability --CTF --img_per_grp 100`` with and without ``--fl 0.1 --aa 0.2``. Wall time
and the peak resident memory of the whole process tree (sampled every 0.2 s) are recorded.

Figures: Pearson r of var3D with the true standard-deviation map ``sqrt(p(1-p))|V_A - V_B|`` (or,
for the rotation, the voxel standard deviation over the angles) inside the particle sphere; ROC AUC
of latent 1 for the states; |Spearman rho| of latent 1 with the angle; eigenvalues, which are above
the noise level (``summary.json``), and for the control the largest eigenvalue as a fraction of the
mean's energy.

Usage::

    PYTHONPATH=src python bench/covariance_bench.py --workdir /tmp/cov_bench --n 4000 --box 64 --workers 2

Prints a Markdown table and writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from variability_bench import _run_measured  # noqa: E402  (same measurement as the 3dvariability bench)

P = 0.3
ROOT = Path(__file__).resolve().parents[1]


def _ubiquitin_states(box: int, pix: float):
    import gemmi

    from isavar.synthetic import volume_from_model

    full = ROOT / "tests" / "data" / "1ubi.pdb"
    st = gemmi.read_structure(str(full))
    st.remove_ligands_and_waters()
    for model in st:
        for chain in model:
            for i in range(len(chain) - 1, -1, -1):
                if 23 <= chain[i].seqid.num <= 34:
                    del chain[i]
    cut = Path("/tmp") / "isavar_ubiquitin_no_helix.pdb"
    st.write_pdb(str(cut))
    a = volume_from_model(full, box, pix, resolution_A=4.0)
    b = volume_from_model(cut, box, pix, resolution_A=4.0)
    peak = max(a.max(), b.max())
    return [a / peak, b / peak]


def _rotation_states(box: int):
    from isavar.synthetic.phantoms import SWITCHABLE_DOMAIN, BlobModel, blob_model

    model = blob_model()
    dom = model.domains == SWITCHABLE_DOMAIN
    body, centre = model.centres[~dom].mean(axis=0), model.centres[dom].mean(axis=0)
    pivot = body + 0.6 * (centre - body)
    angles = np.linspace(-30.0, 30.0, 13)
    vols = []
    for t in np.deg2rad(angles):
        c, s = np.cos(t), np.sin(t)
        rot = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        cen = model.centres.copy()
        cen[dom] = (cen[dom] - pivot) @ rot.T + pivot
        vols.append(BlobModel(cen, model.sigmas, model.amplitudes, model.domains).render(box))
    peak = max(v.max() for v in vols)
    return [(v / peak).astype(np.float32) for v in vols], angles


def simulate(workdir: Path, case: str, n: int, box: int, snr: float, seed: int = 11) -> dict:
    """Simulate one case (cached); returns its volumes, weights and file."""
    from isavar.io import write_particles
    from isavar.synthetic import phantom_volume, simulate_particles

    pix = 3.0 * 64 / box
    extra = {}
    if case in ("two_state", "homogeneous"):
        a, b = phantom_volume("two_state", box, pix)
        vols, weights = ([a, b] if case == "two_state" else [b, b]), [P, 1 - P]
    elif case == "ubiquitin":
        pix = 1.2
        vols, weights = _ubiquitin_states(box, pix), [P, 1 - P]
    elif case == "rotation":
        vols, angles = _rotation_states(box)
        weights = np.ones(len(vols))
        extra["angles"] = angles
    else:
        raise ValueError(case)
    folder = workdir / f"{case}_{n}_{box}"
    star = folder / "particles.star"
    if not star.exists():
        folder.mkdir(parents=True, exist_ok=True)
        images, table = simulate_particles(vols, n, pixel_size_A=pix, snr=snr, ctf=True, weights=weights,
                                           shift_sd_A=3.0, rng=seed)
        write_particles(star, images, table, pixel_size_A=pix)
    return {"star": star, "volumes": vols, "weights": np.asarray(weights, float) / np.sum(weights), "pix": pix,
            **extra}


def _truth(case_data) -> np.ndarray:
    from isavar.report.validation import mixture_std_map

    return mixture_std_map(case_data["volumes"], case_data["weights"])


def _particle_mask(case_data) -> np.ndarray:
    from isavar.report.validation import sphere_mask
    from isavar.synthetic.simulate import particle_radius_px

    v = case_data["volumes"][0]
    return sphere_mask(v.shape[0], particle_radius_px(v))


def evaluate(case: str, case_data, out: Path, truth_case=None) -> dict:
    """Figures of one output directory."""
    import mrcfile
    from scipy.stats import rankdata, spearmanr

    from isavar.io import read_particles
    from isavar.report.validation import masked_correlation

    ref = truth_case or case_data
    var3d = mrcfile.read(out / "var3D.mrc")
    res = {}
    truth = _truth(ref)
    res["r"] = masked_correlation(var3d, truth, _particle_mask(ref)) if truth.std() > 0 else None
    summ = json.loads((out / "summary.json").read_text())
    if (out / "particles.star").exists() and "eigenvalues" in summ:
        table = read_particles(out / "particles.star").table
        z = table["latent_1"].to_numpy()
        conf = table["true_conformation"].to_numpy()
        if case == "rotation":
            res["spearman"] = abs(float(spearmanr(z, case_data["angles"][conf]).statistic))
        elif case != "homogeneous":
            lab = conf == 0
            rk = rankdata(z)
            n1, n0 = int(lab.sum()), int((~lab).sum())
            auc = (rk[lab].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
            res["auc"] = max(auc, 1 - auc)
        mean = mrcfile.read(out / "mean.mrc").astype(np.float64)
        res["eigenvalues"] = summ["eigenvalues"]
        res["eig_over_mean_energy"] = [x / float((mean**2).sum()) for x in summ["eigenvalues"]]
        res["above_noise"] = summ["above_noise"]
        res["iterations"] = summ["iterations"]
        res["band_radius_px"] = summ["timings_s"].get("band_radius_px")
    return res


def main(argv=None) -> int:
    """Run the benchmark."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/isavar_cov_bench"))
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cases", nargs="+", default=["two_state", "homogeneous", "ubiquitin", "rotation"])
    ap.add_argument("--skip-sphire", action="store_true", help="do not run 3dvariability")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("covariance_results.json"))
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "isavar"]
    rows = []
    data = {c: simulate(args.workdir, c, args.n, args.box, args.snr) for c in args.cases}
    for case in args.cases:
        d = data[case]
        truth_case = data.get("two_state") if case == "homogeneous" else None
        runs = [("3dva K=2", ["3dva", str(d["star"]), "OUT", "--components", "2", "--CTF"])]
        if case == "two_state":
            runs.append(("3dva K=4", ["3dva", str(d["star"]), "OUT", "--components", "4", "--CTF"]))
            runs.append(("3dva K=2 --workers 1", ["3dva", str(d["star"]), "OUT", "--components", "2", "--CTF"]))
        if case != "rotation" and not args.skip_sphire:
            runs.append(("3dvariability", ["3dvariability", str(d["star"]), "OUT", "--CTF", "--img_per_grp", "100"]))
            runs.append(("3dvariability --fl 0.1 --aa 0.2",
                         ["3dvariability", str(d["star"]), "OUT", "--CTF", "--img_per_grp", "100", "--fl", "0.1",
                          "--aa", "0.2"]))
        for label, cmd in runs:
            out = args.workdir / f"{case}_{args.n}_{args.box}" / label.replace(" ", "_").replace("=", "")
            if out.exists():
                import shutil

                shutil.rmtree(out)
            workers = "1" if "--workers 1" in label else str(args.workers)
            full = py + [c if c != "OUT" else str(out) for c in cmd] + ["--workers", workers, "-q"]
            wall, rss = _run_measured(full)
            row = {"case": case, "run": label, "n": args.n, "box": args.box, "wall_s": round(wall, 1),
                   "peak_rss_mb": round(rss), **evaluate(case, d, out, truth_case)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print("\n| case | run | wall (s) | peak RSS (MB) | r var3D | AUC / rho | eigenvalues (/ mean energy) | above noise |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        lat = r.get("auc", r.get("spearman"))
        eig = ", ".join(f"{x:.2e}" for x in r.get("eig_over_mean_energy", []))
        rv = "" if r["r"] is None else f"{r['r']:.3f}"
        lv = "" if lat is None else f"{lat:.3f}"
        print(f"| {r['case']} | {r['run']} | {r['wall_s']} | {r['peak_rss_mb']} | {rv} | {lv} | {eig} | "
              f"{r.get('above_noise', '')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
