"""Does ``isavar isac2-select --auto`` (keep classes with pixel error <= --thld_err) keep good classes and drop
bad ones? Planted truth: simulated particles of 4 views plus pure-noise images (results: bench/isac2.md).

    PYTHONPATH=src python bench/isac2_select_auto.py --dir /tmp/isavar_auto

For each noise fraction and seed: 400 particles (box 48, 3 A, SNR 0.3, 4 views, 3 A shifts), ISAC2 with the
test suite's small settings (img_per_grp 50, thld_err 0.7), then every class's size, pixel error, purity
(members from its majority view / members; noise images count against it) and noise members. A class is
"bad" when its purity is < 0.7 and "good" when >= 0.9.
"""

import argparse
import json
from pathlib import Path

import numpy as np

from isavar.io import read_particles, write_particles
from isavar.isac.params import Isac2Params
from isavar.synthetic import phantom_volume, simulate_particles
from isavar.workflows.isac2 import run_isac2


def measure(folder: Path, runs) -> list[dict]:
    vol = phantom_volume("blob", 48, 3.0)
    rows = []
    for noise, seed in runs:
        imgs, table = simulate_particles(vol, 400, pixel_size_A=3.0, snr=0.3, orientations="views:4",
                                         shift_sd_A=3.0, noise_fraction=noise, rng=seed)
        path = folder / f"p{seed}.star"
        write_particles(path, imgs, table, overwrite=True)
        p = Isac2Params(radius=18, target_radius=10, target_nx=28, img_per_grp=50, minimum_grp_size=20, maxit=8,
                        init_iter=2, stab_ali=4, rand_seed=seed, thld_err=0.7, CTF=True)
        out = folder / f"o{seed}"
        run_isac2(path, out, p)
        summary = json.loads((out / "summary.json").read_text())
        members = read_particles(out / "ordered_class_averages.hdf").table["members"]
        view, is_noise = table["true_view"].to_numpy(), table["true_is_noise"].to_numpy(bool)
        for c, m in zip(summary["per_class"], members):
            m = np.asarray(m)
            real = m[~is_noise[m]]
            purity = np.bincount(view[real]).max() / len(m) if len(real) else 0.0
            rows.append(dict(noise=noise, seed=seed, cls=c["class"], members=len(m), pixel_error=c["pixel_error_working_px"],
                             purity=float(purity), noise_members=int(is_noise[m].sum())))
    return rows


def report(rows, threshold=0.7) -> None:
    for noise in sorted({r["noise"] for r in rows}, reverse=True):
        rs = [r for r in rows if r["noise"] == noise]
        kept = [r for r in rs if r["pixel_error"] <= threshold]
        rejected = [r for r in rs if r["pixel_error"] > threshold]

        def weighted(sel):
            n = sum(r["members"] for r in sel)
            return sum(r["purity"] * r["members"] for r in sel) / max(n, 1), n, sum(r["noise_members"] for r in sel)

        print(f"noise {noise}: {len(rs)} classes in {len({r['seed'] for r in rs})} runs; "
              f"bad {sum(r['purity'] < 0.7 for r in rs)} (rejected {sum(r['purity'] < 0.7 for r in rejected)}), "
              f"good {sum(r['purity'] >= 0.9 for r in rs)} (rejected {sum(r['purity'] >= 0.9 for r in rejected)}); "
              "all: purity %.3f, %d members, %d noise; " % weighted(rs) + "kept: purity %.3f, %d members, %d noise"
              % weighted(kept))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default="/tmp/isavar_auto")
    ap.add_argument("--rows", default=None, help="re-print the report of a rows.json from an earlier run")
    a = ap.parse_args()
    if a.rows:
        rows = json.loads(Path(a.rows).read_text())
    else:
        folder = Path(a.dir)
        folder.mkdir(parents=True, exist_ok=True)
        rows = measure(folder, [(0.4, s) for s in range(20, 26)] + [(0.1, s) for s in range(30, 33)])
        (folder / "rows.json").write_text(json.dumps(rows, indent=1))
    report(rows)


if __name__ == "__main__":
    main()
