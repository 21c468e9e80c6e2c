"""Bytes a process pool receives per task in 3D variability, with and without ``shared=`` (issue 12).

The group tasks of 3D variability all need the same context: the particle geometry (orientations, origins,
CTF parameters of every particle) and the image index (file and position of every particle), which grow
with N. Before ``shared=`` every task carried it (``functools.partial(_group_task, ctx)``); now each task
carries its block of centres and the name of a file holding the context, pickled once per round.

The script simulates N particles (box 24, CTF) for each N given, runs ``variability`` on a pool of 2
workers and records, for every task the pool is given, the size of the pickle of what is submitted (the
function and its arguments, as ``concurrent.futures`` pickles them) now, and the size of
``(functools.partial(fn, shared), task)``, what the same task was before. It also records the size of
the shared file written once per round, and checks that var3D is the same bits as a serial run.

Usage::

    python bench/pool_shared_bytes.py --n 5000 10000 --workdir /tmp/pool_bytes
"""

from __future__ import annotations

import argparse
import functools
import pickle
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from isavar.parallel import pool as pool_module  # noqa: E402


class _Recorder:
    """Patches the pool to record the pickled size of every submitted task and of every shared file."""

    def __init__(self):
        self.now, self.before, self.shared = [], [], []

    def install(self, ex):
        submit = ex._pool.submit
        shared_file = pool_module._SharedFile
        recorder = self

        def recording_submit(fn, *args):
            recorder.now.append(len(pickle.dumps((fn, args), protocol=pickle.HIGHEST_PROTOCOL)))
            if fn is pool_module._call_with_shared:
                _key, path, task_fn, task = args
                with open(path, "rb") as f:
                    shared = pickle.load(f)
                old = (functools.partial(task_fn, shared), (task,))
                recorder.before.append(len(pickle.dumps(old, protocol=pickle.HIGHEST_PROTOCOL)))
            else:
                recorder.before.append(recorder.now[-1])
            return submit(fn, *args)

        class RecordingFile(shared_file):
            def __init__(self, obj):
                super().__init__(obj)
                recorder.shared.append(self.nbytes)

        ex._pool.submit = recording_submit
        pool_module._SharedFile = RecordingFile


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[5000, 10000])
    ap.add_argument("--workdir", type=Path, required=True)
    args = ap.parse_args(argv)

    from isavar.cli import main as cli
    from isavar.io import read_particles
    from isavar.parallel.serial import SerialExecutor
    from isavar.variability.params import VariabilityParams
    from isavar.variability.run import variability

    for n in args.n:
        data = args.workdir / f"n{n}"
        if not (data / "particles.star").exists():
            assert cli(["simulate", str(data), "--phantom", "two_state", "--n", str(n), "--box", "24", "--apix",
                        "6", "--snr", "1", "--seed", "8", "-q"]) == 0
        stack = read_particles(data / "particles.star")
        params = VariabilityParams(img_per_grp=20, ctf=True, lowpass_fl=0.15, lowpass_aa=0.1)
        serial = variability(stack.table, stack.images, params, pixel_size_A=stack.pixel_size_A,
                             executor=SerialExecutor())
        ex = pool_module.PoolExecutor(2)
        rec = _Recorder()
        saved = pool_module._SharedFile
        try:
            rec.install(ex)
            pooled = variability(stack.table, stack.images, params, pixel_size_A=stack.pixel_size_A, executor=ex)
        finally:
            pool_module._SharedFile = saved
            ex.close()
        assert serial.var3d.tobytes() == pooled.var3d.tobytes(), "pool and serial differ"
        tasks = len(rec.now)
        print(f"N = {n}: {tasks} tasks in {len(rec.shared)} rounds; per task before "
              f"{np.mean(rec.before) / 1e3:.1f} kB ({np.mean(rec.before) / n:.0f} B per particle), now "
              f"{np.mean(rec.now) / 1e3:.2f} kB; shared file {np.mean(rec.shared) / 1e3:.1f} kB once per round; "
              f"in all {sum(rec.before) / 1e6:.1f} MB before, {(sum(rec.now) + sum(rec.shared)) / 1e6:.2f} MB now; "
              f"var3D identical to serial")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
