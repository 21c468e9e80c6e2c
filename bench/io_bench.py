"""I/O benchmark: stream a large MRCS stack to disk and back through isavar.io.

Writes ``--n`` images of ``--box``^2 float32 with :func:`isavar.io.write_image_stack`
(streamed in chunks), then reads them back with :func:`isavar.io.read_particles` and
``images.chunks(chunk)`` in a fresh child process per chunk size, and compares the
throughput with a raw sequential read of the same file (``dd bs=16M``). Cold reads
evict the file from the page cache first with ``posix_fadvise(DONTNEED)`` (this
file only; nothing system-wide). Peak resident memory (``ru_maxrss``) of each reader
process is reported together with its baseline after imports, to show that memory is
bounded by the chunk size, not the stack size. The stack is deleted at the end unless
``--keep``.

Usage::

    OMP_NUM_THREADS=1 PYTHONPATH=src python bench/io_bench.py --n 100000 --box 128 --dir /tmp/isavar_bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _maxrss_mb() -> float:
    """Peak resident set size of this process in MB (``ru_maxrss``; on Linux it includes the
    parent's resident size at fork time, which is why the parent process stays small)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _vm_hwm_mb() -> float | None:
    """Peak RSS of this address space from /proc/self/status (VmHWM, Linux), as a cross-check."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def write_stack(path: Path, n: int, box: int, chunk: int, seed: int) -> dict:
    """Write the stack; the source chunk is generated once and offset per chunk (so RNG cost is not timed)."""
    from isavar.io import write_image_stack

    base = np.random.default_rng(seed).standard_normal((chunk, box, box), dtype=np.float32)

    def chunks():
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            yield base[:k] + np.float32(start % 97)

    t0 = time.perf_counter()
    written = write_image_stack(path, chunks(), 1.0, overwrite=True)
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    seconds = time.perf_counter() - t0
    size = path.stat().st_size
    return {"images": written, "bytes": size, "seconds": seconds, "MB_per_s": size / seconds / 1e6,
            "peak_rss_MB": _maxrss_mb(), "vm_hwm_MB": _vm_hwm_mb()}


def raw_read(path: Path, cold: bool) -> dict:
    """Sequential read of the whole file with dd (16 MiB blocks)."""
    if cold:
        _evict(path)
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=16M"], check=True, capture_output=True)
    seconds = time.perf_counter() - t0
    size = path.stat().st_size
    return {"seconds": seconds, "MB_per_s": size / seconds / 1e6}


def isavar_read(path: Path, chunk: int, cold: bool) -> dict:
    """Read every image through read_particles + chunks in a fresh process; returns its timings and RSS."""
    if cold:
        _evict(path)
    out = subprocess.run([sys.executable, __file__, "--read-child", str(path), "--chunk", str(chunk)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _read_child(path: Path, chunk: int) -> None:
    from isavar.io import read_particles

    baseline = _maxrss_mb()
    t0 = time.perf_counter()
    stack = read_particles(path)
    total, count = 0.0, 0
    for _, _, block in stack.images.chunks(chunk):
        total += float(block[:, 0, 0].sum())
        count += block.shape[0]
    stack.close()
    seconds = time.perf_counter() - t0
    size = path.stat().st_size
    print(json.dumps({"images": count, "seconds": seconds, "MB_per_s": size / seconds / 1e6,
                      "baseline_rss_MB": baseline, "peak_rss_MB": _maxrss_mb(), "vm_hwm_MB": _vm_hwm_mb(),
                      "chunk_MB": chunk * stack.images.box ** 2 * 4 / 1e6, "checksum": total}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--box", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--dir", default="/tmp/isavar_bench")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--read-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--write-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.read_child:
        _read_child(Path(args.read_child), args.chunk)
        return 0
    if args.write_child:
        print(json.dumps(write_stack(Path(args.write_child), args.n, args.box, args.chunk, args.seed)))
        return 0

    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    need = args.n * args.box * args.box * 4 + 1024
    free = shutil.disk_usage(folder).free
    n = args.n
    if need > 0.8 * free:
        n = int(0.8 * free / (args.box * args.box * 4))
        print(f"only {free / 1e9:.1f} GB free: writing {n} images instead of {args.n}", file=sys.stderr)
    path = folder / "bench_stack.mrcs"
    results = {"machine": {"python": platform.python_version(), "platform": platform.platform(),
                           "cpus": os.cpu_count(), "numpy": np.__version__},
               "n": n, "box": args.box, "file_GB": n * args.box ** 2 * 4 / 1e9, "free_disk_GB": free / 1e9}
    try:
        out = subprocess.run([sys.executable, __file__, "--write-child", str(path), "--n", str(n), "--box",
                              str(args.box), "--chunk", str(args.chunk), "--seed", str(args.seed)],
                             check=True, capture_output=True, text=True)
        results["write"] = json.loads(out.stdout.strip().splitlines()[-1])
        results["raw_cold"] = raw_read(path, cold=True)
        results["isavar_cold"] = isavar_read(path, args.chunk, cold=True)
        results["raw_warm"] = raw_read(path, cold=False)
        results["isavar_warm"] = isavar_read(path, args.chunk, cold=False)
        results["isavar_cold_by_chunk"] = {str(c): isavar_read(path, c, cold=True) for c in (128, 4096)}
    finally:
        if not args.keep and path.exists():
            path.unlink()
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
