"""EMAN2/SPHIRE BDB image stacks (``bdb:DIR#name``), read without EMAN2.

EMAN2 (before 2022) and SPHIRE keep particle stacks in Berkeley DB databases.
This module reads them with a Berkeley DB binding (the optional ``bdb`` extra:
PyPI ``berkeleydb``, or Debian's ``python3-bsddb3``) and a restricted unpickler;
EMAN2 itself is never imported.

Names
-----
``bdb:DIR#name``, ``bdb:name`` (``DIR`` = the current directory),
``bdb:DIR/name`` (EMAN2 accepts it too) and the file path
``DIR/EMAN2DB/name.bdb`` all name the database ``DIR/EMAN2DB/name.bdb``. A
``?k1,k2`` suffix (EMAN2's key list) selects images by their 0-based numbers.

Layout (as ``libpyEM/EMAN2db.py`` of EMAN2 2.91 writes it)
-----------------------------------------------------------
* ``DIR/EMAN2DB/name.bdb`` is a Berkeley DB file holding one BTREE database
  called ``name``; EMAN2 opens it inside a shared environment
  (``/tmp/eman2db-$USER``), which this reader does not join (read-only, no
  locks: a crashed EMAN2 program's stale locks do not block it).
* Keys and values are pickles (protocol 2; Python 3 or Python 2 era). The key
  ``"maxrec"`` holds the highest image number; image *k* is the key ``k`` and its
  value is the header dict (EMAN2 marks images by the key ``is_complex_x``).
  Header values are plain Python values or EMAN2 objects pickled through
  Boost.Python as ``(class, init_args)``: ``Transform(matrix)`` with the 3x4
  matrix as 12 floats, row-major; ``EMAN2Ctf(vector)`` with
  ``[defocus, dfdiff, dfang, bfactor, ampcont, voltage, cs, apix, dsbg,
  n_bg, bg..., n_snr, snr...]``; ``Vec3f(x, y, z)``.
* Pixels of a normal stack: the key ``b"NXxNYxNZ" + pickle(k)`` holds the slot
  ``n`` of image *k* in the raw file ``DIR/EMAN2DB/name_NXxNYxNZ``: float32 in
  the writing machine's byte order (little-endian on every platform EMAN2 ran
  on), ``NX*NY*NZ`` values at byte offset ``4*n*NX*NY*NZ``.
* A virtual stack (``e2bdb.py --makevstack``) stores headers only; each has
  ``data_path = "FILE*OFFSET"`` (FILE relative to the stack's ``EMAN2DB``
  directory, or absolute) pointing into another stack's raw file, or a
  ``.mrcs`` path with the image number in ``ptcl_source_coord_id``.

Headers become particle-table columns exactly as EMAN2 HDF headers do (see
:mod:`isavar.io.eman_hdf`): ``ctf``, ``xform.projection``, ``xform.align2d``,
``apix_x``, ``ptcl_source_image``, ``ptcl_source_coord`` ... ; other keys become
columns of the same name.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np

from isavar.errors import InputError
from isavar.io.stack import ImageSource, LazyImages, ParticleStack

#: How to install the Berkeley DB binding (the ``bdb`` extra).
INSTALL_HINT = ("pip install 'isavar[bdb]' (PyPI berkeleydb; needs the Berkeley DB library and headers, e.g. "
                "apt-get install libdb-dev) or apt-get install python3-bsddb3")

#: Header keys that describe storage, not the particle (never turned into columns).
STORAGE_KEYS = {"timestamp", "data_path", "data_n", "data_source", "source_path", "source_n"}

#: Berkeley DB btree meta page: magic number.
_BTREE_MAGIC = 0x053162
#: The btree format version of libdb 4.x-6.x (a newer libdb would write a higher one).
_BTREE_VERSION_LIBDB = 9


# --------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------


def is_bdb_path(path) -> bool:
    """Return True for ``bdb:...`` names and ``.../EMAN2DB/name.bdb`` paths."""
    text = str(path)
    if text[:4].lower() == "bdb:":
        return True
    p = Path(text)
    return p.suffix.lower() == ".bdb" and len(p.parts) >= 2 and p.parts[-2] == "EMAN2DB"


def parse_bdb_path(path) -> tuple[Path, str, list[int] | None]:
    """Split a BDB name into the project directory, the database name and an optional key list.

    Parameters
    ----------
    path : str or path
        ``bdb:DIR#name``, ``bdb:name``, ``bdb:DIR/name``, any of them with ``?k1,k2,...``,
        or ``DIR/EMAN2DB/name.bdb``.

    Returns
    -------
    directory : pathlib.Path
        The directory holding ``EMAN2DB`` (not resolved).
    name : str
        The database name.
    keys : list of int or None
        0-based image numbers selected with ``?``, or None for all.

    Raises
    ------
    InputError
        For an empty name or a key list that is not integers.
    """
    text = str(path)
    if text[:4].lower() != "bdb:":
        p = Path(text)
        if not is_bdb_path(p):
            raise InputError("not a BDB name (expected bdb:DIR#name or DIR/EMAN2DB/name.bdb)", path=text)
        return p.parent.parent, p.stem, None
    body = os.path.expanduser(text[4:]) if text[4:5] == "~" else text[4:]
    keys = None
    if "?" in body:
        body, _, key_text = body.partition("?")
        try:
            keys = [int(k) for k in key_text.split(",") if k.strip()]
        except ValueError:
            raise InputError("only integer key lists (bdb:DIR#name?0,5,7) are supported, not EMAN2's "
                             "select./exclude. lists", path=text) from None
    if "#" in body:
        directory, _, name = body.rpartition("#")
    elif "/" in body:
        directory, _, name = body.rpartition("/")
    else:
        directory, name = ".", body
    if not name:
        raise InputError("the BDB name has no database name after '#'", path=text)
    return Path(directory or "/"), name, keys


def bdb_url(directory, name: str) -> str:
    """The canonical ``bdb:DIR#name`` of a database, with ``DIR`` absolute."""
    return f"bdb:{Path(directory).resolve()}#{name}"


