"""``isavar isac2-select`` workflow: keep chosen ISAC2 classes and write their member particles.

Works on any ISAC2 output directory in SPHIRE's layout (isavar's ``isac2`` or SPHIRE's ``sp_isac2.py``):
``class_averages.hdf`` (``members`` headers), ``ordered_class_averages.hdf`` (optional),
``all_parameters.txt``, ``2dalignment/initial2Dparams.txt``, ``README_shrink_ratio.txt`` and, for the
RCT case, ``mainMMM/generationGGG/class_averages_MMM_GGG.hdf``.

Class numbers
-------------
1-based. ``ordered`` numbering counts the averages of ``ordered_class_averages.hdf`` (= isavar's
``class_averages.mrcs`` and ``rlnClassNumber`` of its ``particles.star``); ``unordered`` counts those of
``class_averages.hdf``. Without ordered averages (``--skip_ordering``) both are the same.

Output directory (SPHIRE's ``sp_pipe.py isac_substack`` layout, plus RELION/cryoSPARC files)::

    OUT/
      particles.star, particles.cs, particles.mrcs   members with rlnClassNumber and 2D alignment (input pixels)
      class_averages.hdf, class_averages.mrcs        the kept averages (edited copy, members in the headers)
      class_selection.star                           every class with rlnSelected 1/0 (RELION selection)
      isacselect.txt                                 sorted member indices (sp_process.py --isacselect format)
      scaled_all_parameters.txt, init_isac_params.txt, params_avg/params_avg_NNN.txt,
      particle_membership.txt, <name>_particle_id_list.txt, <name>_header_align2d.txt,
      <name>_header_projection.txt                   as sp_pipe.py isac_substack writes them
      EMAN2DB/<name>.bdb                             virtual substack (BDB input) with xform.align2d,
                                                     xform.projection and ISAC_class_id headers
      <name>.hdf                                     the substack as HDF (any other input)
      summary.json, provenance.json, log.txt
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from isavar.errors import InputError
from isavar.workflows.outputs import create_output_dir, write_json, write_provenance, write_text_atomic

log = logging.getLogger(__name__)

#: Normalised correlation above which an edited average is taken to be an original one.
MATCH_CORRELATION = 0.999


# ------------------------------------------------------------------------------------- the ISAC directory

@dataclass
class IsacRun:
    """What ``isac2-select`` reads from an ISAC2 output directory.

    Attributes
    ----------
    path : Path
        The directory.
    averages : ndarray, (c, T, T)
        ``class_averages.hdf`` (unordered).
    members : list of ndarray
        0-based member indices of each unordered class.
    order : ndarray of int, (c,)
        ``order[i]`` = unordered index of ordered class ``i`` (identity without ordered averages).
    ordered : ndarray, (c, T, T)
        The ordered averages (the unordered ones when there are none).
    params : ndarray, (n, 4)
        ``all_parameters.txt`` (working pixels; mirror -1 = unaccounted).
    prealign : ndarray, (n, 4)
        ``2dalignment/initial2Dparams.txt`` (input pixels).
    shrink : float
        Working pixels per input pixel (``README_shrink_ratio.txt`` line 6).
    """

    path: Path
    averages: np.ndarray
    members: list
    order: np.ndarray
    ordered: np.ndarray
    params: np.ndarray
    prealign: np.ndarray
    shrink: float
    extra: dict = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return len(self.members)

    @property
    def rank(self) -> np.ndarray:
        """``rank[k]`` = 0-based ordered position of unordered class ``k``."""
        r = np.empty(self.n_classes, np.int64)
        r[self.order] = np.arange(self.n_classes)
        return r

    def full_params(self) -> np.ndarray:
        """2D alignment of each input image at the input pixel size (``sp_pipe.py isac_substack``).

        ``combine_params2(prealign, (alpha, sx / shrink, sy / shrink, mirror))`` with alpha in [0, 360);
        unaccounted rows are ``(0, 0, 0, -1)``.
        """
        from isavar.core.params2d import compose

        isac = self.params.copy()
        isac[:, 1:3] /= self.shrink
        ok = isac[:, 3] >= 0
        out = np.zeros_like(isac)
        out[:, 3] = -1
        c = compose(tuple(self.prealign[ok].T), tuple(isac[ok].T))
        out[ok] = np.column_stack([np.mod(c.alpha, 360.0), c.sx, c.sy, c.mirror])   # [0, 360) as SPHIRE's
        return out


def _read_averages(path: Path):
    from isavar.io import read_particles

    stack = read_particles(path)
    try:
        images = stack.images[:]
        table = stack.table
    finally:
        stack.close()
    return images, table


def _members_of(table: pd.DataFrame, path: Path) -> list:
    if "members" not in table.columns:
        raise InputError("class averages without 'members' headers", path=path)
    out = []
    for m in table["members"]:
        arr = np.atleast_1d(np.asarray(m, dtype=np.int64)) if m is not None and not (
            isinstance(m, float) and np.isnan(m)) else np.zeros(0, np.int64)
        out.append(np.sort(arr))
    return out


def _match_members(sets: list, reference: list, path: Path) -> np.ndarray:
    """Index into ``reference`` of each member set (equal sets), or an InputError."""
    lookup = {tuple(m.tolist()): k for k, m in enumerate(reference)}
    out = []
    for i, m in enumerate(sets):
        k = lookup.get(tuple(m.tolist()))
        if k is None:
            raise InputError(f"average {i + 1} has members that match no class of class_averages.hdf", path=path)
        out.append(k)
    return np.asarray(out, np.int64)


def load_isac_run(isac_dir) -> IsacRun:
    """Read an ISAC2 output directory (isavar or SPHIRE)."""
    d = Path(isac_dir)
    if not d.is_dir():
        raise InputError("not an ISAC2 output directory (does not exist)", path=d)
    needed = ["class_averages.hdf", "all_parameters.txt", "2dalignment/initial2Dparams.txt",
              "README_shrink_ratio.txt"]
    missing = [n for n in needed if not (d / n).exists()]
    if missing:
        raise InputError(f"not a finished ISAC2 output directory: {', '.join(missing)} missing", path=d)
    averages, table = _read_averages(d / "class_averages.hdf")
    members = _members_of(table, d / "class_averages.hdf")
    if (d / "ordered_class_averages.hdf").exists():
        ordered, otable = _read_averages(d / "ordered_class_averages.hdf")
        order = _match_members(_members_of(otable, d / "ordered_class_averages.hdf"), members,
                               d / "ordered_class_averages.hdf")
    else:
        ordered, order = averages, np.arange(len(members))
    params = np.loadtxt(d / "all_parameters.txt", ndmin=2)
    prealign = np.loadtxt(d / "2dalignment/initial2Dparams.txt", ndmin=2)
    if params.shape[1] != 4 or prealign.shape[1] != 4 or len(params) != len(prealign):
        raise InputError(f"all_parameters.txt ({params.shape}) and 2dalignment/initial2Dparams.txt "
                         f"({prealign.shape}) do not describe the same images (4 columns each)", path=d)
    lines = (d / "README_shrink_ratio.txt").read_text().splitlines()
    try:
        shrink = float(lines[5])
    except (IndexError, ValueError):
        raise InputError("README_shrink_ratio.txt has no shrink ratio on line 6", path=d) from None
    return IsacRun(d, averages, members, order, ordered, params, prealign, shrink)


# ------------------------------------------------------------------------------------- selections

def parse_class_list(text: str) -> list[int]:
    """``"1,3,5-7"`` -> ``[1, 3, 5, 6, 7]`` (order kept, duplicates dropped)."""
    out: list[int] = []
    for part in str(text).replace(" ", "").split(","):
        if not part:
            continue
        m = re.fullmatch(r"(-?\d+)(?:-(\d+))?", part)
        if not m:
            raise InputError(f"--classes: {part!r} is not a class number or a range like 5-7")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        if hi < lo:
            raise InputError(f"--classes: empty range {part!r}")
        out += [k for k in range(lo, hi + 1) if k not in out]
    if not out:
        raise InputError("--classes: no class numbers given")
    return out


def classes_to_unordered(run: IsacRun, numbers, numbering: str, *, zero_based: bool = False) -> np.ndarray:
    """Unordered class indices (0-based) of 1-based (or 0-based) class numbers in a numbering."""
    base = 0 if zero_based else 1
    c = run.n_classes
    bad = [k for k in numbers if not base <= k < c + base]
    if bad:
        span = f"{base}..{c - 1 + base}"
        raise InputError(f"class {bad[0]} does not exist: the run has {c} classes, numbered {span} "
                         f"({numbering} numbering)", path=run.path)
    idx = np.asarray([k - base for k in numbers], np.int64)
    return run.order[idx] if numbering == "ordered" else idx


def _normalised(images: np.ndarray) -> np.ndarray:
    flat = images.reshape(len(images), -1).astype(np.float64)
    flat = flat - flat.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(flat, axis=1, keepdims=True)
    return flat / np.where(norm > 0, norm, 1.0)


def classes_from_averages_file(run: IsacRun, path) -> np.ndarray:
    """Unordered indices of the averages kept in an edited copy of the class averages (SPHIRE's way).

    HDF copies keep each average's ``members`` header, which identifies its class. Files without it
    (``.mrcs``) are matched by pixels: each kept average must correlate above
    :data:`MATCH_CORRELATION` with one ordered or unordered average (or full-resolution average).
    """
    path = Path(path)
    images, table = _read_averages(path)
    box = images.shape[-1]
    candidates = [("ordered", run.ordered, run.order), ("unordered", run.averages, np.arange(run.n_classes))]
    fullres = run.path / "class_averages_fullres.mrcs"
    if fullres.exists():
        candidates.append(("full-resolution", _read_averages(fullres)[0], run.order))
    boxes = sorted({c[1].shape[-1] for c in candidates})
    if box not in boxes:
        raise InputError(f"the class averages are {box}x{box} pixels but those of {run.path} are "
                         f"{' or '.join(f'{b}x{b}' for b in boxes)}: was the file resized or cropped? Select "
                         "in a copy of class_averages.hdf/ordered_class_averages.hdf/class_averages.mrcs",
                         path=path)
    if "members" in table.columns and box == run.averages.shape[-1]:
        return _match_members(_members_of(table, path), run.members, path)
    kept = _normalised(images)
    out = []
    for i, row in enumerate(kept):
        best = (-2.0, None, None)
        for name, originals, to_unordered in candidates:
            if originals.shape[-1] != box:
                continue
            corr = _normalised(originals) @ row
            j = int(np.argmax(corr))
            if corr[j] > best[0]:
                best = (float(corr[j]), int(to_unordered[j]), name)
        if best[0] < MATCH_CORRELATION:
            raise InputError(f"average {i + 1} matches no class average of {run.path} (best correlation "
                             f"{best[0]:.3f}); select in a copy of the ISAC2 averages without editing them",
                             path=path)
        out.append(best[1])
    return np.asarray(out, np.int64)


def classes_from_selection_star(run: IsacRun, path, numbering: str) -> np.ndarray:
    """Unordered indices of the rows with ``rlnSelected`` = 1 of a RELION selection STAR.

    Each row names its class by ``rlnClassNumber`` or, failing that, by the image number of its
    ``rlnReferenceImage`` (``k@file``), in ``numbering``; rows without either are taken in order.
    """
    import starfile

    path = Path(path)
    if not path.exists():
        raise InputError("file not found", path=path)
    data = starfile.read(path, always_dict=True)
    block = next((b for b in data.values() if isinstance(b, pd.DataFrame) and "rlnSelected" in b.columns), None)
    if block is None:
        raise InputError("no data block with an rlnSelected column", path=path)
    sel = pd.to_numeric(block["rlnSelected"], errors="coerce").fillna(0).to_numpy() == 1
    if "rlnClassNumber" in block.columns:
        numbers = pd.to_numeric(block["rlnClassNumber"]).astype(int).to_numpy()
    elif "rlnReferenceImage" in block.columns:
        numbers = np.array([int(str(v).split("@")[0]) for v in block["rlnReferenceImage"]])
    else:
        numbers = np.arange(1, len(block) + 1)
    if len(block) != run.n_classes:
        log.warning("%s lists %d classes; the ISAC2 run has %d", path, len(block), run.n_classes)
    return classes_to_unordered(run, [int(k) for k in numbers[sel]], numbering)


def classes_by_pixel_error(run: IsacRun, max_pixel_error: float | None) -> tuple[np.ndarray, float]:
    """Unordered indices of the classes whose stability-test pixel error is at most the threshold (``--auto``).

    The per-class pixel errors are those isavar's ``isac2`` records in ``summary.json``; the default threshold
    is the run's ``--thld_err``. Measured on simulated data (``bench/isac2.md``): with 40 % noise images it
    rejected every mixed-view class and no pure one; with 10 % it rejected mostly-pure classes.
    """
    summary_path = run.path / "summary.json"
    if not summary_path.exists():
        raise InputError("--auto needs the per-class pixel errors of isavar isac2 (summary.json); choose the "
                         "classes of a SPHIRE run with --classes, --averages or --select-star", path=run.path)
    per_class = json.loads(summary_path.read_text()).get("per_class", [])
    if len(per_class) != run.n_classes:
        raise InputError(f"summary.json lists {len(per_class)} classes but class_averages.hdf holds {run.n_classes}",
                         path=run.path)
    if max_pixel_error is None:
        manifest = run.path / "manifest.json"
        params = json.loads(manifest.read_text()).get("params", {}) if manifest.exists() else {}
        max_pixel_error = float(params.get("thld_err", 0.7))
    # thld_err is in working-scale pixels (older isavar runs called that column "pixel_error")
    errors = np.array([c.get("pixel_error_working_px", c.get("pixel_error")) for c in per_class],
                      np.float64)                                             # ordered classes
    keep = np.flatnonzero(errors <= max_pixel_error)
    return run.order[keep], float(max_pixel_error)


def generation_members(run: IsacRun, main: int, generation: int, numbers) -> tuple[list, Path]:
    """Members of classes of one generation (RCT): ``mainMMM/generationGGG/class_averages_MMM_GGG.hdf``."""
    path = run.path / f"main{main:03d}" / f"generation{generation:03d}" / \
        f"class_averages_{main:03d}_{generation:03d}.hdf"
    if not path.exists():
        raise InputError(f"generation {generation} of main iteration {main} has no class averages ({path.name})",
                         path=path.parent)
    _, table = _read_averages(path)
    members = _members_of(table, path)
    bad = [k for k in numbers if not 1 <= k <= len(members)]
    if bad:
        raise InputError(f"class {bad[0]} does not exist: generation {generation} of main iteration {main} has "
                         f"{len(members)} classes, numbered 1..{len(members)}", path=path)
    return [members[k - 1] for k in numbers], path


# ------------------------------------------------------------------------------------- outputs

def _int_lines(values) -> str:
    """SPHIRE ``write_text_file`` of ints: ``"  %12d"`` per line."""
    return "".join(f"  {int(v):12d}\n" for v in values)


def _sphire_float(value: float, form: str = "  %14.6f") -> str:
    """SPHIRE ``chooseformat``: fixed point unless it would be wider than the field or lose precision."""
    fixed = form.strip() % value
    width = int(form.strip().split(".")[0][1:])
    e_form = form.replace("f", "e")
    if len(fixed) > width or abs(value - float(fixed)) > abs(value - float(e_form.strip() % value)):
        return e_form % value
    return form % value


def _row_lines(rows) -> str:
    """SPHIRE ``write_text_row``: ints as ``"  %12d"``, floats as ``"  %14.6f"``."""
    out = []
    for row in rows:
        out.append("".join(f"  {v:12d}" if isinstance(v, (int, np.integer)) else _sphire_float(float(v))
                           for v in row) + "\n")
    return "".join(out)


def params_2d_to_3d(alpha, sx, sy, mirror) -> tuple:
    """SPHIRE ``params_2D_3D``: 2D alignment -> projection ``(phi, theta, psi, s2x, s2y)`` (degrees, pixels)."""
    from isavar.core.params2d import compose

    alpha, sx, sy, mirror = (np.asarray(v, np.float64) for v in (alpha, sx, sy, mirror))
    c = compose((np.zeros_like(alpha), sx, sy, np.zeros_like(alpha)),
                (-alpha, np.zeros_like(alpha), np.zeros_like(alpha), np.zeros_like(alpha)))
    mir = mirror > 0
    phi = np.where(mir, 180.0, 0.0)
    theta = np.where(mir, 180.0, 0.0)
    psi = np.where(mir, (540.0 + c.alpha) % 360.0, c.alpha % 360.0)
    return phi, theta, psi, c.sx, c.sy


def _members_table(stack_table: pd.DataFrame, ids: np.ndarray, class_number: np.ndarray, full: np.ndarray,
                   apix: float) -> pd.DataFrame:
    """The input rows of the members with their class and 2D alignment (SPHIRE and RELION columns)."""
    from isavar.conventions import align2d_to_relion

    table = stack_table.iloc[ids].reset_index(drop=True).copy()
    for col in ("class_number", "align_alpha_deg", "align_sx_px", "align_sy_px", "align_mirror",
                "angle_rot_deg", "angle_tilt_deg", "angle_psi_deg", "origin_x_A", "origin_y_A"):
        if col in table.columns and f"input_{col}" not in table.columns:
            table[f"input_{col}"] = table[col]
    table = table.drop(columns="angle_rot_deg", errors="ignore")
    p = full[ids]
    ok = p[:, 3] >= 0
    mirror = np.clip(p[:, 3], 0, 1)
    psi, tilt, ox, oy = align2d_to_relion(p[:, 0], p[:, 1], p[:, 2], mirror)
    table["class_number"] = class_number
    table["align_alpha_deg"] = np.where(ok, p[:, 0], np.nan)
    table["align_sx_px"] = np.where(ok, p[:, 1], np.nan)
    table["align_sy_px"] = np.where(ok, p[:, 2], np.nan)
    table["align_mirror"] = pd.array(np.where(ok, mirror, 0).astype(np.int64), dtype="Int64")
    table.loc[~ok, "align_mirror"] = pd.NA
    table["angle_psi_deg"] = np.where(ok, psi, np.nan)
    table["angle_tilt_deg"] = np.where(ok, tilt, np.nan)
    table["origin_x_A"] = np.where(ok, ox * apix, np.nan)
    table["origin_y_A"] = np.where(ok, oy * apix, np.nan)
    table["isac_particle_id"] = ids
    if ok.all():
        table["align_mirror"] = table["align_mirror"].astype(np.int64)
    return table


def _write_particles(out: Path, table: pd.DataFrame, images) -> None:
    """``particles.cs`` + ``particles.mrcs`` (the members' images), and ``particles.star`` referring to them."""
    from isavar.io import write_particles
    from isavar.io.star import build_star_blocks, write_star_blocks

    chunks = (images[s:s + 1024] for s in range(0, len(images), 1024))
    write_particles(out / "particles.cs", chunks, table, overwrite=True)
    star_table = table.copy()
    if "align_mirror" in star_table and str(star_table["align_mirror"].dtype) == "Int64":
        star_table["align_mirror"] = star_table["align_mirror"].astype("float64")
    write_star_blocks(out / "particles.star", build_star_blocks(star_table, "particles.mrcs", images.box),
                      float_format="%.6f")


def _substack(out: Path, name: str, stack, ids: np.ndarray, table: pd.DataFrame) -> str:
    """The substack with ``xform.align2d``, ``xform.projection`` and ``ISAC_class_id`` headers.

    BDB input: a virtual BDB stack pointing into the input's data, as ``sp_pipe.py isac_substack`` makes it
    (images that a BDB stack keeps in ``.mrcs`` files are copied into a normal BDB stack instead). Other
    input: ``<name>.hdf``.
    """
    from isavar.io import particle_format, write_particles
    from isavar.io.bdb import RawFloatSource, Transform, headers_from_table, write_bdb
    from isavar.io.eman_hdf import projection_matrix

    sub = stack.images.subset(ids)
    hdr = table.drop(columns=[c for c in table.columns if c.startswith("input_")]
                     + ["isac_particle_id", "angle_tilt_deg", "angle_psi_deg", "origin_x_A", "origin_y_A"],
                     errors="ignore")
    hdr = hdr.rename(columns={"class_number": "ISAC_class_id"})
    hdr["ISAC_class_id"] = hdr["ISAC_class_id"] - 1          # SPHIRE's ISAC_class_id is 0-based
    chunks = (sub[s:s + 1024] for s in range(0, len(sub), 1024))
    if particle_format(stack.path) != "bdb":
        path = out / f"{name}.hdf"
        write_particles(path, chunks, hdr, overwrite=True)
        return str(path)
    headers = headers_from_table(hdr)
    phi, theta, psi, s2x, s2y = params_2d_to_3d(table["align_alpha_deg"], table["align_sx_px"],
                                                table["align_sy_px"], table["align_mirror"].astype("float64"))
    for h, m in zip(headers, projection_matrix(phi, theta, psi, s2x, s2y)):
        if np.isfinite(m).all():
            h["xform.projection"] = Transform(m.reshape(-1))
    if all(isinstance(s, RawFloatSource) for s in sub.sources):
        locations = [(sub.sources[int(s)].path, int(i)) for s, i in zip(sub._source_ids, sub._indices)]
        return write_bdb(out, name, headers, sub.box, data_paths=locations,
                         data_sources=[str(stack.path)] * len(locations), overwrite=True)
    return write_bdb(out, name, headers, sub.box, images=chunks, overwrite=True)


# ------------------------------------------------------------------------------------- the workflow

def resolve_stack(run: IsacRun, stack_arg) -> str:
    """The particle stack ISAC2 ran on: ``--stack``, or the one recorded in isavar's ``manifest.json``."""
    if stack_arg:
        return str(stack_arg)
    manifest = run.path / "manifest.json"
    if manifest.exists():
        recorded = str(json.loads(manifest.read_text()).get("input", {}).get("path", ""))
        if "bdb:" in recorded:                              # recorded as <cwd>/bdb:DIR#name
            recorded = recorded[recorded.index("bdb:"):]
        if recorded:
            return recorded
    raise InputError("give the particle stack ISAC2 ran on with --stack (this directory does not record it)",
                     path=run.path)


def run_isac2_select(isac_dir, outdir, *, classes=None, numbering: str = "ordered", zero_based: bool = False,
                     averages=None, selection_star=None, generation=None, stack=None,
                     substack_name: str = "isac_substack", force: bool = False, auto: bool = False,
                     max_pixel_error: float | None = None) -> dict:
    """Keep the chosen classes of an ISAC2 run and write their members (see the module notes).

    Parameters
    ----------
    isac_dir : path
        ISAC2 output directory.
    outdir : path
        New output directory (an existing one only with ``force``).
    classes : list of int, optional
        Class numbers (``numbering``; with ``generation``: classes of that generation, 1-based).
    numbering : {"ordered", "unordered"}
        Which file's order the class numbers count.
    zero_based : bool
        Class numbers start at 0 (as e2display.py shows image numbers).
    averages : path, optional
        An edited copy of the averages holding only the kept ones.
    selection_star : path, optional
        A RELION STAR with ``rlnSelected``.
    auto : bool
        Keep the classes whose pixel error is at most ``max_pixel_error`` (isavar runs).
    max_pixel_error : float, optional
        Threshold for ``auto`` (default: the run's ``--thld_err``).
    generation : tuple of int, optional
        ``(main, generation)``: take the classes of that generation's averages (RCT).
    stack : str, optional
        The particles ISAC2 ran on (default: as recorded by isavar's isac2).
    substack_name : str
        Basename of the substack files (sp_pipe's ``--substack_basename``).
    force : bool
        Write into an existing output directory.

    Returns
    -------
    dict
        The summary written to ``summary.json``.
    """
    from isavar.io import read_particles

    given = [x is not None for x in (classes, averages, selection_star)] + [bool(auto)]
    if sum(given) != 1:
        raise InputError("choose the classes in exactly one way: --classes, --averages, --select-star or --auto")
    if generation is not None and classes is None:
        raise InputError("--generation needs --classes (the class numbers in that generation, 1-based)")
    if numbering not in ("ordered", "unordered"):
        raise InputError(f"--numbering must be ordered or unordered, not {numbering!r}")
    run = load_isac_run(isac_dir)
    outdir = Path(outdir)
    if outdir.resolve() == run.path.resolve():
        raise InputError("the output directory must differ from the ISAC2 directory", path=outdir)
    if generation is not None:
        members, source = generation_members(run, generation[0], generation[1], classes)
        kept = None
        labels = list(classes)
        what = f"classes {','.join(map(str, classes))} of generation {generation[1]} of main {generation[0]}"
    else:
        if classes is not None:
            kept = classes_to_unordered(run, classes, numbering, zero_based=zero_based)
            what = f"classes {','.join(map(str, classes))} ({numbering} numbering)"
        elif auto:
            kept, threshold = classes_by_pixel_error(run, max_pixel_error)
            what = f"the classes with pixel error <= {threshold:g} (--auto)"
        elif averages is not None:
            kept = classes_from_averages_file(run, averages)
            what = f"the {len(kept)} averages in {averages}"
        else:
            kept = classes_from_selection_star(run, selection_star, numbering)
            what = f"the selected rows of {selection_star}"
        if len(set(kept.tolist())) != len(kept):
            raise InputError("a class is chosen twice")
        if not len(kept):
            raise InputError("no class is chosen")
        members = [run.members[k] for k in kept]
        labels = (run.rank[kept] + 1).tolist()
    stack_name = resolve_stack(run, stack)
    particles = read_particles(stack_name)
    try:
        n = len(particles.table)
        if n != len(run.params):
            raise InputError(f"the stack holds {n} images but the ISAC2 run classified {len(run.params)}; give the "
                             "stack ISAC2 ran on with --stack", path=stack_name)
        full = run.full_params()
        ids = np.sort(np.concatenate(members)) if members else np.zeros(0, np.int64)
        if len(np.unique(ids)) != len(ids):
            raise InputError("the chosen classes share particles", path=run.path)
        label_of = {int(i): int(lab) for m, lab in zip(members, labels) for i in m}
        class_number = np.array([label_of[int(i)] for i in ids], np.int64)
        if generation is None and (full[ids, 3] < 0).any():
            bad = int(ids[full[ids, 3] < 0][0])
            raise InputError(f"particle {bad} is a class member but unaccounted in all_parameters.txt; the "
                             "directory is inconsistent", path=run.path)
        apix = particles.pixel_size_A or 1.0
        out = create_output_dir(outdir, must_not_exist=not force)
        table = _members_table(particles.table, ids, class_number, full, apix)
        sub_images = particles.images.subset(ids)
        _write_particles(out, table, sub_images)
        write_text_atomic(out / "isacselect.txt", _int_lines(ids))
        _write_sphire_substack_files(out, run, full, kept, members, labels, ids, class_number, substack_name)
        substack = _substack(out, substack_name, particles, ids, table)
    finally:
        particles.close()
    if kept is not None:
        _write_kept_averages(out, run, kept, labels)
        _write_selection_star(out, run, kept)
    summary = {"isac_dir": str(run.path), "stack": stack_name, "chosen": what,
               "classes": [{"class": int(lab), "unordered_index": int(k) if kept is not None else None,
                            "members": int(len(m))} for lab, k, m in
                           zip(labels, kept if kept is not None else [None] * len(labels), members)],
               "particles": int(len(ids)), "substack": substack,
               "numbering": numbering if generation is None else "generation"}
    write_json(out / "summary.json", summary)
    write_provenance(out, command="isac2-select", parameters={
        "isac_dir": str(isac_dir), "classes": classes, "numbering": numbering, "zero_based": zero_based,
        "averages": None if averages is None else str(averages),
        "select_star": None if selection_star is None else str(selection_star),
        "generation": generation, "stack": stack_name, "substack_name": substack_name, "auto": auto,
        "max_pixel_error": max_pixel_error})
    log.info("kept %s: %d particles written to %s", what, len(ids), out)
    return summary


def _write_sphire_substack_files(out, run, full, kept, members, labels, ids, class_number, name) -> None:
    """The text files of ``sp_pipe.py isac_substack`` (same names and number formats)."""
    rows = [[float(a), float(x), float(y), int(m)] for a, x, y, m in full]
    write_text_atomic(out / "scaled_all_parameters.txt", _row_lines(rows))
    accounted = np.flatnonzero(full[:, 3] >= 0)
    write_text_atomic(out / "init_isac_params.txt", _row_lines(
        [[int(i), float(full[i, 0]), float(full[i, 1]), float(full[i, 2]), int(full[i, 3]), 1.0] for i in accounted]))
    (out / "params_avg").mkdir(exist_ok=True)
    for j, m in enumerate(members):
        write_text_atomic(out / "params_avg" / f"params_avg_{j:03d}.txt", _row_lines(
            [[float(full[i, 0]), float(full[i, 1]), float(full[i, 2]), int(full[i, 3]), 1.0] for i in m]))
    position = {int(lab): j for j, lab in enumerate(labels)}
    membership = [position[int(c)] for c in class_number]
    write_text_atomic(out / "particle_membership.txt",
                      "".join(f"  {int(i):12d}  {int(c):12d}\n" for i, c in zip(ids, membership)))
    write_text_atomic(out / f"{name}_particle_id_list.txt", _int_lines(ids))
    write_text_atomic(out / f"{name}_header_align2d.txt", _row_lines(
        [[float(full[i, 0]), float(full[i, 1]), float(full[i, 2]), int(max(full[i, 3], 0)), 1.0] for i in ids]))
    phi, theta, psi, s2x, s2y = params_2d_to_3d(full[ids, 0], full[ids, 1], full[ids, 2], full[ids, 3])
    # as sp_header.py --export prints them: EMAN2's SPIDER decomposition turns (180, 180, psi) into (0, 180, psi - 180)
    mirrored = theta == 180.0
    psi = np.where(mirrored, (psi - 180.0) % 360.0, psi)
    phi = np.where(mirrored, 0.0, phi)
    write_text_atomic(out / f"{name}_header_projection.txt", "".join(
        f"{a:16.6f} {b:16.6f} {c:16.6f} {d:16.6f} {e:16.6f} \n" for a, b, c, d, e in zip(phi, theta, psi, s2x, s2y)))


def _write_kept_averages(out: Path, run: IsacRun, kept: np.ndarray, labels) -> None:
    """``class_averages.hdf`` (members headers, the original class numbers) and ``class_averages.mrcs``."""
    from isavar.io import write_image_stack, write_particles

    rank = run.rank
    images = run.ordered[rank[kept]]
    table = pd.DataFrame({"members": [run.members[k] for k in kept], "n_objects": [len(run.members[k]) for k in kept],
                          "isac_class_number": [int(x) for x in labels], "isac_unordered_index": kept})
    write_particles(out / "class_averages.hdf", images, table, overwrite=True)
    write_image_stack(out / "class_averages.mrcs", images, None, overwrite=True)


def _write_selection_star(out: Path, run: IsacRun, kept: np.ndarray) -> None:
    from isavar.conventions import format_image_name
    from isavar.io.star import write_star_blocks

    c = run.n_classes
    chosen = set(int(run.rank[k]) for k in kept)
    averages = os.path.relpath(run.path / "class_averages.mrcs", out)
    df = pd.DataFrame({"rlnReferenceImage": [format_image_name(i, averages) for i in range(c)],
                       "rlnClassNumber": np.arange(1, c + 1),
                       "rlnSelected": [1 if i in chosen else 0 for i in range(c)]})
    write_star_blocks(out / "class_selection.star", {"model_classes": df})
