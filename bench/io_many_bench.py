"""I/O benchmark at users' scale: one STAR file and one cryoSPARC .cs of 1,000,000 particles over 5,000 .mrcs files.

``make`` writes a RELION project the way RELION's Extract job lays it out::

    PROJECT/Extract/job007/Movies/mic_00001.mrcs ... mic_05000.mrcs   (n / files images each)
    PROJECT/Extract/job007/particles.star     rlnImageName = 000001@Extract/job007/Movies/mic_00001.mrcs
    PROJECT/J12/J12_particles.cs              blob/path   = Extract/job007/Movies/mic_00001.mrcs

The STAR file is RELION 3.1 (``data_optics`` + ``data_particles`` with the columns an Extract job writes:
coordinates, micrograph name, CTF, autopick figure of merit, ...), written with ``starfile``; image names are
relative to the project directory, as RELION writes them. The ``.cs`` is written with cryosparc-tools'
``Dataset`` (numpy format, as cryoSPARC saves it) with the ``blob``, ``ctf`` and ``location`` fields of an
extracted particle set; ``blob/path`` names the same ``.mrcs`` files relative to the project directory.

``measure`` reads both through :func:`isavar.read_particles` in a fresh child process each, from the
project directory, cold (every file evicted from the page cache with ``posix_fadvise(DONTNEED)``, these
files only) and then warm, and reports: time to open (parse the table, resolve the 5,000 paths, read the
5,000 headers), time to the first image, the time of one pass over every image with ``images.chunks(1024)``
(and its throughput against ``cat`` of the same files in the same order), the largest number of open file
descriptors seen during the pass (counted in ``/proc/self/fd`` after every chunk), peak resident memory
(``VmHWM``) and the table's own size (``DataFrame.memory_usage(deep=True)``); then a random subset of
5,000 particles read with one ``images[rows]`` (grouped by file) and ``isavar info`` on the STAR file.
``shuffled`` reads the first ``--n`` particles in a random row order, cold, once in table order and once in
``images.file_order()``.

Usage::

    PYTHONPATH=src python bench/io_many_bench.py make --dir /tmp/isavar_io_many --n 1000000 --files 5000 --box 64
    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/io_many_bench.py measure --dir /tmp/isavar_io_many
    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/io_many_bench.py shuffled --dir /tmp/isavar_io_many --n 100000
    python bench/io_many_bench.py clean --dir /tmp/isavar_io_many

``--sparse`` (make) writes every stack as a sparse file (a real header, the pixels a hole reading as zeros)
when the disk cannot hold the pixels; opening and table costs are then real, read throughput is not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

STACKS = Path("Extract/job007/Movies")
STAR = Path("Extract/job007/particles.star")
CS = Path("J12/J12_particles.cs")
PIXEL = 1.06


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _counts(n: int, files: int) -> np.ndarray:
    counts = np.full(files, n // files, dtype=np.int64)
    counts[: n % files] += 1
    return counts


def _stack_names(files: int) -> list[str]:
    return [(STACKS / f"mic_{i + 1:05d}.mrcs").as_posix() for i in range(files)]


# ------------------------------------------------------------------------------------------------ make
def make(folder: Path, n: int, files: int, box: int, seed: int, sparse: bool) -> dict:
    """Write the stacks, the STAR file and the .cs; returns sizes and timings."""
    from isavar.io import write_image_stack

    counts = _counts(n, files)
    need = 0 if sparse else int(counts.sum()) * box * box * 4
    free = shutil.disk_usage(folder.parent if not folder.exists() else folder).free
    if need > 0.85 * free:
        raise SystemExit(f"the stacks need {need / 1e9:.1f} GB but only {free / 1e9:.1f} GB are free: "
                         "use a smaller --box or --sparse")
    (folder / STACKS).mkdir(parents=True, exist_ok=True)
    (folder / CS).parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((int(counts.max()), box, box), dtype=np.float32)
    names = _stack_names(files)
    t0 = time.perf_counter()
    for i, (name, k) in enumerate(zip(names, counts)):
        path = folder / name
        if sparse:
            write_image_stack(path, base[:1], PIXEL, overwrite=True)        # header of a 1-image stack
            with open(path, "r+b") as fh:                                     # ... patched to k images
                header = bytearray(fh.read(1024))
                header[8:12] = np.int32(k).tobytes()
                header[36:40] = np.int32(k).tobytes()                          # mz stays 1 for stacks
                fh.seek(0)
                fh.write(bytes(header))
            os.truncate(path, 1024 + int(k) * box * box * 4)
        else:
            write_image_stack(path, base[:k] + np.float32(i % 101), PIXEL, overwrite=True)
    stacks_s = time.perf_counter() - t0

    t0 = time.perf_counter()
    table = _particle_columns(rng, counts, names)
    _write_star(folder / STAR, table, box)
    star_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _write_cs(folder / CS, table, rng, box)
    cs_s = time.perf_counter() - t0
    return {"n": int(counts.sum()), "files": files, "box": box, "sparse": sparse,
            "stack_bytes": int(sum((folder / p).stat().st_size for p in names)),
            "star_bytes": (folder / STAR).stat().st_size, "cs_bytes": (folder / CS).stat().st_size,
            "write_stacks_s": stacks_s, "write_star_s": star_s, "write_cs_s": cs_s}


def _particle_columns(rng, counts: np.ndarray, names: list[str]) -> dict:
    """The per-particle values both files share (arrays of length n, in file order)."""
    n = int(counts.sum())
    file_of = np.repeat(np.arange(len(counts)), counts)
    index = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)
    mic_defocus = rng.uniform(8000, 30000, len(counts))
    du = mic_defocus[file_of] + rng.normal(0, 200, n)
    return {
        "file_of": file_of, "index": index, "names": names,
        "x": rng.uniform(100, 4000, n).round(), "y": rng.uniform(100, 4000, n).round(),
        "du": du, "dv": du - rng.uniform(0, 500, n), "angle": rng.uniform(0, 180, n),
        "fom": rng.uniform(0, 5, n), "maxres": rng.uniform(3, 8, len(counts))[file_of],
    }


def _write_star(path: Path, t: dict, box: int) -> None:
    import pandas as pd

    from isavar.io.star import write_star_blocks

    names = np.array(t["names"], dtype=object)
    mics = np.array([s.replace("Extract/job007/Movies/", "MotionCorr/job002/Movies/").replace(".mrcs", ".mrc")
                     for s in t["names"]], dtype=object)
    image_names = [f"{i + 1:06d}@{names[f]}" for i, f in zip(t["index"].tolist(), t["file_of"].tolist())]
    particles = pd.DataFrame({
        "rlnCoordinateX": t["x"], "rlnCoordinateY": t["y"], "rlnAutopickFigureOfMerit": t["fom"],
        "rlnClassNumber": 1, "rlnAnglePsi": -999.0, "rlnImageName": image_names,
        "rlnMicrographName": mics[t["file_of"]], "rlnOpticsGroup": 1, "rlnCtfMaxResolution": t["maxres"],
        "rlnCtfFigureOfMerit": 0.1, "rlnDefocusU": t["du"], "rlnDefocusV": t["dv"],
        "rlnDefocusAngle": t["angle"], "rlnCtfBfactor": 0.0, "rlnCtfScalefactor": 1.0, "rlnPhaseShift": 0.0,
    })
    optics = pd.DataFrame({"rlnOpticsGroupName": ["opticsGroup1"], "rlnOpticsGroup": [1],
                           "rlnMicrographOriginalPixelSize": [PIXEL], "rlnVoltage": [300.0],
                           "rlnSphericalAberration": [2.7], "rlnAmplitudeContrast": [0.1],
                           "rlnImagePixelSize": [PIXEL], "rlnImageSize": [box], "rlnImageDimensionality": [2],
                           "rlnCtfDataAreCtfPremultiplied": [0]})
    write_star_blocks(path, {"optics": optics, "particles": particles}, float_format="%.6f")


def _write_cs(path: Path, t: dict, rng, box: int) -> None:
    from cryosparc.dataset import Dataset

    n = len(t["index"])
    names = np.array(t["names"], dtype=object)
    mics = np.array([s.replace("Extract/job007/Movies/", "J3/motioncorrected/").replace(".mrcs", ".mrc")
                     for s in t["names"]], dtype=object)
    dset = Dataset.allocate(n, [
        ("blob/path", "O"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)), ("blob/psize_A", "<f4"),
        ("blob/sign", "<f4"), ("blob/import_sig", "<u8"),
        ("ctf/type", "O"), ("ctf/exp_group_id", "<u4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"),
        ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"),
        ("ctf/phase_shift_rad", "<f4"), ("ctf/scale", "<f4"), ("ctf/bfactor", "<f4"),
        ("location/micrograph_uid", "<u8"), ("location/micrograph_path", "O"),
        ("location/micrograph_shape", "<u4", (2,)), ("location/center_x_frac", "<f4"),
        ("location/center_y_frac", "<f4"),
    ])
    dset["uid"] = rng.integers(1, np.iinfo(np.int64).max, n, dtype=np.int64).astype(np.uint64)
    dset["blob/path"] = names[t["file_of"]]
    dset["blob/idx"] = t["index"].astype(np.uint32)
    dset["blob/shape"] = np.array([box, box], dtype=np.uint32)
    dset["blob/psize_A"] = PIXEL
    dset["blob/sign"] = -1.0
    dset["ctf/type"] = "imported"
    dset["ctf/accel_kv"] = 300.0
    dset["ctf/cs_mm"] = 2.7
    dset["ctf/amp_contrast"] = 0.1
    dset["ctf/df1_A"] = t["du"]
    dset["ctf/df2_A"] = t["dv"]
    dset["ctf/df_angle_rad"] = np.deg2rad(t["angle"])
    dset["ctf/scale"] = 1.0
    dset["location/micrograph_uid"] = (t["file_of"] + 1000).astype(np.uint64)
    dset["location/micrograph_path"] = mics[t["file_of"]]
    dset["location/micrograph_shape"] = np.array([4096, 4096], dtype=np.uint32)
    dset["location/center_x_frac"] = t["x"] / 4096
    dset["location/center_y_frac"] = t["y"] / 4096
    dset.save(str(path))


# --------------------------------------------------------------------------------------------- measure
def _evict(folder: Path) -> None:
    for p in [folder / STAR, folder / CS, *sorted((folder / STACKS).glob("*.mrcs"))]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _child(path: str, chunk: int, subset: int) -> dict:
    """Runs in a fresh process, in the project directory."""
    import isavar

    baseline = _status_mb("VmHWM")
    fds0 = _open_fds()
    t0, c0 = time.perf_counter(), time.process_time()
    stack = isavar.read_particles(path)
    t_open, c_open = time.perf_counter() - t0, time.process_time() - c0
    rss_open = _status_mb("VmRSS")
    first = stack.images[0]
    t_first = time.perf_counter() - t0
    table_mb = stack.table.memory_usage(deep=True).sum() / 1e6
    max_fds, count, check = _open_fds(), 0, 0.0
    t1, c1 = time.perf_counter(), time.process_time()
    for _, _, block in stack.images.chunks(chunk):
        count += block.shape[0]
        check += float(block[:, 0, 0].sum())
        max_fds = max(max_fds, _open_fds())
    t_pass, c_pass = time.perf_counter() - t1, time.process_time() - c1
    peak_pass, rss_pass = _status_mb("VmHWM"), _status_mb("VmRSS")
    rng = np.random.default_rng(1)
    rows = rng.choice(len(stack), size=min(subset, len(stack)), replace=False)
    t2 = time.perf_counter()
    sub = stack.images[rows]
    t_subset = time.perf_counter() - t2
    max_fds = max(max_fds, _open_fds())
    nbytes = count * stack.images.box ** 2 * 4
    stack.close()
    return {"file": path, "n": len(stack.table), "stacks": len(stack.images.sources), "box": stack.images.box,
            "first_pixel": float(first[0, 0]), "open_s": t_open, "open_cpu_s": c_open, "first_image_s": t_first,
            "pass_s": t_pass, "pass_cpu_s": c_pass, "pass_MB_per_s": nbytes / t_pass / 1e6, "images_per_s": count / t_pass,
            "subset": int(rows.size), "subset_s": t_subset, "subset_checksum": float(sub[:, 0, 0].sum()),
            "fds_before": fds0, "max_fds": max_fds, "baseline_rss_MB": baseline, "rss_after_open_MB": rss_open,
            "rss_after_pass_MB": rss_pass, "peak_rss_open_and_pass_MB": peak_pass, "peak_rss_MB": _status_mb("VmHWM"), "table_MB": table_mb, "checksum": check}


def shuffled(folder: Path, n: int, chunk: int, seed: int) -> dict:
    """A shuffled table: the first ``n`` particles in random row order, read cold in table order and then
    cold in ``images.file_order()``; same process, the stacks evicted before each pass."""
    import isavar

    os.chdir(folder)
    stack = isavar.read_particles(STAR)
    rows = np.random.default_rng(seed).permutation(n)
    images = stack.images.subset(rows)
    files = sorted({stack.images.sources[s].path for s in np.unique(images._source_ids)})
    out = {"n": n, "files": len(files), "chunk": chunk}
    for label, view in (("table_order", images), ("file_order", images.subset(images.file_order()))):
        for p in files:
            fd = os.open(p, os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        t0, check = time.perf_counter(), 0.0
        for _, _, block in view.chunks(chunk):
            check += float(block[:, 0, 0].sum())
        seconds = time.perf_counter() - t0
        out[label] = {"seconds": seconds, "MB_per_s": n * stack.images.box ** 2 * 4 / seconds / 1e6,
                      "checksum": check}
        view.close()
    return out


def _run_child(folder: Path, rel: Path, chunk: int, subset: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "child", str(rel), "--chunk", str(chunk),
                          "--subset", str(subset)], cwd=folder, env=env, check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _raw_read(folder: Path) -> dict:
    files = sorted((folder / STACKS).glob("*.mrcs"))
    t0 = time.perf_counter()
    subprocess.run(["xargs", "-0", "cat"], input=b"\0".join(str(p).encode() for p in files),
                   stdout=subprocess.DEVNULL, check=True)
    seconds = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in files)
    return {"seconds": seconds, "MB_per_s": size / seconds / 1e6}


def _info(folder: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    t0 = time.perf_counter()
    out = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "isavar", "info", str(STAR)],
                         cwd=folder, env=env, check=True, capture_output=True, text=True)
    return {"seconds": time.perf_counter() - t0, "peak_rss_MB": int(out.stderr.strip().splitlines()[-1]) / 1024,
            "stdout": out.stdout}


def measure(folder: Path, chunk: int, subset: int, warm: bool) -> dict:
    results = {"machine": {"python": platform.python_version(), "platform": platform.platform(),
                           "cpus": os.cpu_count(), "numpy": np.__version__}}
    for label, rel in (("star", STAR), ("cs", CS)):
        _evict(folder)
        results[f"{label}_cold"] = _run_child(folder, rel, chunk, subset)
        if warm:
            results[f"{label}_warm"] = _run_child(folder, rel, chunk, subset)
    _evict(folder)
    results["cat_cold"] = _raw_read(folder)
    results["cat_warm"] = _raw_read(folder) if warm else None
    results["info_star"] = _info(folder)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make")
    p.add_argument("--dir", default="/tmp/isavar_io_many")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--files", type=int, default=5000)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sparse", action="store_true")
    p = sub.add_parser("measure")
    p.add_argument("--dir", default="/tmp/isavar_io_many")
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--subset", type=int, default=5_000)
    p.add_argument("--no-warm", action="store_true")
    p = sub.add_parser("shuffled")
    p.add_argument("--dir", default="/tmp/isavar_io_many")
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("clean")
    p.add_argument("--dir", default="/tmp/isavar_io_many")
    p = sub.add_parser("child")
    p.add_argument("path")
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("--subset", type=int, default=5_000)
    args = parser.parse_args(argv)
    if args.command == "child":
        print(json.dumps(_child(args.path, args.chunk, args.subset)))
    elif args.command == "make":
        folder = Path(args.dir)
        print(json.dumps(make(folder, args.n, args.files, args.box, args.seed, args.sparse), indent=2))
    elif args.command == "shuffled":
        print(json.dumps(shuffled(Path(args.dir), args.n, args.chunk, args.seed), indent=2))
    elif args.command == "measure":
        print(json.dumps(measure(Path(args.dir), args.chunk, args.subset, not args.no_warm), indent=2))
    else:
        shutil.rmtree(args.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
