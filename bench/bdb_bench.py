"""Reading a SPHIRE/EMAN2 BDB stack against the same particles in EMAN2 HDF (results: bench/io.md).

    PYTHONPATH=src python bench/bdb_bench.py --n 10000 --box 64 --dir /tmp/isavar_bdb_bench

Writes N random images with SPHIRE-like headers (CTF, 3D pose, micrograph) as a BDB stack in EMAN2's layout
(``isavar.io.bdb.write_bdb``; EMAN2 2.91 reads such stacks, tests/io/test_bdb.py) and as an HDF file, then
times ``read_particles`` (headers -> table) and one pass over every image in 1024-image chunks for each
(warm page cache; the files were just written).
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from isavar.io import read_particles, write_particles
from isavar.io.bdb import headers_from_table, write_bdb


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--dir", default="/tmp/isavar_bdb_bench")
    a = ap.parse_args()
    folder = Path(a.dir)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    n, box = a.n, a.box
    imgs = rng.standard_normal((n, box, box), dtype=np.float32)
    table = pd.DataFrame({
        "defocus_u_A": rng.uniform(1e4, 3e4, n), "defocus_v_A": rng.uniform(1e4, 3e4, n),
        "defocus_angle_deg": rng.uniform(0, 180, n), "voltage_kV": 300.0, "cs_mm": 2.7, "amplitude_contrast": 0.1,
        "angle_rot_deg": rng.uniform(-180, 180, n), "angle_tilt_deg": rng.uniform(0, 180, n),
        "angle_psi_deg": rng.uniform(-180, 180, n), "origin_x_A": rng.normal(0, 2, n),
        "origin_y_A": rng.normal(0, 2, n), "pixel_size_A": 1.5,
        "micrograph_name": [f"mic_{i // 100:04d}.mrc" for i in range(n)]})
    results = {"n": n, "box": box}
    t = time.perf_counter()
    write_bdb(folder, "stack", headers_from_table(table), box, images=[imgs], overwrite=True)
    results["write_bdb_s"] = time.perf_counter() - t
    write_particles(folder / "stack.hdf", imgs, table, overwrite=True)
    for label, name in (("bdb", f"bdb:{folder}#stack"), ("hdf", str(folder / "stack.hdf"))):
        t = time.perf_counter()
        stack = read_particles(name)
        results[f"{label}_headers_s"] = time.perf_counter() - t
        t = time.perf_counter()
        total = sum(float(block.sum(dtype=np.float64)) for _, _, block in stack.images.chunks(1024))
        results[f"{label}_pixels_s"] = time.perf_counter() - t
        results[f"{label}_checksum"] = total
        stack.close()
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
