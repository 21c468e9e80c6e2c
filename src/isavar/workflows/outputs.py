"""Output directories: creation rules, provenance and atomic writes."""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from isavar._version import __version__
from isavar.errors import InputError


def create_output_dir(path, *, must_not_exist: bool = False, marker: str | None = None) -> Path:
    """Create an output directory, refusing to clobber anything that is not ours.

    Parameters
    ----------
    path : path-like
        Directory to create.
    must_not_exist : bool
        Raise if the directory exists at all (e.g. ``3dvariability``).
    marker : str, optional
        Name of a file that identifies a directory made by the same command; an
        existing directory is accepted (for resuming) only if it holds this file
        or is empty.

    Returns
    -------
    pathlib.Path
        The directory.

    Raises
    ------
    InputError
        If the directory exists and may not be reused, or a file is in the way.
    """
    out = Path(path)
    if out.exists():
        if not out.is_dir():
            raise InputError("exists and is not a directory", path=out)
        if must_not_exist:
            raise InputError("output directory already exists (choose a new name)", path=out)
        if marker is not None and any(out.iterdir()) and not (out / marker).exists():
            raise InputError(f"exists but is not an output directory of this command (no {marker})", path=out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _git_describe() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        res = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=here, capture_output=True,
                             text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip() or None


def write_provenance(outdir, *, command: str, parameters: dict, seed=None, executor=None, extra=None) -> Path:
    """Write ``provenance.json`` (version, command line, parameters, seed, machine, time).

    Parameters
    ----------
    outdir : path-like
        Output directory.
    command : str
        Subcommand name.
    parameters : dict
        Resolved parameters (JSON-serialisable values).
    seed : int, optional
        Random seed used.
    executor : object, optional
        The executor; its class name and worker count are recorded.
    extra : dict, optional
        Anything else worth recording (input sizes, ...).

    Returns
    -------
    pathlib.Path
        The file written.
    """
    record = {
        "isavar_version": __version__,
        "git_describe": _git_describe(),
        "command": command,
        "argv": sys.argv,
        "parameters": parameters,
        "seed": seed,
        "executor": None if executor is None else {
            "kind": type(executor).__name__, "processes": getattr(executor, "size", 1),
            "workers": getattr(executor, "workers", 1)},
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if extra:
        record.update(extra)
    path = Path(outdir) / "provenance.json"
    write_text_atomic(path, json.dumps(record, indent=2, default=_json_default) + "\n")
    return path


def _json_default(obj):
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


def write_json(path, data) -> None:
    """Write JSON atomically (numpy scalars and arrays converted)."""
    write_text_atomic(Path(path), json.dumps(data, indent=2, default=_json_default) + "\n")


def write_text_atomic(path, text: str) -> None:
    """Write a text file via a temporary file and ``os.replace`` (never half-written)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------- checks before the work

def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"`` (binary units, 2 significant decimals)."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024.0
    return f"{n:.1f} TiB"  # pragma: no cover


def _existing_ancestor(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_can_write(path) -> None:
    """Refuse an output location (file or directory, existing or not) that cannot be written.

    The nearest existing folder is probed by creating and removing a temporary file, which also
    catches read-only file systems and works for the superuser (for whom permission bits say
    nothing).

    Parameters
    ----------
    path : path-like
        Output file or directory.

    Raises
    ------
    InputError
        Naming ``path`` and the cause (not a directory, permission denied, read-only, ...).
    """
    path = Path(path)
    folder = path if path.is_dir() else _existing_ancestor(path.parent)
    if not folder.is_dir():
        raise InputError(f"cannot be created: {folder} is not a directory", path=path)
    try:
        fd, probe = tempfile.mkstemp(prefix=".isavar-write-test-", dir=folder)
    except OSError as exc:
        raise InputError(f"cannot write in {folder} ({exc.strerror or exc})", path=path) from None
    os.close(fd)
    os.unlink(probe)


def available_memory() -> int | None:
    """Bytes of memory this process may still use (``MemAvailable`` and any cgroup limit), or None."""
    values = []
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    values.append(int(line.split()[1]) * 1024)
                    break
    except OSError:
        try:
            values.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            values.append(max(int(limit) - used, 0))
    except (OSError, ValueError):
        pass
    return min(values) if values else None


def check_memory(need_bytes: float, what: str, hint: str) -> None:
    """Refuse up front a run whose estimated memory exceeds what is available.

    Parameters
    ----------
    need_bytes : float
        Estimated peak memory.
    what : str
        What needs it (e.g. ``"--xr 1000 (2001 x 2001 trial shifts)"``).
    hint : str
        What the user can change.
    """
    avail = available_memory()
    if avail is not None and need_bytes > avail:
        raise InputError(f"{what} needs about {format_bytes(need_bytes)} of memory but "
                         f"{format_bytes(avail)} is available; {hint}")


def check_disk_space(path, need_bytes: float, what: str) -> None:
    """Refuse up front to write ``need_bytes`` where the file system has less free space.

    Parameters
    ----------
    path : path-like
        Output file or directory (need not exist yet).
    need_bytes : float
        Estimated size of what will be written.
    what : str
        What is written (for the message).
    """
    folder = _existing_ancestor(Path(path))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if need_bytes > free:
        raise InputError(f"{what} needs about {format_bytes(need_bytes)} of disk space but {folder} has "
                         f"{format_bytes(free)} free", path=path)


_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?:tmp|raw|tmp\.hdr)$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def remove_stale_temporaries(folder, names=None) -> list[Path]:
    """Remove the temporary files (``.NAME.PID.tmp`` and kin) that killed isavar processes left behind.

    Only files whose process no longer exists on this machine are removed.

    Parameters
    ----------
    folder : path-like
        Folder to clean.
    names : iterable of str, optional
        Only temporaries of these final file names (default: any).

    Returns
    -------
    list of pathlib.Path
        The files removed.
    """
    folder = Path(folder)
    wanted = None if names is None else set(names)
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_NAME.match(entry.name)
        if not m or (wanted is not None and m.group("name") not in wanted) or not entry.is_file():
            continue
        if _pid_alive(int(m.group("pid"))):
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


def describe_os_error(exc: OSError) -> str:
    """One line for an operating-system error: the file, the cause and, for a full disk, what to do."""
    name = exc.filename or getattr(exc, "filename2", None)
    cause = exc.strerror or str(exc) or type(exc).__name__
    text = str(exc)
    if exc.errno == errno.ENOSPC or "errno = 28" in text or "No space left" in text:
        cause = "no space left on device; free some space (or choose another output location) and run again"
    return f"{name}: {cause}" if name else cause


# ------------------------------------------------------------------------------------- input fingerprints

#: Images whose pixels are hashed into an input fingerprint (evenly spaced, first and last included).
FINGERPRINT_SAMPLES = 32


def _scalar_columns(table) -> list[str]:
    cols = []
    for c in table.columns:
        s = table[c]
        if s.dtype != object or s.map(lambda v: v is None or isinstance(v, (str, bytes, int, float))).all():
            cols.append(c)
    return cols


def input_fingerprint(stack_path, stack, *, samples: int = FINGERPRINT_SAMPLES) -> dict:
    """A cheap fingerprint of a particle file's content, to recognise it when a run is resumed.

    Records the path, image count and box, the size and modification time of the metadata file and of
    every image stack, a SHA-256 of the pixels of ``samples`` evenly spaced images and a SHA-256 of the
    particle table (every scalar column). A stack re-extracted in place (same path, count and box) thus
    changes the fingerprint, at the cost of reading ``samples`` images.

    Parameters
    ----------
    stack_path : path-like
        The particle file given by the user.
    stack : ParticleStack
        Its contents (:func:`isavar.io.read_particles`).
    samples : int
        Images whose pixels are hashed.

    Returns
    -------
    dict
        JSON-serialisable; compare two with :func:`fingerprint_changes`.
    """
    import hashlib

    import numpy as np
    import pandas as pd

    stack_path = Path(stack_path)
    paths = [stack_path.resolve()]
    for src in stack.images.sources:
        p = Path(src.path).resolve()
        if p not in paths:
            paths.append(p)
    files = []
    for p in paths:
        try:
            st = p.stat()
            files.append({"path": str(p), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)})
        except OSError:
            files.append({"path": str(p), "size": None, "mtime_ns": None})
    n = len(stack.images)
    rows = np.unique(np.linspace(0, n - 1, min(n, samples)).round().astype(np.int64)) if n else np.zeros(0, int)
    pixels = hashlib.sha256(np.ascontiguousarray(stack.images[rows], dtype="<f4").tobytes()).hexdigest()
    table = stack.table.reset_index(drop=True)
    cols = _scalar_columns(table)
    hashed = pd.util.hash_pandas_object(table[cols], index=False).to_numpy() if cols else np.zeros(0, np.uint64)
    meta = hashlib.sha256(("\t".join(cols)).encode() + np.ascontiguousarray(hashed).tobytes()).hexdigest()
    return {"path": str(stack_path.resolve()), "n_images": int(n), "box": int(stack.images.box), "files": files,
            "pixel_sample": pixels, "sample_rows": int(rows.size), "metadata": meta}


def fingerprint_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """Compare a recorded input fingerprint with the current one.

    Returns
    -------
    problems : list of str
        Differences that make the two inputs different (path, count, box, file size, sampled pixels,
        metadata).
    notes : list of str
        Differences that do not by themselves (a file touched or copied with a new modification time
        but the same size, sampled pixels and metadata), or why the content could not be compared.
    """
    problems, notes = [], []
    old = old or {}
    if old.get("path") != new["path"]:
        problems.append(f"the run's input was {old.get('path')}")
    for key, what in (("n_images", "images"), ("box", "box size")):
        if old.get(key) != new[key]:
            problems.append(f"{what} {old.get(key)} then, {new[key]} now")
    if problems:
        return problems, notes
    if "pixel_sample" not in old:
        notes.append("the run was started by an older isavar that recorded no content fingerprint, so only the "
                     "path, image count and box were compared")
        return problems, notes
    before = {f["path"]: f for f in old.get("files", [])}
    for f in new["files"]:
        name = Path(f["path"]).name
        b = before.get(f["path"])
        if b is None:
            problems.append(f"{name} was not part of the run's input")
        elif b.get("size") != f["size"]:
            problems.append(f"{name} changed size ({b.get('size')} -> {f['size']} bytes)")
        elif b.get("mtime_ns") != f["mtime_ns"]:
            notes.append(f"{name} has a new modification time")
    if old.get("pixel_sample") != new["pixel_sample"]:
        problems.append(f"the pixels of a sample of {new['sample_rows']} images differ")
    if old.get("metadata") != new["metadata"]:
        problems.append("the particle metadata differ")
    return problems, notes


def remove_run_directory(outdir, *, created: bool) -> None:
    """Remove what a failed new run wrote: the directory itself when the run created it, else its contents.

    Log files inside it are closed first.
    """
    import logging

    outdir = Path(outdir)
    logger = logging.getLogger("isavar")
    for handler in list(logger.handlers):
        name = getattr(handler, "baseFilename", None)
        if name and Path(name).resolve().parent == outdir.resolve():
            logger.removeHandler(handler)
            handler.close()
    if created:
        shutil.rmtree(outdir, ignore_errors=True)
    else:
        for entry in list(outdir.iterdir()):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