# --------------------------------------------------------------------------------------
# Pickles
# --------------------------------------------------------------------------------------


class Transform:
    """Stand-in for EMAN2's ``Transform``: the 3x4 matrix (``matrix``, float64)."""

    def __init__(self, matrix=None):
        values = np.asarray(np.eye(3, 4) if matrix is None else list(matrix), dtype=np.float64)
        if values.size != 12:
            raise pickle.UnpicklingError(f"EMAN2 Transform with {values.size} matrix values (expected 12)")
        self.matrix = values.reshape(3, 4)

    def __setstate__(self, state):          # Boost.Python may add the instance __dict__
        pass


class EMAN2Ctf:
    """Stand-in for EMAN2's ``EMAN2Ctf``: the fields of its ``to_vector()``."""

    FIELDS = ("defocus", "dfdiff", "dfang", "bfactor", "ampcont", "voltage", "cs", "apix", "dsbg")

    def __init__(self, vector=None):
        v = [float(x) for x in (vector or [])]
        if len(v) < len(self.FIELDS):
            raise pickle.UnpicklingError(f"EMAN2Ctf with {len(v)} values (expected at least 9)")
        self.values = dict(zip(self.FIELDS, v))

    def to_string(self) -> str:
        """The ``"E..."`` string EMAN2's HDF headers hold (background and SNR curves left out)."""
        return "E" + " ".join(repr(self.values[k]) for k in self.FIELDS) + " 0 0"

    def __setstate__(self, state):
        pass


class EMAN1Ctf:
    """Stand-in for EMAN2's ``EMAN1Ctf`` (kept as an opaque value; not turned into CTF columns)."""

    def __init__(self, vector=None):
        self.vector = list(vector or [])

    def __setstate__(self, state):
        pass


class Vec:
    """Stand-in for EMAN2's ``Vec3f``/``Vec2f``/``Vec3i``/``Vec2i``."""

    def __init__(self, *values):
        self.values = np.asarray(values, dtype=np.float64)

    def __setstate__(self, state):
        pass


