"""3D variability workflow: particle file in, output directory out.

Output directory (must not exist for a new run; nothing is left when the input is rejected)
----------------------------------------------------------------------------------------------
============================  ==========================================================
``var3D.mrc``                 reconstruction of the per-group 2D standard deviation maps
                              (``--var3D-stat var``: variances); input box and pixel size
``ave3D.mrc``                 reconstruction of the per-group 2D means (not in --VAR/--SND)
``var2D.star`` + ``.mrcs``    per-particle 2D std (or variance) maps, input order, each
                              at its group frame (rot, tilt of the centre, psi 0, no
                              shift); ``rlnIsavar_source_index`` = input row
``ave2D.star`` + ``.mrcs``    per-particle 2D group means, same layout
``symmetrized_particles.star``  symmetry-expanded orientations (sym != c1), element-major
                              (identity block first), images referencing the input stack
``var3D_slices.png``          central orthogonal slices of var3D beside ave3D
``summary.json``              sizes, timings, volume statistics
``log.txt``, ``provenance.json``
``.isavar_3dvariability``     marker: the directory belongs to an isavar 3dvariability run
``manifest.json``             input fingerprint, parameters, stage (``running``/``finished``)
============================  ==========================================================

Resuming: while a run is in progress the directory also holds ``.ave2D.scratch`` and
``.var2D.scratch`` (the 2D maps computed so far, ``N x nx**2 x 4`` bytes each) and
``checkpoints/groups.npz`` (the exact sums after a round of blocks, at most
:data:`isavar.variability.volume.ROUNDS` rounds per run: the first and the last round, and at most every
:data:`CHECKPOINT_SECONDS` in between). Running the same command again on the same input with the same parameters continues an interrupted run
from its last checkpoint, with a bit-identical result; a finished run, another
input or other parameters are refused with the reason. The scratch files and the
checkpoint are removed when the run finishes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from isavar._logging import run_log
from isavar._progress import NullProgress
from isavar.conventions import format_image_name, matrix_to_euler
from isavar.errors import InputError
from isavar.variability import volume as vol
from isavar.parallel.pool import available_cores
from isavar.variability.params import VariabilityParams
from isavar.variability.result import VariabilityResult
from isavar.variability.run import choose_grid, particle_geometry, variability
from isavar.workflows.outputs import (
    check_can_write,
    check_disk_space,
    fingerprint_changes,
    input_fingerprint,
    remove_run_directory,
    remove_stale_temporaries,
    write_json,
    write_provenance,
)

log = logging.getLogger(__name__)

#: Marker file of a 3dvariability output directory.
MARKER = ".isavar_3dvariability"

#: Parameters that do not change the result (a run may be continued with other values).
_NOT_SCIENCE = ("chunk_size", "verbose")


#: Columns copied from the input table into the 2D-map tables (when present).
_KEEP_2D = ("micrograph_name", "coordinate_x_px", "coordinate_y_px", "optics_group", "voltage_kV", "cs_mm",
            "amplitude_contrast")


class _ScratchMaps:
    """An ``(n, nx, nx)`` float32 ``.npy`` file written and read with positioned I/O (no memory map).

    Rows go to the file through ``os.pwrite``, so the maps written stay in the page cache, not in the
    resident memory of the process, whatever N.
    """

    def __init__(self, path: Path, shape=None):
        if shape is not None:                                     # create (header and full size)
            mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=tuple(shape))
            del mm
        mm = np.load(path, mmap_mode="r")
        self.shape, self.dtype, self.offset = mm.shape, mm.dtype, int(mm.offset)
        del mm
        self.path = path
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * 4
        self.fd = os.open(path, os.O_RDWR)

    def write(self, rows: np.ndarray, maps: np.ndarray) -> None:
        maps = np.ascontiguousarray(maps, dtype=np.float32)
        for i in np.argsort(rows, kind="stable"):
            os.pwrite(self.fd, maps[i].tobytes(), self.offset + int(rows[i]) * self.row_bytes)

    def read(self, start: int, stop: int) -> np.ndarray:
        count = (stop - start) * self.row_bytes
        data = os.pread(self.fd, count, self.offset + start * self.row_bytes)
        if len(data) != count:
            raise OSError(f"{self.path}: short read")
        return np.frombuffer(data, np.float32).reshape((stop - start,) + tuple(self.shape[1:]))

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _MapStore:
    """2D maps written into scratch files in input order, then streamed to STAR + MRCS.

    With ``resume`` the scratch files of an interrupted run are reopened (their maps are kept) when they
    have the expected shape; otherwise they are created afresh. ``resumed`` says which happened. With
    ``attach`` (MPI ranks other than the root) the root's files are opened to write this rank's rows.
    """

    def __init__(self, outdir: Path, n: int, nx: int, *, ave: bool, var: bool, resume: bool = False,
                 attach: bool = False):
        self.files = {}
        self.maps = {}
        self.resumed = resume
        self.owner = not attach
        for name, wanted in (("ave2D", ave), ("var2D", var)):
            if wanted:
                self.files[name] = outdir / f".{name}.scratch"
        if attach:                 # another MPI rank: write its own rows into the root's files
            for name, path in self.files.items():
                self.maps[name] = _ScratchMaps(path)
            return
        if resume:
            for name, path in self.files.items():
                try:
                    mm = _ScratchMaps(path)
                except (OSError, ValueError):
                    mm = None
                if mm is None or mm.shape != (n, nx, nx) or mm.dtype != np.float32:
                    self.resumed = False
                    break
                self.maps[name] = mm
        if not self.resumed:
            for mm in self.maps.values():
                mm.close()
            self.maps = {}
            for name, path in self.files.items():
                self.maps[name] = _ScratchMaps(path, (n, nx, nx))

    def flush(self) -> None:
        for mm in self.maps.values():
            mm.flush()

    def __call__(self, rows, ave, stat):
        if "ave2D" in self.maps and ave is not None:
            self.maps["ave2D"].write(rows, ave)
        if "var2D" in self.maps and stat is not None:
            self.maps["var2D"].write(rows, stat)

    def write(self, outdir: Path, table2d: pd.DataFrame, grid, pixel_size_A: float, project_dir=None,
              progress=None) -> list[str]:
        from isavar.io import write_particles

        progress = progress or NullProgress()
        written = []
        threads = available_cores()                        # the pool is idle while the root writes
        for name, mm in self.maps.items():
            n = mm.shape[0]
            progress.stage(f"writing {name}", total=n)

            def blocks(mm=mm, n=n):
                for s in range(0, n, 256):
                    maps = vol.upsample_maps(mm.read(s, min(n, s + 256)), grid, workers=threads)
                    yield maps
                    progress.advance(maps.shape[0])

            write_particles(outdir / f"{name}.star", blocks(), table2d, pixel_size_A=pixel_size_A, overwrite=True,
                            project_dir=project_dir)
            progress.close()
            written += [f"{name}.star", f"{name}.mrcs"]
        return written

    def close(self) -> None:
        """Close the files; the owner (root) also removes them."""
        for name in list(self.maps):
            self.maps.pop(name).close()
        if self.owner:
            for path in self.files.values():
                if path.exists():
                    os.remove(path)
        self.files = {}


def _table_2d(table: pd.DataFrame, box: int, pixel_size_A: float) -> pd.DataFrame:
    out = pd.DataFrame({
        "angle_rot_deg": table["angle_rot_deg"].to_numpy(np.float64),
        "angle_tilt_deg": table["angle_tilt_deg"].to_numpy(np.float64),
        "angle_psi_deg": 0.0,
        "origin_x_A": 0.0,
        "origin_y_A": 0.0,
        "pixel_size_A": float(pixel_size_A),
        "image_size_px": int(box),
    })
    for c in _KEEP_2D:
        if c in table.columns:
            out[c] = table[c].to_numpy()
    out["source_index"] = np.arange(len(table), dtype=np.int64)
    return out


def write_symmetrized_table(path: Path, table: pd.DataFrame, rotations: np.ndarray, symmetry: str,
                            pixel_size_A: float, box: int, project_dir=None) -> int:
    """Write the symmetry-expanded orientations as a RELION STAR (metadata only).

    Element-major like SPHIRE's ``--symmetrize`` (block k = every particle with
    orientation ``A S_k``; the identity block first); ``rlnImageName`` points at
    the input images (relative to ``project_dir`` when given, else to the
    STAR file's folder); ``rlnIsavar_symmetry_element`` = k and
    ``rlnIsavar_source_index`` = input row.

    Returns
    -------
    int
        Rows written.
    """
    from isavar.core.geometry import symmetry_expand
    from isavar.io.star import build_star_blocks, write_star_blocks

    n = len(table)
    expanded = symmetry_expand(rotations, symmetry)
    nsym = expanded.shape[0] // n
    rot, tilt, psi = matrix_to_euler(expanded)
    rows = np.tile(np.arange(n), nsym)
    out = table.iloc[rows].reset_index(drop=True).copy()
    out["angle_rot_deg"], out["angle_tilt_deg"], out["angle_psi_deg"] = rot, tilt, psi
    out["symmetry_element"] = np.repeat(np.arange(nsym), n)
    out["source_index"] = rows
    if "pixel_size_A" not in out.columns:
        out["pixel_size_A"] = float(pixel_size_A)
    names = None
    if "image_path" in out.columns and "image_index" in out.columns:
        from isavar.io.star import stack_name_for

        names = [format_image_name(int(i), os.path.relpath(str(p), path.parent) if project_dir is None
                                   else stack_name_for(p, project_dir))
                 for i, p in zip(out["image_index"], out["image_path"])]
    blocks = build_star_blocks(out, "input.mrcs", box)
    if names is not None:
        blocks["particles"]["rlnImageName"] = names
    write_star_blocks(path, blocks)
    return len(out)


def _read_input(stack_path: Path, pixel_size_A=None, project_dir=None):
    from isavar.io import read_particles

    stack = read_particles(stack_path, pixel_size_A=pixel_size_A, project_dir=project_dir)
    return stack, stack_pixel_size(stack, stack_path)


def stack_pixel_size(stack, name) -> float:
    """The particles' pixel size (Å): the file's, else the table's column, else 1.0 with a warning."""
    pixel = stack.pixel_size_A
    if pixel is None and "pixel_size_A" in stack.table.columns and not stack.table["pixel_size_A"].isna().all():
        pixel = float(stack.table["pixel_size_A"].dropna().iloc[0])
    if pixel is None:
        log.warning("%s: the file states no pixel size; the maps are written at 1.0 Å/px (set it with --apix)",
                    name)
        pixel = 1.0
    return float(pixel)


def _science(params: VariabilityParams) -> dict:
    return {k: v for k, v in params.to_dict().items() if k not in _NOT_SCIENCE}


def _load_manifest(outdir: Path) -> dict:
    try:
        return json.loads((outdir / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def _check_existing(outdir: Path, fingerprint: dict, params: VariabilityParams, symmetrize_only: bool,
                    root: bool = True) -> bool:
    """Decide what an existing output directory means; returns True when an interrupted run is continued.

    Every process decides alike (an error is raised on every MPI rank); only ``root`` removes files.
    """
    if not outdir.exists():
        return False
    if not outdir.is_dir():
        raise InputError("exists and is not a directory (choose a new name)", path=outdir)
    if not (outdir / MARKER).exists():
        raise InputError("output directory already exists (choose a new name)", path=outdir)
    man = _load_manifest(outdir)
    if man.get("stage") == "finished":
        if root:
            _remove_scratch(outdir)
        raise InputError("output directory already exists and holds a finished 3dvariability run "
                         "(choose a new name)", path=outdir)
    problems, notes = fingerprint_changes(man.get("input"), fingerprint)
    if problems:
        raise InputError(f"holds an unfinished 3dvariability run on another input ({'; '.join(problems)}); "
                         "choose a new name", path=outdir)
    old = man.get("parameters", {})
    mine = dict(_science(params), symmetrize_only=bool(symmetrize_only))
    diff = sorted(k for k in set(old) | set(mine) if old.get(k) != mine.get(k))
    if diff:
        raise InputError(f"holds an unfinished 3dvariability run with other parameters ({', '.join(diff)}); "
                         "run the same command to continue it, or choose a new name", path=outdir)
    for note in notes:
        log.warning("continuing %s: %s (the sampled content is unchanged)", outdir, note)
    return True


def _remove_scratch(outdir: Path) -> None:
    for name in (".ave2D.scratch", ".var2D.scratch"):
        (outdir / name).unlink(missing_ok=True)
    ck = outdir / "checkpoints"
    if ck.is_dir():
        for f in ck.iterdir():
            f.unlink(missing_ok=True)
        ck.rmdir()


def _check_options(params: VariabilityParams, box: int, table, stack_path) -> None:
    from isavar.io.particles import ORIENTATION_COLUMNS, ORIGIN_COLUMNS, describe_duplicates, duplicated_rows

    r = params.mask_radius_px
    if r != -1 and not 0 < r <= box / 2:
        raise InputError(f"--radius {r:g} is outside (0, {box / 2:g}] for the {box}-pixel box (or -1 for the "
                         f"default, box/2 - 2)", path=stack_path)
    dup = duplicated_rows(table, columns=ORIENTATION_COLUMNS + ORIGIN_COLUMNS)
    if dup.any():
        raise InputError(describe_duplicates(table, dup) + ", with the same orientation: such a particle would "
                         "count twice in every group and map; remove the duplicated rows", path=stack_path)


def _disk_need(params: VariabilityParams, n: int, box: int, nx: int, symmetrize_only: bool) -> float:
    """Bytes written: scratch 2D maps, their final stacks, the checkpoint, the symmetrized table, the volumes."""
    from isavar.core.geometry import symmetry_matrices

    n2d = int(params.save_ave2d) + int(params.save_var2d)
    mode_2d = not (params.var_input or params.snd)
    need = 2.0 * 4 * box ** 3 + (1 << 22)
    if params.symmetry != "c1" and not params.var_input:
        need += 400.0 * n * symmetry_matrices(params.symmetry).shape[0]
    if mode_2d and not symmetrize_only:
        need += n2d * 4.0 * n * (nx ** 2 + box ** 2)
        need += 12.0 * (params.npad * nx) ** 3                 # the checkpoint: two Fourier accumulators
    return need


#: Memory of one Python process with isavar's numerical modules loaded (bytes, measured: about 150 MB).
PROCESS_BASE_BYTES = 200e6

#: Bytes per particle held by every process: orientations, origins, CTF parameters, image index, the
#: KD-tree of the directions and the centre order (about 200 B), with a margin.
PER_PARTICLE_BYTES = 300.0

#: Bytes per particle held by the root alone: the particle table (pandas, with its image names), the
#: per-particle group values and the 2D-map tables written at the end.
ROOT_PER_PARTICLE_BYTES = 2000.0


def estimate_memory(n: int, box: int, nx: int, params: VariabilityParams, workers: int = 1) -> float:
    """Peak memory (bytes) of a 3dvariability run on one machine, from its largest arrays.

    Every process: :data:`PROCESS_BASE_BYTES` and :data:`PER_PARTICLE_BYTES` per particle. A task (one
    block of :data:`isavar.variability.run.BLOCK` centres) holds its two Fourier accumulators
    (``M = (npad nx)**2 (npad nx / 2 + 1)`` voxels, complex64 + float32 each), the block's 2D maps
    (``BLOCK x nx**2`` float32, about four copies) and, per chunk of ``chunk_size`` centres, the
    preprocessed images it reads (at most ``chunk_size x min(G, 8)`` of ``nx**2`` float32, plus the
    ``box**2`` images read 256 at a time). The controlling process (or each MPI rank) holds the exact sum of a
    round (three int64 limbs per float64, :mod:`isavar.parallel.reduction`), the running float64 totals and,
    with a pool, the results in flight (``2 workers + 2``); the root also
    :data:`ROOT_PER_PARTICLE_BYTES` per particle.

    Parameters
    ----------
    n, box, nx : int
        Particles, input box and working box.
    params : VariabilityParams
        Settings.
    workers : int
        Pool workers on this machine (1 for a serial run or one MPI rank).

    Returns
    -------
    float
        Bytes.
    """
    from isavar.variability.run import BLOCK

    g = params.npad * nx
    voxels = float(g * g * (g // 2 + 1))
    block = min(BLOCK, n)
    maps = 4.0 * block * nx * nx
    chunk = min(int(params.chunk_size), block)
    prepared = 4.0 * chunk * min(params.img_per_grp, 8) * nx * nx + 4.0 * 256 * box * box * 3
    task = 2 * 12.0 * voxels + 4 * maps + prepared
    result = 2 * 12.0 * voxels + (2 * maps if (params.save_ave2d or params.save_var2d) else 0.0)
    reduction = 2 * 3 * 24.0 * voxels + 2 * 24.0 * voxels          # exact sum of a round + float64 totals
    per_process = PROCESS_BASE_BYTES + PER_PARTICLE_BYTES * n
    root = per_process + ROOT_PER_PARTICLE_BYTES * n + reduction + 2 * 24.0 * voxels
    if workers > 1:
        return root + (2 * workers + 2) * result + workers * (per_process + task)
    return root + task


def _check_memory(params: VariabilityParams, n: int, box: int, nx: int, executor) -> None:
    """Refuse up front a run whose estimated memory (:func:`estimate_memory`) exceeds what is available."""
    from isavar.workflows.outputs import check_memory

    # a pool's workers share this machine's memory; an MPI rank is counted alone (ranks may be on other nodes)
    workers = int(getattr(executor, "workers", 1)) if getattr(executor, "size", 1) == 1 else 1
    hint = ("use --fl (with automatic decimation) or --decimate for a smaller working box"
            if nx > 64 else "use fewer --workers")
    if workers > 1 and nx > 64:
        hint += ", or fewer --workers"
    check_memory(estimate_memory(n, box, nx, params, workers),
                 f"3dvariability of {n} particles on a {nx}-pixel working box (npad {params.npad}, "
                 f"{workers} worker{'s' if workers > 1 else ''})", hint)


def run_variability(stack_path, outdir, params: VariabilityParams, *, executor=None, progress=None,
                    symmetrize_only: bool = False, pixel_size_A: float | None = None, project_dir=None,
                    on_checkpoint=None) -> VariabilityResult | None:
    """Run the 3D variability analysis of a particle file and write the output directory.

    Parameters
    ----------
    stack_path : path-like
        Particles with 3D orientations (.star, .hdf, .cs, ...).
    outdir : path-like
        Output directory; must not exist, unless it holds an interrupted run of the
        same input and parameters, which is then continued (module notes).
    params : VariabilityParams
        Settings.
    executor : Executor, optional
        Default serial.
    progress : Progress, optional
        Progress reporter.
    symmetrize_only : bool
        SPHIRE ``--symmetrize``: only write ``symmetrized_particles.star`` and stop.
    pixel_size_A : float, optional
        Pixel size replacing the file's (``--apix``).
    project_dir : path-like, optional
        RELION project directory: relative image names are read from it first
        and the output STAR files name their stacks relative to it.
    on_checkpoint : callable, optional
        ``on_checkpoint(n)`` is called on every process after the ``n``-th checkpoint of this call is
        saved (at most one per round of group blocks, 2D-map mode). An exception it raises stops the run there,
        and the same call later continues from that checkpoint.

    Returns
    -------
    VariabilityResult or None
        None when ``symmetrize_only``.

    Raises
    ------
    InputError
        Unreadable input, missing orientations / CTF parameters, duplicated particles,
        an existing output directory that is not an interrupted run of the same input
        and parameters, invalid options, too little disk space; nothing is written in
        these cases, and a new run rejected later (e.g. NaN pixels) removes its directory.
    """
    from isavar.parallel.serial import SerialExecutor

    executor = executor or SerialExecutor()
    progress = progress or NullProgress()
    stack_path, outdir = Path(stack_path), Path(outdir)
    if outdir.exists() and not (outdir / MARKER).exists():
        raise InputError("output directory already exists (choose a new name)", path=outdir)
    stack, pixel = _read_input(stack_path, pixel_size_A, project_dir)
    try:
        table, images = stack.table, stack.images
        n, box = len(images), int(images.shape[-1])
        if symmetrize_only and params.symmetry == "c1":
            raise InputError("--symmetrize/--force_symmetrize needs a point group other than c1 (--sym)")
        geo = particle_geometry(table, pixel, need_ctf=params.ctf and not params.var_input, source=stack_path)
        nsym = 1
        if not params.var_input:
            from isavar.core.geometry import symmetry_matrices

            nsym = symmetry_matrices(params.symmetry).shape[0]
            if not params.snd and params.img_per_grp > n * nsym:
                raise InputError(f"--img_per_grp {params.img_per_grp} is larger than the number of "
                                 f"(symmetry-expanded) particles, {n * nsym}", path=stack_path)
        _check_options(params, box, table, stack_path)
        grid = choose_grid(box, pixel, params)
        fingerprint = input_fingerprint(stack_path, stack)
        resume = _check_existing(outdir, fingerprint, params, symmetrize_only, root=executor.is_root())
        executor.barrier()
        check_can_write(outdir)
        if not resume:
            check_disk_space(outdir, _disk_need(params, n, box, grid.nx, symmetrize_only),
                             f"3dvariability of {n} particles (box {box}, working box {grid.nx})")
        if not symmetrize_only:
            _check_memory(params, n, box, grid.nx, executor)
        created = not outdir.exists()
        if executor.is_root():
            outdir.mkdir(parents=True, exist_ok=True)
            (outdir / MARKER).touch()
            if resume:
                for path in remove_stale_temporaries(outdir):
                    log.info("removed %s, left behind by the interrupted run", path.name)
            else:
                write_json(outdir / "manifest.json", {
                    "tool": "isavar 3dvariability", "stage": "running", "input": fingerprint,
                    "parameters": dict(_science(params), symmetrize_only=bool(symmetrize_only))})
        with run_log(outdir / "log.txt", enabled=executor.is_root()) as run_log_file:
            executor.barrier()
            try:
                return _run(stack, stack_path, outdir, params, executor, progress, symmetrize_only, geo, grid,
                            pixel, resume, on_checkpoint, project_dir)
            except InputError as exc:
                if not resume and executor.is_root():
                    run_log_file.detach()
                    remove_run_directory(outdir, created=created)
                    raise InputError(f"{exc} (nothing was kept in {outdir})") from None
                raise
            except BaseException:
                if executor.is_root():                # the log file only: the CLI prints the one line
                    log.debug("3dvariability stopped; the same command continues from the last checkpoint "
                              "(%s)", outdir)
                raise
    finally:
        stack.close()


#: Least time between two checkpoints (seconds); the first and the last round are always saved.
CHECKPOINT_SECONDS = 30.0


class _Checkpoints:
    """Saves the run state after rounds of blocks (called on every process; the root writes).

    The root decides whether this round is saved (time since the last save) and tells every process; every
    process then flushes its 2D-map rows, and the root writes the checkpoint once all have.
    """

    def __init__(self, outdir: Path, store, executor, hook):
        self.path = outdir / "checkpoints" / "groups.npz"
        self.store = store
        self.executor = executor
        self.root = executor.is_root()
        self.hook = hook
        self.count = 0
        self.last = None

    def load(self, executor) -> dict | None:
        state = None
        if self.root and self.path.exists() and (self.store is None or self.store.resumed):
            try:
                with np.load(self.path) as d:
                    state = {k: d[k] for k in d.files}
                if "blocks_done" not in state:
                    raise ValueError("a checkpoint of an older version")
            except (OSError, ValueError, EOFError) as exc:
                log.warning("%s is unreadable (%s); the groups are computed again", self.path, exc)
                state = None
        return executor.bcast(state)

    def __call__(self, state: dict) -> None:
        save = None
        if self.root:
            now = time.monotonic()
            last_round = state["blocks_done"] == state["n_blocks"]
            save = self.last is None or now - self.last >= CHECKPOINT_SECONDS or last_round
            if save:
                self.last = now
        if not self.executor.bcast(save):
            return
        if self.store is not None:
            self.store.flush()
        self.executor.barrier()                      # every rank's maps are on disk before the checkpoint
        if self.root:
            self.path.parent.mkdir(exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp.npz")
            with open(tmp, "wb") as fh:
                np.savez(fh, **state)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        self.count += 1
        if self.hook is not None:
            self.hook(self.count)


def _run(stack, stack_path, outdir, params, executor, progress, symmetrize_only, geo, grid, pixel, resume,
         on_checkpoint, project_dir=None):
    table, images = stack.table, stack.images
    n, box = len(images), int(images.shape[-1])
    log.info("isavar 3dvariability: %s -> %s%s", stack_path, outdir, " (continuing an interrupted run)"
             if resume else "")
    log.info("parameters: %s", params.to_dict())
    files = []
    if params.symmetry != "c1" and not params.var_input and executor.is_root():
        rows = write_symmetrized_table(outdir / "symmetrized_particles.star", table, geo.rotations,
                                       params.symmetry, pixel, box, project_dir)
        log.info("symmetry %s: %d expanded orientations written to symmetrized_particles.star",
                 params.symmetry, rows)
        files.append("symmetrized_particles.star")
    if symmetrize_only:
        _finish_outputs(outdir, params, executor, stack_path, files, None, n, box, pixel)
        return None
    store = None
    mode_2d = not (params.var_input or params.snd)
    sink = None
    if mode_2d and (params.save_ave2d or params.save_var2d):
        if executor.is_root():
            store = sink = _MapStore(outdir, n, grid.nx, ave=params.save_ave2d, var=params.save_var2d,
                                     resume=resume)
        executor.barrier()
        if not executor.is_root():       # other MPI ranks write the rows they computed into the same files
            store = sink = _MapStore(outdir, n, grid.nx, ave=params.save_ave2d, var=params.save_var2d,
                                     attach=True)
        store.resumed = executor.bcast(store.resumed)
    checkpoints = _Checkpoints(outdir, store, executor, on_checkpoint) if mode_2d else None
    state = checkpoints.load(executor) if (checkpoints is not None and resume) else None
    result = variability(table, images, params, pixel_size_A=pixel, executor=executor, progress=progress,
                         map_sink=sink, source=stack_path, resume=state, checkpoint=checkpoints)
    if store is not None:
        store.flush()
        executor.barrier()                          # every rank's rows are on disk before the root reads them
        if not executor.is_root():
            store.close()
    if executor.is_root():
        t0 = time.perf_counter()
        if store is not None:
            files += store.write(outdir, _table_2d(table, box, pixel), grid, pixel, project_dir, progress)
            store.close()
        files += _write_volumes(outdir, result)
        result.timings_s["writing"] = time.perf_counter() - t0
    _finish_outputs(outdir, params, executor, stack_path, files, result, n, box, pixel)
    return result


def _write_volumes(outdir: Path, result: VariabilityResult) -> list[str]:
    from isavar.io import write_volume

    files = []
    write_volume(outdir / "var3D.mrc", result.var3d, result.pixel_size_A, overwrite=True)
    files.append("var3D.mrc")
    if result.ave3d is not None:
        write_volume(outdir / "ave3D.mrc", result.ave3d, result.pixel_size_A, overwrite=True)
        files.append("ave3D.mrc")
    try:
        from isavar.report.slices import save_variability_slices

        save_variability_slices(outdir / "var3D_slices.png", result.var3d, result.ave3d,
                                pixel_size_A=result.pixel_size_A)
        files.append("var3D_slices.png")
    except ImportError as exc:  # matplotlib missing: the figure is optional
        log.warning("var3D_slices.png not written (%s)", exc)
    return files


def _finish_outputs(outdir, params, executor, stack_path, files, result, n, box, pixel) -> None:
    if not executor.is_root():
        return
    summary = {"input": str(stack_path), "n_particles": n, "box": box, "pixel_size_A": pixel,
               "parameters": params.to_dict(), "files": sorted(files)}
    if result is not None:
        summary.update(result.summary())
    write_json(outdir / "summary.json", summary)
    write_provenance(outdir, command="3dvariability", parameters=params.to_dict(), executor=executor,
                     extra={"input": str(stack_path), "n_particles": n, "box": box})
    man = _load_manifest(outdir)
    man["stage"] = "finished"
    write_json(outdir / "manifest.json", man)
    _remove_scratch(outdir)
    log.info("outputs in %s: %s", outdir, ", ".join(sorted(files)))


@dataclasses.dataclass(frozen=True)
class _ReconstructContext:
    """What every task of :func:`run_reconstruct` needs (picklable).

    Attributes
    ----------
    geometry : ParticleGeometry
        Orientations, origins (px) and, for a CTF-weighted map, CTF parameters.
    box, npad : int
    symmetry, interpolation : str
    pixel_size_A : float
    images : LazyImages, (N, box, box)
    """

    geometry: object
    box: int
    npad: int
    symmetry: str
    interpolation: str
    pixel_size_A: float
    images: object


def _reconstruct_task(ctx: _ReconstructContext, rows: np.ndarray):
    """Fourier sums of one chunk of particles: ``(count, data, weights)``."""
    from isavar.core.ctf import ctf_2d
    from isavar.core.reconstruct import FourierAccumulator

    geo, box = ctx.geometry, ctx.box
    acc = FourierAccumulator(box, npad=ctx.npad, symmetry=ctx.symmetry, interpolation=ctx.interpolation)
    ctf = None
    if geo.ctf is not None:
        c = geo.ctf
        ctf = ctf_2d(box, ctx.pixel_size_A, **{k: c[k][rows] for k in c})
    acc.insert(ctx.images[rows], geo.rotations[rows], origins_px=geo.origins_px[rows], ctf=ctf)
    return (acc.data, acc.weights), rows.size


def run_reconstruct(stack_path, out_path, *, ctf: bool = False, symmetry: str = "c1", npad: int = 2,
                    interpolation: str = "linear", mask_radius_px: float | None = None, chunk_size: int = 512,
                    executor=None, progress=None, overwrite: bool = False, pixel_size_A: float | None = None,
                    project_dir=None, soft_mask: bool = True) -> np.ndarray:
    """Plain 3D reconstruction of oriented particles (``isavar reconstruct``).

    Direct Fourier inversion (:class:`isavar.core.reconstruct.FourierAccumulator`)
    of every image at its orientation and origin; with ``ctf`` the images are
    CTF-weighted (Wiener-style). Chunks of images are spread over the executor
    and their accumulators summed in chunk order.

    Parameters
    ----------
    stack_path : path-like
        Particles with orientations (and CTF parameters with ``ctf``).
    out_path : path-like
        Output ``.mrc`` (or ``.hdf``); voxel size = input pixel size.
    ctf : bool
        CTF-weighted reconstruction.
    symmetry : str
        Point group imposed.
    npad : int
        Padding factor.
    interpolation : {"linear", "nearest"}
        Fourier gridding kernel.
    mask_radius_px : float, optional
        Zero voxels beyond this radius (default: no mask).
    chunk_size : int
        Images per task.
    executor, progress
        Execution and progress reporting.
    overwrite : bool
        Replace an existing output file.
    pixel_size_A : float, optional
        Pixel size replacing the file's (``--apix``).
    project_dir : path-like, optional
        RELION project directory for relative image names.
    soft_mask : bool
        Flatten the map outside the sphere of radius ``N / 2`` to its background
        level with a 3-voxel raised-cosine edge, as ``relion_reconstruct`` does
        (:func:`isavar.core.masks.soft_mask_outside_sphere`); ignored when
        ``mask_radius_px`` is given.

    Returns
    -------
    numpy.ndarray
        The volume.
    """
    from isavar.core.reconstruct import FourierAccumulator
    from isavar.io import write_volume
    from isavar.parallel.serial import SerialExecutor
    from isavar.variability.params import normalise_symmetry

    executor = executor or SerialExecutor()
    progress = progress or NullProgress()
    from isavar.io import particle_format
    from isavar.io.particles import ORIENTATION_COLUMNS, ORIGIN_COLUMNS, describe_duplicates, duplicated_rows

    out_path = Path(out_path)
    if particle_format(out_path) not in ("mrcs", "hdf"):
        raise InputError("a map is written as .mrc or .hdf", path=out_path)
    if out_path.exists() and not overwrite:
        raise InputError("output file exists (choose a new name)", path=out_path)
    if out_path.is_dir():
        raise InputError("is a directory", path=out_path)
    if int(chunk_size) < 1 or int(npad) < 1:
        raise InputError(f"chunk_size and npad must be >= 1 (got {chunk_size}, {npad})")
    check_can_write(out_path)
    symmetry = normalise_symmetry(symmetry)
    stack, pixel = _read_input(Path(stack_path), pixel_size_A, project_dir)
    n, box = len(stack.images), int(stack.images.shape[-1])
    if mask_radius_px is not None and mask_radius_px > box / 2:
        stack.close()
        raise InputError(f"--radius {mask_radius_px:g} is larger than half the {box}-pixel box", path=stack_path)
    dup = duplicated_rows(stack.table, columns=ORIENTATION_COLUMNS + ORIGIN_COLUMNS)
    if dup.any():
        stack.close()
        raise InputError(describe_duplicates(stack.table, dup) + ", with the same orientation: such a particle "
                         "would count twice; remove the duplicated rows", path=stack_path)
    check_disk_space(out_path, 4.0 * box ** 3 + (1 << 20), f"a {box}^3 map")
    geo = particle_geometry(stack.table, pixel, need_ctf=ctf, source=stack_path)
    ctx = _ReconstructContext(geometry=geo, box=box, npad=int(npad), symmetry=symmetry, interpolation=interpolation,
                              pixel_size_A=pixel, images=stack.images)
    chunks = vol.file_order_chunks(stack.images, int(chunk_size))
    progress.stage("reconstruction", total=n)
    data, weights = vol.accumulate_rounds(executor, _reconstruct_task, chunks, shared=ctx,
                                          on_result=progress.advance)
    progress.close()
    acc = FourierAccumulator(box, npad=int(npad), symmetry=symmetry, interpolation=interpolation)
    acc.data[...], acc.weights[...] = data, weights
    stack.close()
    volume = acc.finish()
    if mask_radius_px is not None and mask_radius_px > 0:
        volume = np.where(vol.spherical_mask(box, mask_radius_px), volume, np.float32(0)).astype(np.float32)
    elif soft_mask:
        from isavar.core.masks import soft_mask_outside_sphere

        volume = soft_mask_outside_sphere(volume)
    if executor.is_root():
        write_volume(out_path, volume, pixel, overwrite=overwrite)
        log.info("reconstructed %d particles (box %d, %s, symmetry %s) -> %s", n, box,
                 "CTF-weighted" if ctf else "no CTF", symmetry, out_path)
    return volume
