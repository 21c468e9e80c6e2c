"""RELION STAR particle files (3.0 and 3.1+) through :mod:`starfile`.

Reading
-------
* RELION 3.1+: ``data_optics`` is merged into ``data_particles`` on
  ``rlnOpticsGroup`` (particle values win when a label is in both blocks).
* RELION 3.0: a single particle block; ``rlnOriginX/Y`` are in pixels and are
  converted to Å with the pixel size (``rlnImagePixelSize``, ``rlnPixelSize``,
  ``rlnDetectorPixelSize * 1e4 / rlnMagnification`` or the stack header).
* ``rlnImageName`` = ``index@stack`` (1-based index); any number of stacks.
  Relative stack paths are resolved as RELION does, from the project
  directory (``project_dir``, default the current directory), then from the
  STAR file's folder and each of its parents (so a STAR inside a RELION job,
  ``Extract/job007/particles.star``, opens in place, and so does a STAR with
  paths relative to its own folder). When two of these places hold different
  files of that name, the first is used and a warning names both.
* Labels ``rlnIsavar_<column>`` (written by isavar for columns RELION has no
  label for, e.g. ``true_angle_rot_deg`` or ``align_alpha_deg``) are restored
  to ``<column>``. Every other label is kept unchanged as a passthrough column.

Writing
-------
RELION 3.1 layout: ``data_optics`` (one optics group per distinct combination
of voltage, Cs, amplitude contrast, pixel size and box within each input
optics group) and ``data_particles``; the images are written as
``<stem>.mrcs`` beside the STAR file and named relatively
(``000001@<stem>.mrcs``), so the pair can be moved together; with
``project_dir`` they are named relative to that RELION project directory
(``000001@Isavar/run1/<stem>.mrcs``) so RELION run from there opens them.
"""

from __future__ import annotations

import io
import logging
import mmap
import os
import re
import shlex
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from isavar.conventions import format_image_name, parse_image_name
from isavar.errors import InputError
from isavar.io.mrc import MrcSource, check_writable, sources_for_paths, write_mrc_stack
from isavar.io.particles import (
    CANONICAL_COLUMNS,
    RELION_LABELS,
    RELION_OPTICS_LABELS,
    RELION_PARTICLE_LABELS,
    STAR_CUSTOM_PREFIX,
    coerce_dtypes,
    compact_column,
)
from isavar.io.stack import LazyImages, ParticleStack, release_freed_memory

log = logging.getLogger(__name__)

_LABEL_TO_COLUMN = {label: col for col, label in RELION_LABELS.items()}
#: Labels read into canonical columns beyond the written ones (RELION 3.0 and older spellings).
_LEGACY_PIXEL_LABELS = ("rlnImagePixelSize", "rlnPixelSize")
#: Passthrough labels that belong in data_optics when writing (value of the group's first particle).
_OPTICS_PASSTHROUGH = ("rlnMicrographOriginalPixelSize", "rlnCtfDataAreCtfPremultiplied", "rlnBeamTiltX",
                       "rlnBeamTiltY", "rlnMtfFileName", "rlnMicrographPixelSize", "rlnMagMat00", "rlnMagMat01",
                       "rlnMagMat10", "rlnMagMat11")
#: Labels regenerated on writing.
_REGENERATED = ("rlnImageName", "rlnOpticsGroup", "rlnOpticsGroupName", "rlnImageDimensionality",
                "rlnOriginX", "rlnOriginY", "rlnPixelSize")


def _read_blocks(path: Path) -> dict:
    if not path.exists():
        raise InputError("file not found", path=path)
    try:
        return _read_loop_blocks(path)
    except _UseStarfile:
        pass
    except Exception:       # malformed: let starfile parse it and report
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = starfile.read(path, always_dict=True)
    except Exception as exc:  # starfile raises assorted errors on malformed input
        raise InputError(f"cannot parse STAR file ({type(exc).__name__}: {exc})", path=path) from None
    return {name: df for name, df in blocks.items() if isinstance(df, pd.DataFrame)}


class _UseStarfile(Exception):
    """The file has something the fast reader leaves to starfile (quoted values, unusual block layout)."""