_STANDINS = {"Transform": Transform, "EMAN2Ctf": EMAN2Ctf, "EMAN1Ctf": EMAN1Ctf,
             "Vec3f": Vec, "Vec2f": Vec, "Vec3i": Vec, "Vec2i": Vec}
_SAFE_BUILTINS = {"set", "frozenset", "complex", "list", "dict", "tuple", "int", "float", "str", "bytes", "bool"}


class _HeaderUnpickler(pickle.Unpickler):
    """Unpickle EMAN2 keys and headers: EMAN2 classes become stand-ins, anything else is refused."""

    def find_class(self, module, name):
        if name in _STANDINS and module.startswith(("libpy", "EMAN2")):     # libpyTransform2, EMAN2_cppwrap, ...
            return _STANDINS[name]
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return getattr(__import__("builtins"), name)
        if module == "collections" and name == "OrderedDict":
            from collections import OrderedDict

            return OrderedDict
        raise pickle.UnpicklingError(f"the header holds an object of class {module}.{name}, which isavar does "
                                     "not read")


def loads(data: bytes):
    """Unpickle one EMAN2 key or value without EMAN2 (Python 3 and Python 2 era pickles).

    Python 2 ``str`` values are decoded as UTF-8, or Latin-1 where that fails.
    """
    try:
        return _HeaderUnpickler(io.BytesIO(data), encoding="utf-8").load()
    except UnicodeDecodeError:
        return _HeaderUnpickler(io.BytesIO(data), encoding="latin1").load()


def plain_header(header: dict) -> dict:
    """Turn stand-ins into the values :mod:`isavar.io.eman_hdf` reads from HDF headers.

    ``Transform`` -> ``(3, 4)`` array, ``EMAN2Ctf`` -> its ``"E..."`` string, lists of numbers and
    vectors -> 1-D arrays; other objects (``EMAN1Ctf``, nested dicts, lists of transforms) are dropped.
    """
    out = {}
    for key, value in header.items():
        key = key.decode("latin1") if isinstance(key, bytes) else str(key)
        if isinstance(value, Transform):
            out[key] = value.matrix
        elif isinstance(value, EMAN2Ctf):
            out[key] = value.to_string()
        elif isinstance(value, Vec):
            out[key] = value.values
        elif isinstance(value, bytes):
            out[key] = value.decode("latin1")
        elif isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, (list, tuple)):
            if all(isinstance(v, (bool, int)) for v in value):
                out[key] = np.asarray(value, dtype=np.int64)
            elif all(isinstance(v, (bool, int, float)) for v in value):
                out[key] = np.asarray(value, dtype=np.float64)
            elif all(isinstance(v, str) for v in value):
                out[key] = ";".join(value)
    return out


# --------------------------------------------------------------------------------------
# Berkeley DB
# --------------------------------------------------------------------------------------


def _binding():
    """The ``db`` module of berkeleydb or bsddb3, or a one-line InputError saying how to install one."""
    try:
        from berkeleydb import db
    except ImportError:
        try:
            from bsddb3 import db
        except ImportError:
            raise InputError(f"reading EMAN2/SPHIRE BDB stacks needs a Berkeley DB binding: {INSTALL_HINT}; "
                             "or export the stack with `e2proc2d.py bdb:stack stack.hdf`") from None
    return db


def _btree_version(path: Path) -> int | None:
    """The btree format version in a Berkeley DB file's meta page (None if it is not a btree file)."""
    with open(path, "rb") as fh:
        head = fh.read(24)
    if len(head) < 24:
        return None
    for order in "<>":
        magic, version = struct.unpack(order + "II", head[12:20])
        if magic == _BTREE_MAGIC:
            return version
    return None


