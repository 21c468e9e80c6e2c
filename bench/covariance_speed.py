"""Side-by-side time of ``isavar 3dva`` and ``isavar 3dvariability`` with the same options, and 3dva's figures.

For each case of ``covariance_bench.py`` (same simulated files, re-created if missing) and each option set
(none; ``--fl 0.1 --aa 0.2``), the two commands run back to back on the same ``particles.star`` (pool
executor, ``--workers``), ``--repeats`` times, alternating which one runs first; the machine is shared, so
the ratio of each back-to-back pair is the figure, and the median over pairs is reported. Each 3dva run is
scored as in ``covariance_bench.py`` (r of var3D with the truth, AUC / |rho| of latent 1, eigenvalues,
above-noise flags), so the speed is measured on runs whose accuracy is checked.

Usage::

    PYTHONPATH=src python bench/covariance_speed.py --workdir /tmp/cov_bench --repeats 2

Prints one JSON line per run and a Markdown table; writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from covariance_bench import evaluate, simulate  # noqa: E402
from variability_bench import _run_measured  # noqa: E402

OPTION_SETS = {"default": [], "fl 0.1 aa 0.2": ["--fl", "0.1", "--aa", "0.2"]}


def main(argv=None) -> int:
    """Run the side-by-side timings."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/isavar_cov_bench"))
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cases", nargs="+", default=["two_state", "ubiquitin", "rotation", "homogeneous"])
    ap.add_argument("--options", nargs="+", default=list(OPTION_SETS), choices=list(OPTION_SETS))
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("covariance_speed.json"))
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    py = [sys.executable, "-m", "isavar"]
    data = {c: simulate(args.workdir, c, args.n, args.box, args.snr) for c in args.cases}
    two_state = data.get("two_state") or simulate(args.workdir, "two_state", args.n, args.box, args.snr)
    rows = []
    for case in args.cases:
        d = data[case]
        for opt_name in args.options:
            opts = OPTION_SETS[opt_name]
            for rep in range(args.repeats):
                base = args.workdir / f"{case}_{args.n}_{args.box}" / f"speed_{opt_name.replace(' ', '_')}_{rep}"
                shutil.rmtree(base, ignore_errors=True)
                base.mkdir(parents=True)
                cmds = {"3dva": ["3dva", str(d["star"]), str(base / "va"), "--components", "2", "--CTF", *opts],
                        "3dvariability": ["3dvariability", str(d["star"]), str(base / "var"), "--CTF",
                                          "--img_per_grp", "100", *opts]}
                order = ["3dva", "3dvariability"] if rep % 2 == 0 else ["3dvariability", "3dva"]
                row = {"case": case, "options": opt_name, "repeat": rep, "first": order[0]}
                for name in order:
                    wall, rss = _run_measured(py + cmds[name] + ["--workers", str(args.workers), "-q"])
                    row[f"{name}_s"], row[f"{name}_mb"] = round(wall, 1), round(rss)
                row["ratio"] = round(row["3dva_s"] / row["3dvariability_s"], 2)
                row["load_avg"] = round(os.getloadavg()[0], 1)
                row.update(evaluate(case, d, base / "va", two_state if case == "homogeneous" else None))
                rows.append(row)
                print(json.dumps(row), flush=True)
                args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print("\n| case | options | 3dva (s) | 3dvariability (s) | ratio per pair | median ratio | r var3D | AUC / rho "
          "| above noise |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in args.cases:
        for opt_name in args.options:
            sel = [r for r in rows if r["case"] == case and r["options"] == opt_name]
            ratios = [r["ratio"] for r in sel]
            lat = sel[-1].get("auc", sel[-1].get("spearman"))
            rv = "" if sel[-1]["r"] is None else f"{sel[-1]['r']:.3f}"
            print(f"| {case} | {opt_name} | {' / '.join(str(r['3dva_s']) for r in sel)} | "
                  f"{' / '.join(str(r['3dvariability_s']) for r in sel)} | {' / '.join(map(str, ratios))} | "
                  f"{np.median(ratios):.2f} | {rv} | {'' if lat is None else f'{lat:.3f}'} | "
                  f"{sel[-1].get('above_noise', '')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
