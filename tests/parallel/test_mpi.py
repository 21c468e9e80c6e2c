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


def test_3dvariability_under_mpi_equals_serial(tmp_path):
    """Two MPI ranks give the same var3D and ave3D, bit for bit, as one process."""
    import numpy as np

    from isavar.cli import main
    from isavar.io import read_volume

    data = tmp_path / "data"
    assert main(["simulate", str(data), "--phantom", "two_state", "--n", "300", "--box", "32", "--apix", "6",
                 "--snr", "1", "--seed", "4", "-q"]) == 0
    serial, parallel = tmp_path / "serial", tmp_path / "mpi"
    options = ["--img_per_grp=30", "--CTF", "--fl=0.2", "--aa=0.1", "-q"]
    assert main(["3dvariability", str(data / "particles.star"), str(serial), *options, "--executor", "serial"]) == 0
    res = mpirun(f"""
        from isavar.cli import main
        status = main(["3dvariability", {str(data / "particles.star")!r}, {str(parallel)!r},
                       *{options!r}, "--executor", "mpi"])
        assert status == 0, status
    """)
    assert res.returncode == 0, res.stderr
    for name in ("var3D.mrc", "ave3D.mrc"):
        a, b = read_volume(serial / name)[0], read_volume(parallel / name)[0]
        assert np.abs(a).max() > 0
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def variability_runs(tmp_path_factory):
    """2,100 particles (3 blocks of 1,024 centres, 3 rounds): the serial run and its inputs."""
    from isavar.cli import main

    d = tmp_path_factory.mktemp("mpi_var")
    assert main(["simulate", str(d / "data"), "--phantom", "two_state", "--n", "2100", "--box", "24", "--apix",
                 "6", "--snr", "1", "--seed", "8", "-q"]) == 0
    options = ["--img_per_grp=20", "--CTF", "--fl=0.15", "--aa=0.1", "-q"]
    star = d / "data" / "particles.star"
    assert main(["3dvariability", str(star), str(d / "serial"), *options, "--executor", "serial",
                 "--project-dir", str(d / "serial")]) == 0
    return star, d / "serial", options


@pytest.mark.parametrize("ranks", [2, 3])
def test_3dvariability_maps_under_mpi_equal_serial_and_pool(variability_runs, tmp_path, ranks):
    """2 and 3 ranks (rounds of blocks split unevenly over them) and a pool of 2: every map and 2D stack the
    same bytes as one process; the per-particle table (group radii) reaches the root."""
    import json

    from isavar.cli import main

    star, serial, options = variability_runs
    out = tmp_path / f"mpi{ranks}"
    res = mpirun(f"""
        from isavar.cli import main
        status = main(["3dvariability", {str(star)!r}, {str(out)!r}, *{options!r}, "--executor", "mpi",
                       "--project-dir", {str(out)!r}])
        assert status == 0, status
    """, n=ranks)
    assert res.returncode == 0, res.stderr
    runs = [out]
    if ranks == 2:
        assert main(["3dvariability", str(star), str(tmp_path / "pool"), *options, "--executor", "pool",
                     "--workers", "2", "--project-dir", str(tmp_path / "pool")]) == 0
        runs.append(tmp_path / "pool")
    for run in runs:
        for name in ("var3D.mrc", "ave3D.mrc", "var2D.mrcs", "ave2D.mrcs", "var2D.star", "ave2D.star"):
            assert (serial / name).read_bytes() == (run / name).read_bytes(), (run.name, name)
        a, b = (json.loads((r / "summary.json").read_text()) for r in (serial, run))
        assert a["group_radius_deg"] == b["group_radius_deg"] and a["var3d"] == b["var3d"]
        assert not list(run.glob(".*scratch"))


def _isac2_serial_and_mpi(tmp_path, simulate: list[str], options: list[str], ranks: int):
    """Simulate a data set, run ``isac2`` on one process and on ``ranks`` MPI ranks; check the class averages
    and parameters are identical; return both output directories."""
    import mrcfile
    import numpy as np

    from isavar.cli import main

    data = tmp_path / "data"
    assert main(["simulate", str(data), *simulate, "-q"]) == 0
    serial, parallel = tmp_path / "serial", tmp_path / "mpi"
    assert main(["isac2", str(data / "particles.star"), str(serial), *options, "--executor", "serial"]) == 0
    res = mpirun(f"""
        from isavar.cli import main
        status = main(["isac2", {str(data / "particles.star")!r}, {str(parallel)!r}, *{options!r},
                       "--executor", "mpi"])
        assert status == 0, status
    """, n=ranks)
    assert res.returncode == 0, res.stderr
    a, b = mrcfile.read(serial / "class_averages.mrcs"), mrcfile.read(parallel / "class_averages.mrcs")
    assert len(a) > 0
    np.testing.assert_array_equal(a, b)
    assert (serial / "all_parameters.txt").read_text() == (parallel / "all_parameters.txt").read_text()
    return serial, parallel


def test_isac2_under_mpi_equals_serial(tmp_path):
    """One seed: two MPI ranks and one process give identical class averages and parameters (Q4)."""
    _isac2_serial_and_mpi(
        tmp_path, ["--phantom", "blob", "--n", "300", "--box", "64", "--apix", "3", "--snr", "0.3",
                   "--orientations", "views:4", "--seed", "3"],
        ["--radius=26", "--CTF", "--img_per_grp=60", "--minimum_grp_size=25", "--init_iter=2", "--maxit=8",
         "--stab_ali=3", "--rand_seed=5", "-q"], ranks=2)