def _open_database(file: Path, name: str, url: str):
    """Open the BTREE database ``name`` in ``file`` read-only, outside any environment."""
    if not file.exists():
        where = file.parent.parent
        hint = "" if where.is_dir() else f" (the directory {where} does not exist)"
        raise InputError(f"no such BDB stack: {file} does not exist{hint}", path=url)
    db = _binding()
    version = _btree_version(file)
    if version is None:
        raise InputError(f"{file} is not a Berkeley DB btree file", path=url)
    if version <= _BTREE_VERSION_LIBDB:
        # a damaged page can make a cursor loop forever: check the structure first (about 30 µs per record)
        try:
            db.DB().verify(str(file))
        except db.DBError:
            raise InputError(f"{file} is damaged (Berkeley DB verification failed); it may have been left "
                             "half-written by a crashed EMAN2/SPHIRE program", path=url) from None
    handle = db.DB()
    try:
        handle.open(str(file), name, db.DB_BTREE, db.DB_RDONLY)
        return handle
    except db.DBNoSuchFileError:
        handle.close()
    except db.DBError as exc:
        handle.close()
        text = _db_error_text(exc)
        if "version" in text.lower():
            raise InputError(f"{file} was written by a newer Berkeley DB (btree format {version}) than this "
                             f"binding's libdb {'.'.join(map(str, db.version()))} reads; open it with the "
                             "EMAN2/SPHIRE that wrote it and export it, e.g. `e2proc2d.py bdb:stack stack.hdf`",
                             path=url) from None
        if any(w in text.lower() for w in ("lock", "busy", "deadlock", "recover")):
            raise InputError(f"{file} is locked or needs recovery ({text}); close the EMAN2/SPHIRE program "
                             "using it or run `e2bdb.py -c`, then retry", path=url) from None
        raise InputError(f"cannot open {file} ({text})", path=url) from None
    # the database inside the file has another name (a renamed file): use it if it is the only one
    names = _subdatabases(db, file)
    if len(names) == 1:
        handle = db.DB()
        handle.open(str(file), names[0], db.DB_BTREE, db.DB_RDONLY)
        return handle
    raise InputError(f"{file} holds no database called {name!r} (it holds {', '.join(names) or 'none'})", path=url)


def _subdatabases(db, file: Path) -> list[str]:
    master = db.DB()
    try:
        master.open(str(file), None, db.DB_UNKNOWN, db.DB_RDONLY)
        return [k.decode("utf-8", "replace") for k in master.keys()]
    except db.DBError:
        return []
    finally:
        master.close()


def _db_error_text(exc) -> str:
    args = getattr(exc, "args", ())
    if len(args) >= 2:
        return str(args[1])
    return str(exc)


def read_records(file: Path, name: str, url: str) -> tuple[dict, dict]:
    """Read every record of a BDB stack.

    Returns
    -------
    records : dict
        Unpickled key -> value for the plain keys (``"maxrec"``, image numbers, ...).
    slots : dict
        ``(b"NXxNYxNZ", image number) -> slot`` of the images stored in raw files.
    """
    handle = _open_database(file, name, url)          # a missing file is named before a missing binding
    db = _binding()
    records, slots = {}, {}
    try:
        cursor = handle.cursor()
        try:
            item = cursor.first()
            while item is not None:
                key, value = item
                try:
                    if key[:1] == b"\x80":
                        records[loads(key)] = loads(value)
                    else:
                        prefix, sep, rest = key.partition(b"\x80")
                        if sep:
                            slots[(prefix, loads(sep + rest))] = loads(value)
                except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
                    raise InputError(f"cannot read a record of {file}: {exc}", path=url) from None
                item = cursor.next()
        finally:
            cursor.close()
    except db.DBError as exc:
        raise InputError(f"cannot read {file} ({_db_error_text(exc)}); it may be damaged or still being "
                         "written by an EMAN2/SPHIRE program", path=url) from None
    finally:
        handle.close()
    return records, slots


# --------------------------------------------------------------------------------------
# Image sources
# --------------------------------------------------------------------------------------


class RawFloatSource(ImageSource):
    """Images of an EMAN2 BDB raw data file: ``box x box`` float32 (little-endian) per slot."""

    def __init__(self, path, n_slots: int, box: int):
        super().__init__(str(path), n_slots, box)

    def open(self):
        try:
            return open(self.path, "rb", buffering=0)
        except OSError as exc:
            raise InputError(f"cannot open BDB image data ({exc.strerror})", path=self.path) from None

    def read(self, handle, indices):
        size = 4 * self.box * self.box
        out = np.empty((len(indices), self.box, self.box), dtype="<f4")
        first, last = int(indices[0]), int(indices[-1])
        if last - first + 1 == len(indices):
            handle.seek(first * size)
            _read_exact(handle, out, self.path, first)
            return out
        for k, i in enumerate(indices):
            handle.seek(int(i) * size)
            _read_exact(handle, out[k:k + 1], self.path, int(i))
        return out

    def close(self, handle):
        handle.close()