_DATA_PREFIX_LINE = re.compile(rb"^[ \t\r\f\v]*data", re.M)
_NON_BLANK = re.compile(rb"\S")


class _Window(io.RawIOBase):
    """A read-only file over ``buffer[start:stop]`` (no copy), for pandas.read_csv."""

    def __init__(self, view: memoryview):
        self._view, self._pos = view, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), len(self._view) - self._pos)
        b[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n


def _read_loop_blocks(path: Path) -> dict:
    """The loop blocks of a STAR file as DataFrames, as ``starfile.read`` gives them, at pandas.read_csv speed.

    starfile walks the file line by line in Python (about 10 s for a million particles); here only the
    block and label lines are walked, and each loop's data lines go to one ``pandas.read_csv`` call with
    starfile's options, then columns are made numeric where they parse as numbers (starfile's rule).
    Quoted values, and blocks laid out in ways starfile treats specially, raise ``_UseStarfile``.
    """
    blocks = {}
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            return blocks
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                pos = 0
                while pos < size:
                    line, nxt = _line(mm, pos, size)
                    if not line.startswith("data_"):
                        pos = nxt
                        continue
                    name = line[5:]
                    pos, kind = _block_start(mm, nxt, size)
                    if kind == "loop":
                        pos, df = _loop(mm, view, pos, size)
                        blocks[name] = df
                    elif kind == "simple":
                        pos = _simple(mm, pos, size)
            finally:
                view.release()
    return blocks


_NUMBER_LIKE = re.compile(r"\s*([-+]?[0-9.]+([eE][-+]?[0-9]+)?|[-+]?(nan|inf|infinity)|<NA>|NaN)?\s*", re.I)


#: Rows parsed at a time: the parser's own memory stays at a few times one chunk instead of the whole table.
CSV_CHUNK_ROWS = 200_000


def _read_csv_in_chunks(window: memoryview) -> pd.DataFrame:
    """``pandas.read_csv`` of a loop's data lines with starfile's options, ``CSV_CHUNK_ROWS`` rows at a time.

    A column that is numeric in some chunks and text in others (the whole file read at once would make
    it text) is read again in one piece, so the result is always that of a single read.
    """
    options = dict(delimiter=r"\s+", header=None, comment="#", keep_default_na=False,
                   na_values=["nan", "NaN", "<NA>"], engine="c")
    with pd.read_csv(io.BufferedReader(_Window(window), buffer_size=1 << 20), chunksize=CSV_CHUNK_ROWS,
                     **options) as reader:
        parts = list(reader)
    if len(parts) == 1:
        return parts[0]
    numeric = [{c: pd.api.types.is_numeric_dtype(p[c].dtype) for c in p.columns} for p in parts]
    if any(numeric[k] != numeric[0] for k in range(1, len(parts))):
        del parts
        return pd.read_csv(io.BufferedReader(_Window(window), buffer_size=1 << 20), **options)
    return pd.concat(parts, ignore_index=True)


def _looks_numeric(column: pd.Series) -> bool:
    """False when the first value is text no number parser reads ("000001@stack.mrcs"), so that
    ``pandas.to_numeric`` (which converts the whole column before failing) is not tried."""
    first = column.iloc[0] if len(column) else None
    return not isinstance(first, str) or _NUMBER_LIKE.fullmatch(first) is not None


def _next_data_line(mm, pos: int, size: int) -> int:
    """Start of the next line beginning (after blanks) with ``data_``, or ``size``."""
    while True:
        hit = mm.find(b"data_", pos)
        if hit < 0:
            return size
        start = mm.rfind(b"\n", 0, hit) + 1
        if not mm[start:hit].strip():
            return start
        pos = hit + 5


def _line(mm, pos: int, size: int) -> tuple[str, int]:
    end = mm.find(b"\n", pos)
    end = size if end < 0 else end
    return mm[pos:end].decode("utf-8").strip(), end + 1


def _block_start(mm, pos: int, size: int) -> tuple[int, str | None]:
    """After a ``data_`` line: the position after ``loop_`` (kind "loop") or of the first ``_`` line ("simple")."""
    while pos < size:
        line, nxt = _line(mm, pos, size)
        if line.startswith("loop_"):
            return nxt, "loop"
        if line.startswith("_"):
            return pos, "simple"
        if line.startswith("data_"):
            raise _UseStarfile("empty data block")
        pos = nxt
    return size, None


def _simple(mm, pos: int, size: int) -> int:
    """Skip a key-value block (isavar keeps loop blocks only); checks its lines as starfile does."""
    m = _DATA_PREFIX_LINE.search(mm, pos)
    stop = size if m is None else m.start()
    for raw in mm[pos:stop].decode("utf-8").splitlines():
        raw = raw.strip()
        if raw.startswith("_"):
            key, value = shlex.split(raw)          # starfile's check: exactly a key and a value
    return stop


def _loop(mm, view: memoryview, pos: int, size: int) -> tuple[int, pd.DataFrame]:
    labels = []
    while pos < size:
        line, nxt = _line(mm, pos, size)
        if not line.startswith("_"):
            break
        labels.append(line.split()[0][1:])
        pos = nxt
    stop = _next_data_line(mm, pos, size)
    if mm.find(b"'", pos, stop) >= 0 or mm.find(b'"', pos, stop) >= 0:
        raise _UseStarfile("quoted values")
    if _NON_BLANK.search(mm, pos, stop) is None:
        return stop, pd.DataFrame(np.zeros((0, len(labels))), columns=labels)
    window = view[pos:stop]
    try:
        df = _read_csv_in_chunks(window)
    finally:
        window.release()
    df.columns = labels
    for label in labels:
        column = df[label]
        if pd.api.types.is_numeric_dtype(column.dtype) or not _looks_numeric(column):
            continue                          # to_numeric would return it unchanged or fail on that value
        try:
            numeric = pd.to_numeric(column)
        except (ValueError, TypeError):
            continue
        if not numeric.isna().all():
            df[label] = numeric
    return stop, df


def _particle_block(blocks: dict, path: Path) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    if "particles" in blocks and "rlnImageName" in blocks["particles"].columns:
        return blocks["particles"], blocks.get("optics")
    for name, df in blocks.items():
        if name != "optics" and "rlnImageName" in df.columns:
            return df, blocks.get("optics")
    raise InputError("no data block with an rlnImageName column (not a particle STAR file)", path=path)


def _merge_optics(particles: pd.DataFrame, optics: pd.DataFrame | None, path: Path) -> pd.DataFrame:
    if optics is None or "rlnOpticsGroup" not in optics.columns:
        return particles.copy()
    if "rlnOpticsGroup" not in particles.columns:
        if len(optics) == 1:
            particles = particles.assign(rlnOpticsGroup=optics["rlnOpticsGroup"].iloc[0])
        else:
            raise InputError("data_particles has no rlnOpticsGroup but data_optics has several groups", path=path)
    extra = [c for c in optics.columns if c not in particles.columns or c == "rlnOpticsGroup"]
    if optics["rlnOpticsGroup"].is_unique:
        # Column by column: the particle columns are shared, not copied (a left merge copies them all).
        merged = particles.copy(deep=False)
        rows = pd.Index(optics["rlnOpticsGroup"]).get_indexer(particles["rlnOpticsGroup"])
        for c in extra:
            if c == "rlnOpticsGroup":
                continue
            values = optics[c].to_numpy()[np.maximum(rows, 0)] if len(optics) else np.full(len(rows), np.nan)
            column = pd.Series(values, index=particles.index, dtype=optics[c].dtype)
            merged[c] = column.where(rows >= 0) if (rows < 0).any() else column
    else:
        merged = particles.merge(optics[extra], on="rlnOpticsGroup", how="left", sort=False)
    others = [c for c in extra if c != "rlnOpticsGroup"]
    missing = merged[others[0]].isna() if others else pd.Series(False, index=merged.index)
    if others and missing.any():
        bad = particles["rlnOpticsGroup"][missing.to_numpy()].iloc[0]
        raise InputError(f"optics group {bad} is not defined in data_optics", path=path)
    merged.index = particles.index
    return merged


def search_folders(star_path, project_dir=None) -> list[Path]:
    """Folders against which a relative ``rlnImageName`` path is tried, in order.

    RELION opens image names relative to the directory it runs in (the project
    directory); isavar tries that first (``project_dir``, default the current
    directory), then the STAR file's folder and each of its parents.

    Parameters
    ----------
    star_path : path
        The STAR file.
    project_dir : path, optional
        RELION project directory (default: the current directory).

    Returns
    -------
    list of pathlib.Path
        Absolute folders, without repeats.
    """
    folder = Path(star_path).resolve().parent
    first = Path(project_dir).resolve() if project_dir is not None else Path.cwd().resolve()
    return list(dict.fromkeys([first, folder, *folder.parents]))


def resolve_stack_path(name: str, folders: list[Path], star_path) -> Path:
    """The file a relative (or absolute) ``rlnImageName`` stack path refers to.

    Parameters
    ----------
    name : str
        Stack path as written in the STAR file.
    folders : list of pathlib.Path
        From :func:`search_folders`.
    star_path : path
        The STAR file (for messages).

    Returns
    -------
    pathlib.Path
        The first existing candidate (resolved); the project-directory
        candidate when none exists (the caller reports it).
    """
    p = Path(name)
    if p.is_absolute():
        return p.resolve()
    found = [c for c in dict.fromkeys((f / p).resolve() for f in folders) if c.exists()]
    if not found:
        return (folders[0] / p).resolve()
    others = [c for c in found[1:] if not c.samefile(found[0])]
    if others:
        log.warning("%s: image stack %s exists both as %s and as %s; reading %s (RELION's choice from the "
                    "project directory %s; pass --project-dir to choose another)", star_path, name, found[0],
                    others[0], found[0], folders[0])
    return found[0]


def split_image_names(names, star_path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Split ``rlnImageName`` values into 0-based indices and stack paths, vectorised.

    Parameters
    ----------
    names : pandas.Series or array_like
        ``index@stack`` values (or bare paths, one image each), as :func:`parse_image_name` reads them.
    star_path : path
        The STAR file (for messages).

    Returns
    -------
    indices : numpy.ndarray
        ``(n,)`` int64, 0-based.
    codes : numpy.ndarray
        ``(n,)`` int64, position of each row's stack path in ``paths``.
    paths : list of str
        The distinct stack paths as written, in order of first appearance.

    Notes
    -----
    The usual form (digits, ``@``, a path without surrounding blanks) is split with numpy string
    functions and the paths are factorised run by run (rows of one stack are consecutive in RELION's
    files), so a million rows take about a second; any other row goes through :func:`parse_image_name`,
    which reads bare paths and raises for malformed names.
    """
    values = pd.Series(names).astype(str).to_numpy()
    n = values.size
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), []
    try:
        values = values.astype("S")         # ASCII, as RELION writes: 1 byte a character
    except UnicodeEncodeError:
        values = values.astype(str)
    at = b"@" if values.dtype.kind == "S" else "@"
    head, sep, tail = np.strings.partition(values, at)
    digits = np.strings.isdigit(head) if values.dtype.kind == "S" else np.strings.isdecimal(head)  # ASCII / \d
    usual = (sep == at) & digits & ~_blank_ends(tail)
    indices = np.zeros(n, dtype=np.int64)
    try:
        indices[usual] = head[usual].astype(np.int64) - 1
    except (ValueError, OverflowError):
        usual[:] = False
    usual &= indices >= 0
    if not usual.all():
        tail = tail.astype(str)
        try:
            for r in np.flatnonzero(~usual).tolist():
                name = values[r].decode() if isinstance(values[r], bytes) else str(values[r])
                indices[r], tail[r] = parse_image_name(name)
        except ValueError as exc:
            raise InputError(str(exc), path=star_path) from None
    codes, paths = factorize_runs(tail)
    return indices, codes, [p.decode() if isinstance(p, bytes) else str(p) for p in paths]


#: Code points ``str.strip()`` removes.
_WHITESPACE = np.array([c for c in range(0x3001) if chr(c).isspace()], dtype=np.uint32)


def _blank_ends(values: np.ndarray) -> np.ndarray:
    """True where a string is empty or starts or ends with whitespace (``S`` or ``U`` array, vectorised)."""
    n = values.size
    length = np.strings.str_len(values)
    width = max(values.dtype.itemsize // (1 if values.dtype.kind == "S" else 4), 1)
    chars = np.ascontiguousarray(values).view(np.uint8 if values.dtype.kind == "S" else np.uint32)
    chars = chars.reshape(n, width) if chars.size else np.zeros((n, 1), np.uint32)
    rows = np.arange(n)
    first = chars[rows, 0].astype(np.uint32)
    last = chars[rows, np.maximum(length - 1, 0)].astype(np.uint32)
    return (length == 0) | np.isin(first, _WHITESPACE) | np.isin(last, _WHITESPACE)


def factorize_runs(values: np.ndarray) -> tuple[np.ndarray, list]:
    """Codes and distinct values (first-appearance order) of a 1D array, in time linear in its runs.

    Parameters
    ----------
    values : numpy.ndarray
        ``(n,)`` strings (``U`` or ``S``) or numbers.

    Returns
    -------
    codes : numpy.ndarray
        ``(n,)`` int64 with ``uniques[codes] == values``.
    uniques : list
        Distinct values.
    """
    values = np.asarray(values)
    if values.size == 0:
        return np.zeros(0, np.int64), []
    heads = np.concatenate(([0], np.flatnonzero(values[1:] != values[:-1]) + 1))
    head_codes, uniques = pd.factorize(values[heads])
    lengths = np.diff(np.concatenate((heads, [values.size])))
    return np.repeat(head_codes.astype(np.int64), lengths), list(uniques)


def resolve_stack_paths(names: list[str], folders: list[Path], star_path) -> list[Path | None]:
    """The files relative (or absolute) ``rlnImageName`` stack paths refer to, None where none exists.

    Same rule as :func:`resolve_stack_path` for each name (first folder holding it; a warning when
    another folder holds a different file of that name), with the folders resolved once per directory
    named: about one ``stat`` per stack.
    """
    candidates: dict[str, list[str]] = {}
    out: list[Path | None] = []
    warned = 0
    for name in names:
        if os.path.isabs(name):
            out.append(Path(os.path.realpath(name)) if os.path.exists(name) else None)
            continue
        folder, base = os.path.split(name)
        dirs = candidates.get(folder)
        if dirs is None:
            dirs = [os.path.realpath(os.path.join(f, folder)) for f in folders]
            dirs = [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]
            candidates[folder] = dirs
        found = [p for p in (os.path.join(d, base) for d in dirs) if os.path.exists(p)]
        if not found:
            out.append(None)
            continue
        first = found[0] if not os.path.islink(found[0]) else os.path.realpath(found[0])
        others = [p for p in found[1:] if not os.path.samefile(p, first)]
        if others and warned < 3:
            warned += 1
            log.warning("%s: image stack %s exists both as %s and as %s; reading %s (RELION's choice from the "
                        "project directory %s; pass --project-dir to choose another)", star_path, name, first,
                        others[0], first, folders[0])
        out.append(Path(first))
    return out


def _stack_sources(names: pd.Series, folders: list[Path], star_path: Path):
    """Parse rlnImageName into (sources, source id of each row, 0-based indices).

    Every stack is located and its header read once, before any image is; missing stacks are reported
    together (the first one by name, and how many), before anything else happens.
    """
    indices, codes, raw = split_image_names(names, star_path)
    resolved = resolve_stack_paths(raw, folders, star_path)
    missing = [r for r, p in zip(raw, resolved) if p is None]
    if missing:
        r = missing[0]
        tried = r if Path(r).is_absolute() else ", ".join(str(f / r) for f in folders[:3]) + ", ..."
        more = f"; {len(missing)} of the {len(raw)} image stacks it names are missing" if len(raw) > 1 else ""
        raise InputError(f"image stack {r} referenced by rlnImageName not found (looked for {tried}{more}; "
                         "RELION reads it relative to the project directory: run from there or pass "
                         "--project-dir)", path=star_path)
    sources, sid_of_raw = sources_for_paths(resolved)
    return sources, sid_of_raw[codes], indices


def _pixel_size_column(df: pd.DataFrame) -> pd.Series | None:
    for label in _LEGACY_PIXEL_LABELS:
        if label in df.columns:
            return pd.to_numeric(df[label], errors="coerce")
    if "rlnDetectorPixelSize" in df.columns and "rlnMagnification" in df.columns:
        return pd.to_numeric(df["rlnDetectorPixelSize"]) * 1.0e4 / pd.to_numeric(df["rlnMagnification"])
    return None


def read_star(path, *, project_dir=None) -> ParticleStack:
    """Read a RELION 3.0 or 3.1+ particle STAR file and its MRCS stacks.

    Parameters
    ----------
    path : path
        The ``.star`` file.
    project_dir : path, optional
        RELION project directory for relative image paths (default: the
        current directory); see :func:`search_folders`.

    Returns
    -------
    ParticleStack
        Canonical columns (see :mod:`isavar.io.particles`) plus every other
        label as a passthrough column; images in row order.
    """
    path = Path(path)
    blocks = _read_blocks(path)
    particles, optics = _particle_block(blocks, path)
    df = _merge_optics(particles, optics, path)
    folders = search_folders(path, project_dir)
    sources, source_ids, indices = _stack_sources(df["rlnImageName"], folders, path)
    images = LazyImages(sources, source_ids, indices)

    table = pd.DataFrame({"image_path": images.path_column(), "image_index": indices}, index=df.index)
    pixel = _pixel_size_column(df)
    if pixel is None or pixel.isna().all():
        header_sizes = np.array([s.pixel_size_A or np.nan for s in sources])[source_ids]
        pixel = pd.Series(header_sizes, index=df.index) if np.isfinite(header_sizes).any() else None
    if pixel is not None:
        table["pixel_size_A"] = pixel.to_numpy(dtype=np.float64)
    for label in df.columns:
        if label in ("rlnImageName", "rlnImageDimensionality") or label in _LEGACY_PIXEL_LABELS:
            continue
        if label in _LABEL_TO_COLUMN:
            table[_LABEL_TO_COLUMN[label]] = compact_column(df[label])
        elif label.startswith(STAR_CUSTOM_PREFIX):
            table[label[len(STAR_CUSTOM_PREFIX):]] = compact_column(df[label])
        elif label in ("rlnOriginX", "rlnOriginY"):
            continue
        else:
            table[label] = compact_column(df[label])
    for axis in ("X", "Y"):
        column = f"origin_{axis.lower()}_A"
        if column not in table.columns and f"rlnOrigin{axis}" in df.columns:
            if "pixel_size_A" not in table.columns:
                raise InputError(f"rlnOrigin{axis} is in pixels but the pixel size is unknown", path=path)
            table[column] = pd.to_numeric(df[f"rlnOrigin{axis}"]).to_numpy() * table["pixel_size_A"].to_numpy()
    if "image_size_px" not in table.columns:
        table["image_size_px"] = images.box
    table = coerce_dtypes(table.reset_index(drop=True))
    pixel_size = _single_pixel_size(table)
    del blocks, particles, optics, df
    release_freed_memory()
    return ParticleStack(table=table, images=images, pixel_size_A=pixel_size, path=str(path))


def _single_pixel_size(table: pd.DataFrame) -> float | None:
    if "pixel_size_A" not in table.columns or table["pixel_size_A"].isna().all():
        return None
    return float(table["pixel_size_A"].dropna().iloc[0])


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def sidecar_stack(path) -> Path:
    """The ``<stem>.mrcs`` written beside a ``.star`` or ``.cs`` file."""
    path = Path(path)
    return path.with_name(path.stem + ".mrcs")


def _is_scalar_column(series: pd.Series) -> bool:
    if series.dtype != object:
        return True
    return not series.map(lambda v: isinstance(v, (list, tuple, np.ndarray, dict))).any()


def _custom_label(column: str) -> str | None:
    label = STAR_CUSTOM_PREFIX + column
    return None if any(ch.isspace() for ch in label) else label


def _optics_groups(table: pd.DataFrame, box: int) -> tuple[pd.DataFrame, np.ndarray]:
    """Split rows into RELION optics groups of constant optics values."""
    optics_cols = [c for c in RELION_OPTICS_LABELS if c in table.columns and c != "image_size_px"]
    keys = pd.DataFrame(index=table.index)
    keys["_group"] = table["optics_group"].fillna(1).astype(np.int64) if "optics_group" in table.columns else 1
    for c in optics_cols:
        keys[c] = table[c].astype(np.float64).round(6)
    uniq, inverse = np.unique(keys.to_numpy(dtype=np.float64), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    optics = pd.DataFrame({"rlnOpticsGroup": np.arange(1, len(uniq) + 1, dtype=np.int64)})
    optics["rlnOpticsGroupName"] = [f"opticsGroup{i}" for i in optics["rlnOpticsGroup"]]
    for c in optics_cols:
        first_rows = [int(np.flatnonzero(inverse == g)[0]) for g in range(len(uniq))]
        optics[RELION_OPTICS_LABELS[c]] = table[c].to_numpy(dtype=np.float64)[first_rows]
    optics["rlnImageSize"] = int(box)
    optics["rlnImageDimensionality"] = 2
    for label in _OPTICS_PASSTHROUGH:
        if label in table.columns and _is_scalar_column(table[label]):
            first_rows = [int(np.flatnonzero(inverse == g)[0]) for g in range(len(uniq))]
            optics[label] = table[label].to_numpy()[first_rows]
    return optics, inverse + 1


def build_star_blocks(table: pd.DataFrame, stack_name: str, box: int) -> dict[str, pd.DataFrame]:
    """Build the RELION 3.1 ``optics`` and ``particles`` blocks for images ``0..n-1`` of ``stack_name``.

    Parameters
    ----------
    table : pandas.DataFrame
        Particle table (``pixel_size_A`` required).
    stack_name : str
        Stack path as written in ``rlnImageName``.
    box : int
        Image size in pixels.

    Returns
    -------
    dict
        ``{"optics": DataFrame, "particles": DataFrame}``.
    """
    table = table.reset_index(drop=True)
    optics, groups = _optics_groups(table, box)
    particles = pd.DataFrame({"rlnImageName": [format_image_name(i, stack_name) for i in range(len(table))]})
    skipped = []
    for column in table.columns:
        if column in ("image_path", "image_index", "image_size_px", "optics_group") or column in RELION_OPTICS_LABELS:
            continue
        series = table[column]
        if not _is_scalar_column(series):
            skipped.append(column)
            continue
        if column in RELION_PARTICLE_LABELS:
            label = RELION_PARTICLE_LABELS[column]
        elif column.startswith("rln") and not column.startswith(STAR_CUSTOM_PREFIX):
            if column in _REGENERATED or column in _OPTICS_PASSTHROUGH or column in RELION_LABELS.values():
                continue
            label = column
        else:
            label = _custom_label(column)
            if label is None:
                skipped.append(column)
                continue
        values = series.to_numpy()
        if series.dtype == bool:
            values = values.astype(np.int64)
        elif column in CANONICAL_COLUMNS and CANONICAL_COLUMNS[column][0] == "int" and hasattr(series, "isna") \
                and series.isna().any():
            values = series.astype("float64").to_numpy()
        particles[label] = values
    particles["rlnOpticsGroup"] = groups
    if skipped:
        log.warning("STAR output: columns holding arrays or unusable names not written: %s", ", ".join(skipped))
    return {"optics": optics, "particles": particles}


def write_sidecar_stack(path, chunks, table, pixel_size_A, *, overwrite: bool):
    """Write the ``<stem>.mrcs`` image stack that a metadata file (``.star``, ``.cs``) refers to.

    Checks that neither the metadata file nor the stack would be overwritten unasked, fills the pixel
    size, writes the images and checks their count against the table.

    Parameters
    ----------
    path : path
        The metadata file to be written next (only checked here).
    chunks : iterable of numpy.ndarray
        Image blocks ``(k, N, N)`` in table order.
    table : pandas.DataFrame
        Particle table.
    pixel_size_A : float, optional
        Pixel size where the table has none.
    overwrite : bool
        Replace existing files.

    Returns
    -------
    stack : pathlib.Path
        The stack written.
    table : pandas.DataFrame
        The table with ``pixel_size_A`` filled.
    box : int
        Image size in pixels.
    """
    path = Path(path)
    stack = sidecar_stack(path)
    check_writable(path, overwrite)
    check_writable(stack, overwrite)
    table = _with_pixel_size(table, pixel_size_A, path)
    n = write_mrc_stack(stack, chunks, float(table["pixel_size_A"].iloc[0]), overwrite=overwrite)
    if n != len(table):
        stack.unlink()
        raise ValueError(f"{n} images written but the table has {len(table)} rows")
    return stack, table, MrcSource(stack).box


def write_star(path, chunks, table: pd.DataFrame, *, pixel_size_A: float | None = None,
               overwrite: bool = False, project_dir=None) -> None:
    """Write a RELION 3.1 STAR file and its ``<stem>.mrcs`` image stack.

    Parameters
    ----------
    path : path
        Output ``.star``.
    chunks : iterable of numpy.ndarray
        Image blocks ``(k, N, N)`` in table order.
    table : pandas.DataFrame
        Particle table, one row per image.
    pixel_size_A : float, optional
        Pixel size used where the table has no ``pixel_size_A``.
    overwrite : bool
        Replace existing files.
    project_dir : path, optional
        Name the stack relative to this RELION project directory (see
        :func:`stack_name_for`); default: relative to the STAR file's folder.
    """
    path = Path(path)
    stack, table, box = write_sidecar_stack(path, chunks, table, pixel_size_A, overwrite=overwrite)
    name = stack.name if project_dir is None else stack_name_for(stack, project_dir)
    write_star_blocks(path, build_star_blocks(table, name, box))


def stack_name_for(stack, project_dir) -> str:
    """How a STAR file written for a RELION project names an image stack.

    Parameters
    ----------
    stack : path
        The image stack.
    project_dir : path
        RELION project directory (where RELION runs).

    Returns
    -------
    str
        The path relative to ``project_dir`` when the stack lies inside it
        (RELION's own layout, ``Extract/job007/x.mrcs``), else the absolute path.
    """
    stack, project = Path(stack).resolve(), Path(project_dir).resolve()
    try:
        return stack.relative_to(project).as_posix()
    except ValueError:
        return stack.as_posix()


def write_star_blocks(path, blocks: dict, *, float_format: str = "%.10g") -> None:
    """Write STAR data blocks atomically, with a header line that does not depend on the time of writing.

    starfile stamps the time into its first comment line; it is replaced by the isavar version, so that
    the same data always give the same file.

    Parameters
    ----------
    path : path
        Output ``.star`` (replaced if it exists).
    blocks : dict
        Block name -> DataFrame.
    float_format : str
        printf-style format of floating-point values.
    """
    from isavar import __version__

    path = Path(path)
    raw = path.with_name(f".{path.name}.{os.getpid()}.raw")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            starfile.write(blocks, raw, float_format=float_format)
        with open(raw, "rb") as src, open(tmp, "wb") as dst:       # streamed: tables can be large
            first = src.readline()
            if first.startswith(b"# Created by the starfile"):
                first = f"# Created by isavar {__version__}\n".encode()
            dst.write(first)
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, path)
    finally:
        for p in (raw, tmp):
            if p.exists():
                p.unlink()


def _with_pixel_size(table: pd.DataFrame, pixel_size_A, path) -> pd.DataFrame:
    table = table.reset_index(drop=True)
    if "pixel_size_A" in table.columns and not table["pixel_size_A"].isna().any():
        return table
    if pixel_size_A is None:
        if "pixel_size_A" in table.columns and not table["pixel_size_A"].isna().all():
            pixel_size_A = float(table["pixel_size_A"].dropna().iloc[0])
        else:
            raise InputError("the pixel size is unknown; pass pixel_size_A (--pixel-size)", path=path)
    table = table.copy()
    if "pixel_size_A" in table.columns:
        table["pixel_size_A"] = table["pixel_size_A"].fillna(float(pixel_size_A))
    else:
        table["pixel_size_A"] = float(pixel_size_A)
    return table
