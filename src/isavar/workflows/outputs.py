"""Output directories: creation rules, provenance and atomic writes."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import subprocess
import sys
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
