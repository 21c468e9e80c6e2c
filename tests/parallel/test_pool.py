"""The process pool: workers exit with their parent, ignore Ctrl-C, and are capped at the cores available."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from isavar.parallel.pool import PoolExecutor, available_cores

SRC = str(Path(__file__).resolve().parents[2] / "src")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _gone(pid: int) -> bool:
    """True when the process no longer exists or is a zombie waiting for its (new) parent to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


def _wait_until(predicate, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


_SCRIPT = textwrap.dedent("""
    import os, signal, sys, time
    from isavar.parallel.pool import PoolExecutor

    # Ctrl-C as in a terminal: a job started in the background by a non-interactive shell (a CI script under
    # nohup, `cmd &`) inherits SIGINT ignored, and Python then raises no KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def pid_of_worker(_):
        time.sleep(0.3)
        return os.getpid()

    def slow(_):
        time.sleep(20)                          # far longer than the test's wait before Ctrl-C
        return 0

    ex = PoolExecutor(2)
    pids = sorted(set(ex.map(pid_of_worker, range(8))))
    print(" ".join(map(str, pids)), flush=True)
    mode = sys.argv[1]
    if mode == "wait":
        time.sleep(600)
    else:                                       # Ctrl-C while the workers are busy
        try:
            print("busy", flush=True)
            ex.map(slow, range(1))             # one worker busy, the other idle
        except KeyboardInterrupt:
            getattr(ex, "terminate", ex.close)()
            print("interrupted", file=sys.stderr, flush=True)
            sys.exit(130)
""")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_workers_exit_when_the_parent_is_killed(tmp_path):
    script = tmp_path / "pool_parent.py"
    script.write_text(_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), "wait"], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert pids and all(not _gone(p) for p in pids)
        os.kill(proc.pid, signal.SIGKILL)                  # as the out-of-memory killer does
        proc.wait(timeout=10)
        assert _wait_until(lambda: all(_gone(p) for p in pids), timeout=20), "orphaned workers still alive"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


@pytest.mark.skipif(os.name != "posix", reason="process groups and SIGINT")
def test_ctrl_c_stops_the_workers_without_tracebacks(tmp_path):
    script = tmp_path / "pool_ctrl_c.py"
    script.write_text(_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), "interrupt"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(), start_new_session=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert proc.stdout.readline().strip() == "busy"
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)                 # a terminal's Ctrl-C reaches the whole group
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130
    assert err.strip() == "interrupted", err
    assert _wait_until(lambda: all(_gone(p) for p in pids), timeout=10)


def test_workers_are_capped_at_the_available_cores():
    ex = PoolExecutor(available_cores() + 5)
    try:
        assert ex.workers == available_cores()
        assert ex.requested_workers == available_cores() + 5
        assert ex.map(abs, [-1, -2, 3]) == [1, 2, 3]
    finally:
        ex.close()


def test_terminate_ends_the_pool_thread_when_a_worker_died_while_sending_a_result():
    """A worker stopped by Ctrl-C in the middle of sending a result leaves half a message in the result pipe;
    the pool's manager thread would wait for the rest forever, and the interpreter waits for that thread at
    exit (a hung ``isavar`` after Ctrl-C). ``terminate`` must end it."""
    pool = PoolExecutor(2)
    assert pool.map(abs, [-1, -2]) == [1, 2]                   # workers and the manager thread are running
    manager = pool._pool._executor_manager_thread
    writer = pool._pool._result_queue._writer
    os.write(writer.fileno(), (1000).to_bytes(4, "big", signed=True) + b"partial")   # a header, then 7 of 1000
    time.sleep(0.5)                                            # the manager thread is now reading the rest
    pool.terminate()
    manager.join(timeout=20)
    assert not manager.is_alive()
