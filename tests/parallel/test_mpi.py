"""The MPI executor under a real ``mpirun`` (marked ``mpi``: needs mpi4py and an MPI launcher)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.mpi


def mpirun(script: str, n: int = 2, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Run a Python script on ``n`` MPI ranks; skip when MPI is unavailable."""
    launcher = shutil.which("mpirun") or shutil.which("mpiexec")
    if launcher is None:
        pytest.skip("no mpirun on this machine")
    pytest.importorskip("mpi4py")
    args = [launcher, "-np", str(n)]
    if "Open MPI" in subprocess.run([launcher, "--version"], capture_output=True, text=True).stdout:
        args += ["--oversubscribe"] + (["--allow-run-as-root"] if os.geteuid() == 0 else [])
    return subprocess.run(args + [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_mpi_executor_map_and_allreduce():
    res = mpirun("""
        import numpy as np
        from isavar.parallel import make_executor
        ex = make_executor("auto")
        assert type(ex).__name__ == "MpiExecutor" and ex.size == 2
        assert ex.map(abs, range(-5, 0)) == [5, 4, 3, 2, 1]
        total = ex.allreduce_sum(np.full(3, ex.rank + 1.0))
        assert np.array_equal(total, [3.0, 3.0, 3.0])
        assert ex.bcast(ex.rank) == 0
        if ex.is_root():
            print("ok")
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["ok"]