def _read_exact(handle, out: np.ndarray, path: str, first: int) -> None:
    view = memoryview(out.reshape(-1).view(np.uint8))
    got = 0
    while got < view.nbytes:
        n = handle.readinto(view[got:])
        if not n:
            raise InputError(f"truncated: the image in slot {first} cannot be read", path=path)
        got += n


def _resolve(base: Path, target: str) -> Path:
    return Path(target) if os.path.isabs(target) else Path(os.path.normpath(base / target))


def _image_locations(headers, keys, slots, dbdir: Path, name: str, url: str):
    """For each image: ``(kind, file, position)`` with kind ``raw`` (slot) or ``mrcs`` (index)."""
    locations = []
    for key, h in zip(keys, headers):
        nx, ny, nz = int(h.get("nx", 0)), int(h.get("ny", 0)), int(h.get("nz", 1))
        if nz != 1:
            raise InputError(f"image {key} is a volume ({nx}x{ny}x{nz}); expected 2D particle images", path=url)
        if nx != ny:
            raise InputError(f"image {key} is not square ({nx}x{ny} pixels)", path=url)
        size = 4 * nx * ny * nz
        data_path = h.get("data_path")
        if isinstance(data_path, str) and data_path:
            if data_path.lower().endswith((".mrcs", ".mrc")):
                index = h.get("ptcl_source_coord_id")
                if not isinstance(index, int):
                    raise InputError(f"image {key} points to {data_path} without an image number "
                                     "(ptcl_source_coord_id)", path=url)
                locations.append(("mrcs", _resolve(dbdir, data_path), index, nx))
                continue
            target, star, offset = data_path.rpartition("*")
            if not star:
                raise InputError(f"image {key} has a data_path without '*offset': {data_path!r}", path=url)
            offset = int(offset)
            if offset % size:
                raise InputError(f"image {key}: offset {offset} in {target} is not a whole number of "
                                 f"{nx}x{ny} images", path=url)
            locations.append(("raw", _resolve(dbdir, target), offset // size, nx))
        else:
            fkey = f"{nx}x{ny}x{nz}".encode()
            if (fkey, key) not in slots:
                raise InputError(f"image {key} has no data location (key {fkey.decode()}) in the database; "
                                 "it may be incomplete", path=url)
            locations.append(("raw", dbdir / f"{name}_{fkey.decode()}", int(slots[(fkey, key)]), nx))
    return locations


def _build_images(locations, url: str) -> LazyImages:
    from isavar.io.mrc import MrcSource

    sources, index_of = [], {}
    source_ids = np.empty(len(locations), np.int64)
    positions = np.empty(len(locations), np.int64)
    for row, (kind, file, pos, box) in enumerate(locations):
        sid = index_of.get((kind, file))
        if sid is None:
            if not file.exists():
                raise InputError(f"image {row} points to {file}, which does not exist (a virtual stack whose "
                                 "target stack was moved or deleted?)", path=url)
            if kind == "mrcs":
                src = MrcSource(file)
            else:
                src = RawFloatSource(file, file.stat().st_size // (4 * box * box), box)
            sid = index_of[(kind, file)] = len(sources)
            sources.append(src)
        source_ids[row], positions[row] = sid, pos
    for sid, src in enumerate(sources):
        mine = positions[source_ids == sid]
        if mine.size and mine.max() >= src.n:
            raise InputError(f"truncated: {src.path} holds {src.n} images of {src.box}x{src.box} but image slot "
                             f"{int(mine.max())} is referenced", path=url)
    return LazyImages(sources, source_ids, positions)


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def read_bdb_headers(path) -> tuple[list[int], list[dict], dict]:
    """Read the image headers of a BDB stack as plain dicts.

    Returns
    -------
    keys : list of int
        Image numbers, ascending (or as given by a ``?`` key list).
    headers : list of dict
        Raw unpickled headers (EMAN2 objects as stand-ins), one per image.
    info : dict
        ``url``, ``file``, ``dbdir`` (the ``EMAN2DB`` directory), ``name``, ``slots``.
    """
    directory, name, selected = parse_bdb_path(path)
    dbdir = directory.resolve() / "EMAN2DB"
    file = dbdir / f"{name}.bdb"
    url = str(path)
    records, slots = read_records(file, name, url)
    images = sorted(k for k, v in records.items() if isinstance(k, int) and isinstance(v, dict))
    maxrec = records.get("maxrec")
    if not images:
        raise InputError("the BDB stack holds no images", path=url)
    if isinstance(maxrec, int) and maxrec + 1 != len(images):
        missing = sorted(set(range(maxrec + 1)) - set(images))[:3]
        raise InputError(f"the database lists {maxrec + 1} images but holds {len(images)} (missing e.g. "
                         f"{missing}); it may be incomplete or still being written by an EMAN2/SPHIRE program",
                         path=url)
    if selected is not None:
        bad = [k for k in selected if k not in records]
        if bad:
            raise InputError(f"image {bad[0]} of the key list is not in the stack ({len(images)} images)", path=url)
        images = list(selected)
    return images, [records[k] for k in images], {"url": url, "file": file, "dbdir": dbdir, "name": name,
                                                   "slots": slots}


def read_bdb(path) -> ParticleStack:
    """Read an EMAN2/SPHIRE BDB particle stack (normal or virtual) and its headers.

    Parameters
    ----------
    path : str
        ``bdb:DIR#name``, ``bdb:name``, ``bdb:DIR/name`` (optionally ``?k1,k2``) or ``DIR/EMAN2DB/name.bdb``.

    Returns
    -------
    ParticleStack
        ``image_path`` is ``bdb:ABSDIR#name`` and ``image_index`` the image number in it; header keys
        become columns as for EMAN2 HDF files (:func:`isavar.io.eman_hdf.read_hdf`).

    Raises
    ------
    InputError
        No Berkeley DB binding, missing database or target file, a database written by a newer
        Berkeley DB, an incomplete or damaged database, non-square or mixed image sizes.
    """
    from isavar.io.eman_hdf import _header_columns
    from isavar.io.particles import coerce_dtypes

    keys, headers, info = read_bdb_headers(path)
    url = info["url"]
    locations = _image_locations(headers, keys, info["slots"], info["dbdir"], info["name"], url)
    boxes = sorted({loc[3] for loc in locations})
    if len(boxes) > 1:
        raise InputError(f"images have mixed box sizes ({', '.join(map(str, boxes[:4]))})", path=url)
    images = _build_images(locations, url)
    plain = [{k: v for k, v in plain_header(h).items() if k not in STORAGE_KEYS} for h in headers]
    table = _header_columns(plain, url)
    table.insert(0, "image_index", np.asarray(keys, dtype=np.int64))
    table.insert(0, "image_path", bdb_url(info["dbdir"].parent, info["name"]))
    table["image_size_px"] = boxes[0]
    table = coerce_dtypes(table)
    pixel = None
    if "pixel_size_A" in table.columns and not table["pixel_size_A"].isna().all():
        pixel = float(table["pixel_size_A"].dropna().iloc[0])
    return ParticleStack(table=table, images=images, pixel_size_A=pixel, path=url)


def bdb_database_file(path) -> Path:
    """The ``EMAN2DB/name.bdb`` file a BDB name refers to."""
    directory, name, _ = parse_bdb_path(path)
    return directory / "EMAN2DB" / f"{name}.bdb"


__all__ = ["INSTALL_HINT", "is_bdb_path", "parse_bdb_path", "bdb_url", "bdb_database_file", "loads",
           "plain_header", "read_bdb", "read_bdb_headers", "read_records"]


# --------------------------------------------------------------------------------------
# Writing (virtual stacks for SPHIRE's substacks, and small stacks for tests)
# --------------------------------------------------------------------------------------

#: The modules EMAN2 2.91's Boost.Python classes pickle under (``Class.__module__``).
EMAN_CLASS_MODULES = {"Transform": "libpyTransform2", "EMAN2Ctf": "libpyAligner2", "EMAN1Ctf": "libpyAligner2"}


class _EmanPickler(pickle._Pickler):
    """A protocol-2 pickler that writes stand-ins as EMAN2 does: ``GLOBAL module Class`` + init args + REDUCE."""

    def reducer_override(self, obj):
        if isinstance(obj, Transform):
            return _global("Transform"), ([float(v) for v in obj.matrix.reshape(-1)],)
        if isinstance(obj, EMAN2Ctf):
            v = [obj.values[k] for k in EMAN2Ctf.FIELDS]
            return _global("EMAN2Ctf"), ([float(x) for x in v] + [0.0, 0.0],)
        if isinstance(obj, np.generic):
            return type(obj.item()), (obj.item(),)
        return NotImplemented

    def save_global(self, obj, name=None):
        ref = getattr(obj, "_eman_ref", None)
        if ref is None:
            return super().save_global(obj, name)
        self.write(pickle.GLOBAL + f"{ref[0]}\n{ref[1]}\n".encode("ascii"))
        self.memoize(obj)


_GLOBALS: dict = {}


def _global(name: str):
    """A placeholder class the pickler writes as EMAN2's ``module.name``."""
    if name not in _GLOBALS:
        _GLOBALS[name] = type(name, (), {"_eman_ref": (EMAN_CLASS_MODULES[name], name)})
    return _GLOBALS[name]


def dumps(value) -> bytes:
    """Pickle a key or header as EMAN2 does (protocol 2; stand-ins as EMAN2 classes)."""
    buffer = io.BytesIO()
    _EmanPickler(buffer, protocol=2).dump(value)
    return buffer.getvalue()


def _image_header(box: int, apix: float | None) -> dict:
    """The data-describing keys EMAN2 keeps in every image header (it reads nx, ny, nz and is_complex_x)."""
    return {"nx": int(box), "ny": int(box), "nz": 1, "is_complex": 0, "is_complex_x": 0, "is_complex_ri": 1,
            "datatype": 7, "changecount": 0, "apix_x": float(apix or 1.0), "apix_y": float(apix or 1.0),
            "apix_z": float(apix or 1.0)}


def write_bdb(directory, name: str, headers: list[dict], box: int, *, images=None, data_paths=None,
              data_sources=None, overwrite: bool = False) -> str:
    """Write a BDB stack in EMAN2 2.91's layout: a normal stack (``images``) or a virtual one (``data_paths``).

    Parameters
    ----------
    directory : path
        The project directory; the files go to ``directory/EMAN2DB/``.
    name : str
        Database name (``bdb:directory#name``).
    headers : list of dict
        One header per image: plain values, :class:`Transform`, :class:`EMAN2Ctf`.
    box : int
        Image edge length in pixels.
    images : iterable of numpy.ndarray, optional
        ``(k, box, box)`` blocks of a normal stack, stored as raw float32 (little-endian).
    data_paths : list of (path, slot), optional
        For a virtual stack: the raw data file and slot of each image (written as ``data_path =
        "FILE*OFFSET"`` relative to the new ``EMAN2DB`` directory, as ``e2bdb.py --makevstack`` does).
    data_sources : list of str, optional
        ``data_source`` of each image of a virtual stack (the ``bdb:`` name of its target).
    overwrite : bool
        Replace an existing database of that name.

    Returns
    -------
    str
        ``bdb:directory#name``.
    """
    db = _binding()
    dbdir = Path(directory) / "EMAN2DB"
    file = dbdir / f"{name}.bdb"
    if file.exists() and not overwrite:
        raise InputError("already exists (use --force to replace it)", path=file)
    if (images is None) == (data_paths is None):
        raise ValueError("give exactly one of images (a normal stack) or data_paths (a virtual stack)")
    dbdir.mkdir(parents=True, exist_ok=True)
    fkey = f"{box}x{box}x1"
    tmp = dbdir / f".{name}.{os.getpid()}.tmp"
    raw_tmp = dbdir / f".{name}_{fkey}.{os.getpid()}.tmp"
    handle = db.DB()
    try:
        handle.open(str(tmp), name, db.DB_BTREE, db.DB_CREATE)
        n = 0
        if images is not None:
            with open(raw_tmp, "wb") as raw:
                for block in images:
                    block = np.asarray(block, dtype="<f4").reshape(-1, box, box)
                    for image in block:
                        if n >= len(headers):
                            raise ValueError(f"more images than the {len(headers)} headers")
                        raw.write(np.ascontiguousarray(image).tobytes())
                        header = _image_header(box, headers[n].get("apix_x"))
                        header.update(headers[n])
                        header.update(minimum=float(image.min()), maximum=float(image.max()),
                                      mean=float(image.mean()), sigma=float(image.std()))
                        handle.put(dumps(n), dumps(header))
                        handle.put(fkey.encode() + dumps(n), dumps(n))
                        n += 1
            if n != len(headers):
                raise ValueError(f"{n} images for {len(headers)} headers")
            if n:
                handle.put(dumps(fkey), dumps(n - 1))
        else:
            if len(data_paths) != len(headers):
                raise ValueError(f"{len(data_paths)} data paths for {len(headers)} headers")
            base = dbdir.resolve()
            size = 4 * box * box
            for n, ((target, slot), h) in enumerate(zip(data_paths, headers)):
                header = _image_header(box, h.get("apix_x"))
                header.update({k: v for k, v in h.items() if k not in STORAGE_KEYS})
                rel = os.path.relpath(Path(target).resolve(), base)
                header["data_path"] = f"{rel}*{int(slot) * size}"
                header["data_n"] = int(slot)
                if data_sources is not None:
                    header["data_source"] = str(data_sources[n])
                handle.put(dumps(n), dumps(header))
            n = len(headers)
        handle.put(dumps("maxrec"), dumps(n - 1))
        handle.close()
        handle = None
        if images is not None:
            os.replace(raw_tmp, dbdir / f"{name}_{fkey}")
        os.replace(tmp, file)
    finally:
        if handle is not None:
            handle.close()
        for t in (tmp, raw_tmp):
            if t.exists():
                t.unlink()
    return f"bdb:{directory}#{name}"


def headers_from_table(table) -> list[dict]:
    """EMAN2 header dicts of a particle table, as the HDF writer maps columns to keys (stand-ins for objects).

    ``xform.projection``/``xform.align2d`` become :class:`Transform`, ``ctf`` an :class:`EMAN2Ctf`; the
    image location columns are left out.
    """
    from isavar.conventions import parse_eman2_ctf
    from isavar.io.eman_hdf import _row_headers, _Transform

    table = table.reset_index(drop=True).drop(columns=["image_path", "image_index", "image_size_px"],
                                              errors="ignore").copy()
    if "pixel_size_A" not in table.columns:
        table["pixel_size_A"] = 1.0
    table["pixel_size_A"] = table["pixel_size_A"].astype(np.float64).fillna(1.0)
    headers = _row_headers(table)
    out = []
    for h, apix in zip(headers, table["pixel_size_A"]):
        row = {"apix_x": float(apix), "apix_y": float(apix), "apix_z": float(apix)}
        for key, value in h.items():
            if isinstance(value, _Transform):
                row[key] = Transform(value.matrix.astype(np.float64).reshape(-1))
            elif key == "ctf" and isinstance(value, str):
                c = parse_eman2_ctf(value)
                row[key] = EMAN2Ctf([c["defocus_um"], c["dfdiff_um"], c["dfang_deg"], c["bfactor_A2"],
                                     c["ampcont_percent"], c["voltage_kV"], c["cs_mm"], c["apix_A"], 0.0])
            elif isinstance(value, np.ndarray):
                row[key] = value.tolist()
            elif isinstance(value, np.generic):
                row[key] = value.item()
            else:
                row[key] = value
        out.append(row)
    return out