@pytest.mark.parametrize("ranks", [2, 3])
def test_map_sum_is_bit_identical_to_serial_at_any_rank_count(ranks):
    """One reduction of exact partial sums: 2 and 3 ranks give a serial run's bits; extras stay on their rank."""
    res = mpirun("""
        import numpy as np
        from isavar.parallel import make_executor
        from isavar.parallel.serial import SerialExecutor

        def task(seed):
            rng = np.random.default_rng(seed)
            return (rng.normal(size=(5, 4)) * 10.0 ** rng.integers(-8, 8), rng.normal(size=3) + 2j), seed

        ex = make_executor("auto")
        mine = []
        got = ex.map_sum(task, range(13), on_result=mine.append)
        want = SerialExecutor().map_sum(task, range(13))
        assert all(a.tobytes() == b.tobytes() for a, b in zip(got, want))
        limbs = ex.map_sum(task, range(13), exact=True)               # the exact sum itself, on every rank
        serial = SerialExecutor().map_sum(task, range(13), exact=True)
        assert np.array_equal(limbs.limbs, serial.limbs) and limbs.count == serial.count == 13
        everyone = ex.gather(mine)
        if ex.is_root():
            assert sorted(x for part in everyone for x in part) == list(range(13))
            print("ok")
        else:
            assert everyone is None
    """, n=ranks)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("ok") == 1, res.stdout       # numba adds an ANSI reset at exit under mpirun


def test_task_costs_balance_the_ranks_blocks_without_changing_results():
    """``cost=``: with one expensive task, rank 0 runs only it; the results are a serial run's."""
    res = mpirun("""
        import numpy as np
        from isavar.parallel import make_executor
        from isavar.parallel.serial import SerialExecutor

        def task(seed):
            return (np.random.default_rng(seed).normal(size=4),), seed

        ex = make_executor("auto")
        cost = [20] + [1] * 12
        mine = []
        got = ex.map_sum(task, range(13), on_result=mine.append, cost=cost)
        assert got[0].tobytes() == SerialExecutor().map_sum(task, range(13))[0].tobytes()
        listed = ex.map(lambda s: s * s, range(13), cost=cost)
        assert listed == [s * s for s in range(13)]
        # rank 0 with nothing to do: the sum still reaches every rank
        lopsided = ex.map_sum(task, range(4), cost=[1, 0, 0, 0])          # blocks (0, 0) and (0, 4)
        assert lopsided[0].tobytes() == SerialExecutor().map_sum(task, range(4))[0].tobytes()
        everyone = ex.gather(mine)
        if ex.is_root():
            assert everyone[0] == [0] and everyone[1] == list(range(1, 13)), everyone
            print("ok")
    """, n=2)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("ok") == 1, res.stdout


def test_shared_context_under_mpi_gives_the_bits_of_partial():
    """``shared=``: every rank uses its own context; map and map_sum equal a serial ``partial(fn, ctx)``."""
    res = mpirun("""
        import functools
        import numpy as np
        from isavar.parallel import make_executor
        from isavar.parallel.serial import SerialExecutor

        def task(ctx, seed):
            rng = np.random.default_rng(seed)
            rows = rng.integers(0, ctx.size, size=20)
            return (ctx[rows].reshape(5, 4) * 10.0 ** rng.integers(-8, 8), ctx[rows[:3]] + 2j), seed

        ctx = np.random.default_rng(4).normal(size=10_000)     # built the same on every rank
        ex = make_executor("auto")
        got = ex.map_sum(task, range(13), shared=ctx)
        want = SerialExecutor().map_sum(functools.partial(task, ctx), range(13))
        assert all(a.tobytes() == b.tobytes() for a, b in zip(got, want))
        assert ex.map(lambda c, i: float(c[i]), range(5), shared=ctx) == ctx[:5].tolist()
        if ex.is_root():
            print("ok")
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("ok") == 1, res.stdout


def test_isac2_candidate_search_under_three_ranks_equals_serial(tmp_path):
    """The candidate EQK search (K > 2 x eqk_candidates) on 3 ranks, its coarse step restricted to the
    neighbours of each image's previous class after the first EQK iteration (K > 4 x eqk_neighbours): each rank
    reads its own rows of the working stack, scores go to the root, class sums are reduced; results identical
    to one process.

    All outputs are compared, the full-size averages included, so ``--skip_ordering`` keeps it short."""
    import mrcfile
    import numpy as np

    serial, parallel = _isac2_serial_and_mpi(
        tmp_path, ["--phantom", "blob", "--n", "340", "--box", "48", "--apix", "4", "--snr", "0.5",
                   "--orientations", "views:6", "--seed", "8"],
        ["--radius=18", "--CTF", "--img_per_grp=17", "--minimum_grp_size=8", "--init_iter=1", "--maxit=4",
         "--stab_ali=2", "--rand_seed=11", "--skip_ordering", "--eqk_neighbours=4", "-q"], ranks=3)
    # the full-size averages: every rank sums the members it reads, one exact reduction
    np.testing.assert_array_equal(mrcfile.read(serial / "class_averages_fullres.mrcs"),
                                  mrcfile.read(parallel / "class_averages_fullres.mrcs"))
    assert not list(parallel.glob(".*.work.npy"))            # the temporary stacks are gone
