"""``isavar isac2`` workflow: files, checkpoints, resume and outputs around :mod:`isavar.isac`.

Output directory (SPHIRE layout plus RELION/cryoSPARC-friendly files)::

    OUTDIR/
      .isavar_isac2                 marker: this directory belongs to an isavar ISAC2 run
      manifest.json                 parameters, seed, input fingerprint, progress (written atomically)
      checkpoints/state.npz         run state after the last completed step (atomic)
      checkpoints/main_XXX_end.npz  state at the end of main iteration XXX (for --restart)
      stack_ali2d.npy               working stack (N, T, T) float32
      README_shrink_ratio.txt       lines 6-7: shrink ratio and radius
      rpw.txt                       VPP table (zeros without --VPP)
      2dalignment/initial2Dparams.txt, Finished_initial_2d_alignment.txt
      mainXXX/generationYYY/{original_,good_,}class_averages_XXX_YYY.hdf, to_process_next_XXX_YYY.txt, finished
      all_parameters.txt, processed_images.txt, not_processed_images.txt
      class_averages.hdf, ordered_class_averages.hdf, chains_params.txt, finished
      class_averages.mrcs + class_averages.star, class_averages_fullres.mrcs
      particles.star, unaccounted_particles.star, class_averages.png, summary.json, provenance.json, log.txt
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from isavar._logging import run_log
from isavar._progress import NullProgress
from isavar.core import _kernels
from isavar.errors import InputError
from isavar.isac import run as isac_run
from isavar.isac.params import Isac2Params
from isavar.workflows.outputs import (
    check_can_write,
    check_disk_space,
    check_memory,
    create_output_dir,
    fingerprint_changes,
    input_fingerprint,
    remove_run_directory,
    remove_stale_temporaries,
    write_json,
    write_provenance,
    write_text_atomic,
)

log = logging.getLogger(__name__)

MARKER = ".isavar_isac2"
CHUNK = 1024
#: Input images per chunk of the full-size passes (pre-processing, full-resolution averages, the substack and
#: aligned-stack outputs) are fewer than :data:`CHUNK` when a chunk's pixels would exceed this many bytes:
#: glibc maps every larger array afresh (its mmap threshold is at most 32 MiB), and first-touch page faults
#: of 64 MB temporaries cost the 2,000-particle run (box 128) more than a CPU second.
CHUNK_BYTES = 16 << 20


def full_size_chunk(box: int) -> int:
    """Input images per chunk of a full-size pass: at most :data:`CHUNK`, at most :data:`CHUNK_BYTES` of float32."""
    return max(1, min(CHUNK, CHUNK_BYTES // (4 * int(box) * int(box))))


# ------------------------------------------------------------------------------------- small file helpers

def _fmt_rows(array, fmt) -> str:
    a = np.asarray(array)
    if a.ndim == 1:
        a = a[:, None]
    return "".join(" ".join(fmt[j] % v for j, v in enumerate(row)) + "\n" for row in a)


def write_index_file(path, indices) -> None:
    """One 0-based index per line (SPHIRE ``%12d``)."""
    write_text_atomic(path, "".join(f"{int(i):12d}\n" for i in np.asarray(indices).ravel()))


def read_index_file(path) -> np.ndarray:
    """Inverse of :func:`write_index_file`."""
    text = Path(path).read_text().split()
    return np.array([int(t) for t in text], dtype=np.int64)


def write_params_file(path, params) -> None:
    """Rows ``alpha sx sy mirror`` (``%14.6f`` x3, ``%12d``)."""
    p = np.asarray(params, dtype=np.float64).reshape(-1, 4)
    write_text_atomic(path, "".join(f"{a:14.6f} {x:14.6f} {y:14.6f} {int(round(m)):12d}\n" for a, x, y, m in p))


def _touch(path) -> None:
    write_text_atomic(path, "")


def _save_npz_atomic(path, arrays: dict) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_hdf_averages(path, averages, members, pixel_size_A, extra=None) -> None:
    from isavar.io import write_particles

    averages = np.asarray(averages, np.float32)
    table = pd.DataFrame({"members": [np.asarray(m, np.int64) for m in members],
                          "n_objects": [int(len(m)) for m in members]})
    if extra:
        for k, v in extra.items():
            table[k] = v
    if len(averages) == 0:
        Path(path).unlink(missing_ok=True)
        return
    write_particles(path, averages, table, pixel_size_A=pixel_size_A, overwrite=True)


# ------------------------------------------------------------------------------------- validation

def validate_inputs(stack, p: Isac2Params) -> None:
    """All checks that need the input, before anything is written (clear InputErrors)."""
    from isavar.io.particles import CTF_COLUMNS, has_columns
    from isavar.isac.prealign import search_schedule
    from isavar.isac.preprocess import shrunk_size

    path = getattr(stack, "path", None)
    n, box = len(stack.table), stack.images.box
    if (p.CTF or p.VPP) and not has_columns(stack.table, CTF_COLUMNS):
        missing = [c for c in CTF_COLUMNS if c not in stack.table.columns or stack.table[c].isna().any()]
        raise InputError(f"--{'CTF' if p.CTF else 'VPP'} needs CTF parameters for every particle, "
                         f"missing: {', '.join(missing)}", path=path)
    if (p.CTF or p.VPP) and not stack.pixel_size_A:
        raise InputError("--CTF/--VPP need the pixel size, which the file does not state", path=path)
    if 2 * p.radius + 2 > box:
        raise InputError(f"--radius={p.radius} is too large for the {box}-pixel box "
                         f"(need 2*radius + 2 <= {box})", path=path)
    nd = shrunk_size(box, p.shrink)
    try:
        search_schedule(nd, p.target_radius)
    except ValueError:
        raise InputError(f"--radius={p.radius} is too large for the {box}-pixel box at --target_radius="
                         f"{p.target_radius} (shrunken box {nd} < {2 * p.target_radius + 2})", path=path) from None
    if p.filament and "segment_angle_deg" not in stack.table.columns:
        raise InputError("--filament_width needs segment angles (SPHIRE segment_angle) in the metadata",
                         path=path)
    try:
        isac_run.check_enough_images(n, p)
    except InputError as exc:
        raise InputError(str(exc), path=path) from None
    from isavar.io.particles import describe_duplicates, duplicated_rows

    dup = duplicated_rows(stack.table, columns=())
    if dup.any():
        raise InputError(describe_duplicates(stack.table, dup) + "; the same image twice would be classified "
                         "twice: remove the duplicated rows", path=path)


#: Memory of one Python process with isavar's modules loaded (numpy, scipy, numba kernels), bytes.
PROCESS_BASE_BYTES = 200 << 20


def memory_terms(n: int, box: int, p: Isac2Params, workers: int = 1) -> dict:
    """The parts of an ISAC2 run's peak memory (bytes), each with the option that changes it.

    The working stack and the shrunken stack stay on disk (memory-mapped; the kernel's page cache is not
    counted). What is held:

    * ``images``: per image of the run, the parameters and assignment (about 200 bytes) and what the EQK
      assignment needs: with ``--eqk_search candidates`` the ``C = --eqk_candidates`` candidates and at most
      ``U = 5 C`` exact scores, image/class numbers and parameters per image (about 80 U bytes); with the
      flat search all ``K = n / img_per_grp`` scores and parameters (about 70 K bytes per image);
    * ``classes``: the ``K`` references, their class sums and prepared polar spectra (about 40 T² bytes per
      class, T the working box) and the exact-sum accumulator (at most 64 MB);
    * ``workers``: per process (the main one and each pool worker): the interpreter and modules, a chunk of
      512 working images held three times over, the translational search of one image (the polar samples
      at every trial shift, ``(2 xr / ts + 1) x (2 yr / ts + 1)`` shifts x the ring samples, three times
      over, and the shift lattice of the image padded by the search range) and, in the main process, the
      pre-alignment's reference subset (2,000 shrunken images, twice).
    """
    from isavar.isac.generation import EQK_CHUNK, SUM_BLOCK_BYTES, UNION_FACTOR
    from isavar.isac.prealign import PREALIGN_SUBSET
    from isavar.isac.preprocess import shrunk_size

    grid = isac_run.make_grid(p)
    t = p.box
    k = max(1, n // p.img_per_grp)
    nd = shrunk_size(box, p.shrink)
    shifts = (2 * int(p.xr / p.ts) + 1) * (2 * int(p.yr_eff / p.ts) + 1)
    reach = max(p.xr, p.yr_eff) + 2
    lattice = 4.0 * (t + 2 * reach) ** 2 * (2 * p.xr + 2)
    search = 3 * 4.0 * shifts * grid.lcirc + lattice
    if p.eqk_search == "candidates" and k > 2 * p.eqk_candidates:
        per_image = 200.0 + 80.0 * min(k, UNION_FACTOR * p.eqk_candidates)
        images_hint = "a smaller --eqk_candidates"
    else:
        per_image = 200.0 + 72.0 * k
        images_hint = "--eqk_search candidates or a larger --img_per_grp"
    per_process = PROCESS_BASE_BYTES + 3 * 4.0 * EQK_CHUNK * t * t + search
    processes = workers + (1 if workers > 1 else 0)
    return {
        "images": (n * per_image, f"{n} images, {k} classes: {images_hint}"),
        "classes": (40.0 * k * t * t + min(SUM_BLOCK_BYTES, 24.0 * k * t * t),
                    f"{k} classes of {t} px: a larger --img_per_grp or a smaller --target_nx"),
        "workers": (processes * per_process + 2 * 4.0 * min(n, PREALIGN_SUBSET) * nd * nd,
                    f"{workers} worker{'s' if workers > 1 else ''}, --xr {p.xr} --yr {p.yr_eff} --ts {p.ts:g} "
                    f"({shifts} trial shifts per image): fewer --workers, a smaller --xr/--yr or a larger --ts"),
    }


def estimate_memory(n: int, box: int, p: Isac2Params, workers: int = 1) -> float:
    """Peak memory (bytes) of an ISAC2 run: the sum of :func:`memory_terms`."""
    return float(sum(v for v, _ in memory_terms(n, box, p, workers).values()))


def estimate_disk(n: int, box: int, p: Isac2Params, *, own_image_stack: bool) -> float:
    """Disk space (bytes) an ISAC2 run writes: the working stack and, while it is built, the shrunken stack
    (twice with ``--VPP``), the checkpoints and text files (about 200 bytes per image), and an image stack of
    its own for ``particles.star`` when the input images are not MRC stacks."""
    from isavar.isac.preprocess import shrunk_size

    nd = shrunk_size(box, p.shrink)
    need = 4.0 * n * p.box ** 2 + 4.0 * n * nd * nd * (2 if p.VPP else 1) + 200.0 * n + (1 << 24)
    if own_image_stack:
        need += 4.0 * n * box ** 2
    return need


def check_resources(stack, p: Isac2Params, outdir, workers: int) -> None:
    """Refuse up front a run the machine cannot hold: memory (per part, naming the option) and disk."""
    n, box = len(stack.table), stack.images.box
    terms = memory_terms(n, box, p, workers)
    largest = max(terms.values(), key=lambda v: v[0])[1]
    what, hint = largest.split(": ", 1)
    check_memory(sum(v for v, _ in terms.values()), f"ISAC2 on {what}", f"use {hint}")
    own = not all(str(src.path).lower().endswith((".mrcs", ".mrc")) for src in stack.images.sources)
    if (Path(outdir) / "stack_ali2d.npy").exists():
        need = 200.0 * n + (1 << 24) + (4.0 * n * box ** 2 if own else 0.0)
    else:
        need = estimate_disk(n, box, p, own_image_stack=own)
    check_disk_space(outdir, need, f"ISAC2 on {n} images (working stack of {p.box} px, kept in the output "
                     "directory)")


# ------------------------------------------------------------------------------------- the workflow

class _Run:
    """State of one invocation (directory, inputs, executor)."""

    def __init__(self, stack_path, outdir, p, executor, progress, on_checkpoint):
        self.stack_path = Path(stack_path)
        self.outdir = Path(outdir)
        self.p = p
        self.executor = executor
        self.progress = progress
        self.on_checkpoint = on_checkpoint
        self.steps_done = 0
        self.t0 = time.time()
        self.timings: dict = {}
        self.root = executor.is_root()

    def _tick(self):
        """A checkpoint was saved: count it and call the caller's hook."""
        self.steps_done += 1
        if self.on_checkpoint is not None:
            self.on_checkpoint(self.steps_done)

    # ---------------------------------------------------------------- manifest
    @property
    def manifest_path(self) -> Path:
        return self.outdir / "manifest.json"

    def load_manifest(self) -> dict | None:
        if self.manifest_path.exists():
            return json.loads(self.manifest_path.read_text())
        return None

    def save_manifest(self, **updates) -> None:
        m = self.load_manifest() or {}
        m.update(updates)
        write_json(self.manifest_path, m)


def run_isac2(stack_path, outdir, params: Isac2Params, *, executor=None, progress=None,
              on_checkpoint=None, pixel_size_A: float | None = None, project_dir=None,
              write_aligned: bool = False):
    """Run ISAC2 on a particle file into ``outdir`` (resumable).

    Parameters
    ----------
    stack_path : path
        Particles (any format :func:`isavar.io.read_particles` reads).
    outdir : path
        Output directory; re-running the same command continues an interrupted run.
    params : Isac2Params
        Parameters (``rand_seed=None``: a seed is drawn and recorded; a resumed run reuses it).
    executor : Executor, optional
        Default serial.
    progress : Progress, optional
    on_checkpoint : callable, optional
        ``on_checkpoint(n)`` is called on every process after the ``n``-th checkpoint of this call is
        saved (the working stack, then every step of the classification). An exception it raises
        stops the run there, and the same call later continues from that checkpoint.
    pixel_size_A : float, optional
        Pixel size replacing the file's (``--apix``). Without one the STAR
        outputs are written at 1.0 Å/px, with a warning.
    project_dir : path, optional
        RELION project directory: relative image names are read from it first,
        and the STAR outputs name images relative to it (default: relative to
        each STAR file's folder).
    write_aligned : bool
        Also write ``aligned_particles.star/.mrcs``: every accounted particle
        rotated, shifted and mirrored into its class frame (``--write-aligned``).

    Returns
    -------
    Isac2Result
    """
    from isavar.io import read_particles
    from isavar.parallel.serial import SerialExecutor

    executor = executor or SerialExecutor()
    progress = progress or NullProgress()
    p = params.validate()
    stack = read_particles(stack_path, pixel_size_A=pixel_size_A, project_dir=project_dir)
    try:
        return _start(stack_path, stack, Path(outdir), p, executor, progress, on_checkpoint,
                      project_dir=project_dir, write_aligned=write_aligned)
    finally:
        stack.close()


def _start(stack_path, stack, outdir: Path, p: Isac2Params, executor, progress, on_checkpoint, *,
           project_dir=None, write_aligned=False):
    validate_inputs(stack, p)
    if not stack.pixel_size_A:
        log.warning("%s states no pixel size: particles.star and the class-average files are written at "
                    "1.0 Å/px (origins in Å are then in pixels); set the pixel size with --apix", stack_path)
    if outdir.exists() and not outdir.is_dir():
        raise InputError("exists and is not a directory; choose a new or empty directory", path=outdir)
    if outdir.exists() and any(outdir.iterdir()) and not (outdir / MARKER).exists():
        raise InputError(f"exists but is not an isavar ISAC2 output directory (no {MARKER}); "
                         "choose a new or empty directory", path=outdir)
    check_can_write(outdir)
    fresh = executor.bcast(not (outdir / "manifest.json").exists())
    if fresh and p.restart > -1:
        raise InputError(f"--restart={p.restart} given but there is no run to restart", path=outdir)
    # a pool's workers share this machine's memory; an MPI rank is counted alone (ranks may be on other nodes)
    check_resources(stack, p, outdir, int(getattr(executor, "workers", 1)) if getattr(executor, "size", 1) == 1
                    else 1)
    # the kernels are loaded here, before a pool forks its workers, so that they inherit them
    _kernels.preload()
    run = _Run(stack_path, outdir, p, executor, progress, on_checkpoint)
    run.project_dir, run.write_aligned = project_dir, bool(write_aligned)
    fingerprint = input_fingerprint(stack_path, stack)
    if not fresh:
        man = run.load_manifest()
        problems, notes = fingerprint_changes(man.get("input"), fingerprint)
        if (man.get("input") or {}).get("path") != fingerprint["path"]:
            raise InputError("this output directory belongs to a run on a different input "
                             f"({man.get('input', {}).get('path')}); choose a new directory", path=outdir)
        if problems:
            raise InputError(f"holds a run on {man.get('input', {}).get('path')} whose input has changed since "
                             f"({'; '.join(problems)}); continuing would mix the two: choose a new output "
                             "directory (or restore the original input)", path=outdir)
        for note in notes:
            log.warning("resuming %s: %s (the sampled content is unchanged)", outdir, note)
        if executor.is_root():
            for path in remove_stale_temporaries(outdir):
                log.info("removed %s, left behind by the interrupted run", path.name)
        old = Isac2Params.from_recorded(man["params"])
        seed = old.rand_seed
        mine = dataclasses.replace(p, rand_seed=seed if p.rand_seed is None else p.rand_seed)
        if mine.science_dict() != old.science_dict():
            diff = [k for k, v in mine.science_dict().items() if old.science_dict().get(k) != v]
            raise InputError("this output directory holds a run with different parameters "
                             f"({', '.join(diff)}); choose a new directory", path=outdir)
        p = dataclasses.replace(mine, restart=p.restart)
    else:
        seed = executor.bcast(p.rand_seed if p.rand_seed is not None else secrets.randbits(32))
        p = dataclasses.replace(p, rand_seed=int(seed))
    run.p = p
    created = not outdir.exists()
    if executor.is_root():
        create_output_dir(outdir, marker=MARKER)
        _touch(outdir / MARKER)
        if fresh:
            run.save_manifest(tool="isavar isac2", params=p.to_dict(), input=fingerprint, stage="start")
    with run_log(outdir / "log.txt", enabled=executor.is_root()) as run_log_file:
        executor.barrier()
        try:
            return _run(run, stack)
        except InputError as exc:
            # A new run rejected while reading the images (e.g. NaN pixels) leaves nothing behind, so that the
            # corrected run is not refused as "a run on a different input".
            if fresh and executor.is_root() and (run.load_manifest() or {}).get("stage") == "start":
                run_log_file.detach()
                remove_run_directory(outdir, created=created)
                raise InputError(f"{exc} (nothing was kept in {outdir})") from None
            raise


def _run(run: _Run, stack):
    p, outdir = run.p, run.outdir
    t = time.time()
    working, shifts, shrink = _prepare(run, stack)
    run.timings["prepare_s"] = time.time() - t
    state = _load_or_restart(run, len(working))
    grid = isac_run.make_grid(p)
    t = time.time()
    if not state.finished:
        if state.engine is not None and not state.engine.done:     # resumed inside a generation
            run.progress.stage(f"main {state.main} generation {state.gen}: SAC rounds (at most {p.init_iter})",
                               total=p.init_iter)
            run.progress.advance(state.engine.rounds_done)

        def on_step(st, event):
            if run.root:                                 # every process holds the same state; one writes
                ended = isinstance(event, isac_run.GenerationFinished)
                if ended:
                    _write_generation_files(run, st, event)
                _save_npz_atomic(outdir / "checkpoints" / "state.npz", st.to_arrays())
                run.save_manifest(stage="classification", history=st.history, main=st.main, gen=st.gen)
                if ended and event.end_main:
                    _save_npz_atomic(outdir / "checkpoints" / f"main_{event.main:03d}_end.npz",
                                     st.to_arrays())
                    _write_text_lists(run, st, event)
            if isinstance(event, isac_run.GenerationStarted):
                # one bar per generation; its time estimate assumes all init_iter rounds (an upper bound)
                run.progress.stage(f"main {event.main} generation {event.gen}: SAC rounds (at most "
                                   f"{p.init_iter})", total=p.init_iter)
            elif isinstance(event, isac_run.RoundDone):
                run.progress.advance(1)
            run._tick()

        state = isac_run.run_classification(working, p, grid, run.executor, state=state, on_step=on_step,
                                            progress=None)
    run.timings["classification_s"] = time.time() - t
    return _finish(run, stack, state, shifts, shrink)


# ------------------------------------------------------------------------------------- stage A/B

@dataclasses.dataclass(frozen=True)
class PreprocessChunk:
    """One chunk of the front end (an executor task, picklable).

    Attributes
    ----------
    images : ndarray, (m, box, box)
        Raw particle images.
    table : pandas.DataFrame
        Their particle-table rows (CTF columns).
    params : Isac2Params
    pixel_size_A : float or None
    rpw : ndarray or None
        The VPP whitening table (``--VPP``).
    """

    images: np.ndarray
    table: object
    params: Isac2Params
    pixel_size_A: float | None
    rpw: np.ndarray | None


def _correct_and_shrink_task(task: PreprocessChunk):
    """CTF correction and shrinking of one chunk: ``(shrunk, pre-alignment images or None)``."""
    from isavar.isac.preprocess import correct_and_shrink

    return correct_and_shrink(np.asarray(task.images, np.float32), task.table, task.params, task.pixel_size_A,
                              rpw=task.rpw)


@dataclasses.dataclass(frozen=True)
class FinishChunk:
    """One chunk of the working stack (an executor task): rows of the shrunken stack, their shifts."""

    images: object
    shifts: np.ndarray
    table: object
    params: Isac2Params


def _finish_task(task: FinishChunk):
    from isavar.isac.preprocess import finish_working_images

    return (finish_working_images(np.asarray(task.images, np.float32), task.shifts, task.table, task.params),)


def _new_npy(path: Path, shape) -> None:
    """An ``.npy`` file of float32 zeros of ``shape`` (sparse on most file systems)."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=tuple(int(s) for s in shape))
    del arr


class _RowWriter:
    """Writes blocks of rows into ``.npy`` files at their byte offsets (any process, any order).

    Each process writes only the rows of the tasks it ran, with plain positioned writes (safe on a shared
    file system where ranks on other nodes write other rows); one write per run of consecutive rows.
    """

    def __init__(self, paths):
        self.files = []
        for path in paths:
            mapped = np.load(path, mmap_mode="r")
            row = int(np.prod(mapped.shape[1:])) * 4
            self.files.append((os.open(path, os.O_WRONLY), mapped.offset, row))
            del mapped

    def write(self, rows, blocks) -> None:
        """Write ``block[j]`` into row ``rows[j]`` of each file (``rows``: distinct row numbers, any order)."""
        rows = np.asarray(rows, np.int64)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        runs = list(zip(np.concatenate(([0], breaks)).tolist(), np.concatenate((breaks, [rows.size])).tolist()))
        for (fd, offset, row), block in zip(self.files, blocks):
            if block is None:
                continue
            block = np.ascontiguousarray(block, dtype=np.float32)
            for a, b in runs:
                data = memoryview(block[a:b]).cast("B")
                pos = offset + int(rows[a]) * row
                while data:
                    done = os.pwrite(fd, data, pos)
                    data, pos = data[done:], pos + done

    def close(self) -> None:
        for fd, _, _ in self.files:
            os.fsync(fd)
            os.close(fd)


def _fill_rows(executor, fn, tasks, rows, paths, progress=None) -> None:
    """Run ``tasks`` (each returning a tuple of row blocks) and write their rows into the ``.npy`` ``paths``.

    ``rows[t]``: the rows of the files that task ``t``'s blocks fill, in block order (any rows: a task may
    take its images in file order and put them back in table order). Nothing of size N x box² is held by
    any process: each result is written where it was computed, then dropped. Every process must make the
    call (MPI).
    """
    writer = _RowWriter(paths)

    def put(item):
        number, blocks = item
        writer.write(rows[number], blocks)
        if progress is not None:
            progress.advance(len(next(b for b in blocks if b is not None)))

    try:
        executor.map_sum(_TaggedRows(fn), enumerate(tasks), on_result=put)
    finally:
        writer.close()
    executor.barrier()


_ONE = np.ones(1)


class _TaggedRows:
    """``fn`` as a :meth:`map_sum` task whose ``extra`` is ``(task number, row blocks)``."""

    def __init__(self, fn):
        self.fn = fn

    def __call__(self, item):
        number, task = item
        return (_ONE,), (number, tuple(self.fn(task)))


def _prepare(run: _Run, stack):
    """Pre-alignment and the working stack on disk (skipped when already finished).

    Returns the working stack as a :class:`~isavar.isac.working.MappedStack` (tasks read their rows from
    ``stack_ali2d.npy``), the pre-alignment shifts and the shrink ratio. The shrunken images live in a
    temporary ``.npy`` in the output directory until the working stack is written.
    """
    from isavar.isac.prealign import centring_shifts, prealign
    from isavar.isac.preprocess import radial_amplitude_sum, shrunk_size, vpp_table
    from isavar.io.stack import file_order_of
    from isavar.isac.working import LazyRows, MappedStack, PickRows

    p, outdir = run.p, run.outdir
    ali_dir = outdir / "2dalignment"
    done = ali_dir / "Finished_initial_2d_alignment.txt"
    box = stack.images.box
    nd = shrunk_size(box, p.shrink)
    shrink_eff = nd / box
    final = outdir / "stack_ali2d.npy"
    if done.exists() and final.exists():
        shifts = np.loadtxt(ali_dir / "initial2Dparams.txt", ndmin=2)[:, 1:3]
        return MappedStack(final), shifts, shrink_eff
    root = run.root
    if root:
        ali_dir.mkdir(parents=True, exist_ok=True)
    log.info("building the working stack: %d images, box %d -> %d -> %d", len(stack.table), box, nd, p.box)
    table = stack.table
    n = len(table)
    apix = stack.pixel_size_A
    rpw = None
    if p.VPP:
        amp = None
        for s, e, block in stack.images.chunks(CHUNK):
            part = radial_amplitude_sum(block)
            amp = part if amp is None else amp + part
        rpw = vpp_table(amp, n)
    if root:
        table_rpw = rpw if rpw is not None else np.zeros(box // 2 + 1)
        write_text_atomic(outdir / "rpw.txt", _fmt_rows(table_rpw, ["%14.6f"]))
    run.progress.stage("preprocessing", total=n)
    shrunk_path = outdir / ".stack_shrunk.work.npy"
    pre_path = outdir / ".stack_prealign.work.npy"
    paths = [shrunk_path] + ([pre_path] if p.VPP else [])
    if root:
        for path in paths:
            _new_npy(path, (n, nd, nd))
    run.executor.barrier()
    step = full_size_chunk(box)
    ranges = [(s, min(n, s + step)) for s in range(0, n, step)]
    # the images are read in file order (each stack once, front to back, even for a shuffled table) and their
    # results written back to their table rows; each image's result depends on that image alone, so the
    # working stack is the same bits as with chunks in table order
    order = file_order_of(stack.images)
    chunks = [order[s:e] for s, e in ranges]
    tasks = (PreprocessChunk(images=PickRows(stack.images, rows), table=table.iloc[rows], params=p,
                             pixel_size_A=apix, rpw=rpw) for rows in chunks)
    _fill_rows(run.executor, _correct_and_shrink_task, tasks, chunks, paths, run.progress)
    shrunk = MappedStack(shrunk_path)
    if p.skip_prealignment:
        shifts = np.zeros((n, 2))
    else:
        t = time.time()
        log.info("pre-alignment (centring) of %d images", n)
        ali, _ = prealign(MappedStack(pre_path) if p.VPP else shrunk, p, run.executor, progress=run.progress)
        shifts = centring_shifts(ali, shrink_eff)
        run.timings["prealign_s"] = time.time() - t
    rows = np.column_stack([np.zeros(n), shifts, np.zeros(n)])
    if root:
        write_params_file(ali_dir / "initial2Dparams.txt", rows)
    run.executor.barrier()
    shifts = np.loadtxt(ali_dir / "initial2Dparams.txt", ndmin=2)[:, 1:3]   # as a resumed run will read them
    work_path = outdir / ".stack_ali2d.work.npy"
    if root:
        _new_npy(work_path, (n, p.box, p.box))
    run.executor.barrier()
    tasks = (FinishChunk(images=LazyRows(shrunk, np.arange(s, e)), shifts=shifts[s:e] * shrink_eff,
                         table=table.iloc[s:e], params=p) for s, e in ranges)
    _fill_rows(run.executor, _finish_task, tasks, [np.arange(s, e) for s, e in ranges], [work_path])
    if not root:
        run.executor.barrier()
        run._tick()
        return MappedStack(final), shifts, shrink_eff
    os.replace(work_path, final)
    for path in paths:
        path.unlink(missing_ok=True)
    lines = ["This file contains the shrink ratio and the particle radius used by ISAC2 (isavar).",
             "Working images were resampled from the input box by the ratio below;",
             "shifts in all_parameters.txt are in working pixels: divide by the ratio for input pixels.",
             f"input box {box}, working box {p.box}, shrunken box {nd}",
             "",
             f"{shrink_eff:.5f}",
             f"{float(p.radius):.5f}",
             ""]
    write_text_atomic(outdir / "README_shrink_ratio.txt", "\n".join(lines))
    _touch(done)
    run.save_manifest(stage="prepared")
    run.executor.barrier()
    run._tick()
    return MappedStack(final), shifts, shrink_eff


# ------------------------------------------------------------------------------------- resume / restart

def _load_or_restart(run: _Run, n_total: int):
    p, outdir = run.p, run.outdir
    ck = outdir / "checkpoints"
    if run.root:
        ck.mkdir(exist_ok=True)
    man = run.load_manifest() or {}
    history = man.get("history", [])
    state_file = ck / "state.npz"
    if p.restart == -1:
        if state_file.exists():
            with np.load(state_file) as d:
                state = isac_run.RunState.from_arrays(dict(d), history)
            log.info("resuming: main %d generation %d", state.main, state.gen)
            return state
        state = isac_run.initial_state(n_total, p)
        if run.root:
            _start_files(run, state)
        return state
    run.executor.barrier()
    ends = sorted(ck.glob("main_*_end.npz"))
    finished_mains = [int(f.name[5:8]) for f in ends]
    if p.restart == 0:
        k = max(finished_mains) if finished_mains else 0
    else:
        k = p.restart
        if k not in finished_mains:
            raise InputError(f"--restart={k}: main iteration {k} has not finished", path=outdir)
    if k == 0:
        state = isac_run.initial_state(n_total, p)
    else:
        with np.load(ck / f"main_{k:03d}_end.npz") as d:
            state = isac_run.RunState.from_arrays(dict(d), [h for h in history if h["main"] <= k])
    run.executor.barrier()
    if run.root:
        for d in sorted(outdir.glob("main[0-9][0-9][0-9]")):
            if int(d.name[4:]) > k:
                shutil.rmtree(d)
        for f in ends:
            if int(f.name[5:8]) > k:
                f.unlink()
        (outdir / "finished").unlink(missing_ok=True)
        for name in ("ordered_class_averages.hdf", "chains_params.txt"):
            (outdir / name).unlink(missing_ok=True)
        _save_npz_atomic(state_file, state.to_arrays())
        _rewrite_global_files(run, state)
        _start_files(run, state)
    run.executor.barrier()
    log.info("restart: continuing after main iteration %d", k)
    return state


def _start_files(run, state):
    main_dir = run.outdir / f"main{state.main:03d}" / "generation000"
    main_dir.mkdir(parents=True, exist_ok=True)
    if state.gen == 1:
        write_index_file(main_dir / f"to_process_next_{state.main:03d}_000.txt", state.subset)
    write_params_file(run.outdir / "all_parameters.txt", state.params)


def _rewrite_global_files(run, state):
    write_params_file(run.outdir / "all_parameters.txt", state.params)
    write_index_file(run.outdir / "processed_images.txt", state.processed)
    _write_hdf_averages(run.outdir / "class_averages.hdf", state.averages, state.members, None)


# ------------------------------------------------------------------------------------- per-generation files

def _write_generation_files(run: _Run, state, event: isac_run.GenerationFinished) -> None:
    outdir = run.outdir
    main, gen = event.main, event.gen
    gdir = outdir / f"main{main:03d}" / f"generation{gen:03d}"
    gdir.mkdir(parents=True, exist_ok=True)
    eng = event.result
    subset = event.subset
    tag = f"{main:03d}_{gen:03d}"
    local = [np.asarray(m, np.int64) for m in eng.members]
    _write_hdf_averages(gdir / f"original_class_averages_{tag}.hdf", eng.refs, local, None)
    _write_hdf_averages(gdir / f"class_averages_{tag}.hdf", eng.refs, [np.sort(subset[m]) for m in local], None)
    good = event.good
    if good:
        _write_hdf_averages(gdir / f"good_class_averages_{tag}.hdf", eng.refs[good],
                            [np.sort(subset[local[k]]) for k in good], None)
    if event.bad.size:
        write_index_file(gdir / f"to_process_next_{tag}.txt", event.bad)
    _rewrite_global_files(run, state)
    if event.end_main:
        _touch(gdir / "finished")
    if not event.end_main:
        nxt = outdir / f"main{main:03d}" / f"generation{gen + 1:03d}"
        nxt.mkdir(parents=True, exist_ok=True)


def _write_text_lists(run: _Run, state, event: isac_run.GenerationFinished) -> None:
    outdir = run.outdir
    main = event.main
    mdir = outdir / f"main{main:03d}"
    write_index_file(outdir / "not_processed_images.txt", event.not_processed)
    for name in ("processed_images.txt", "not_processed_images.txt", "class_averages.hdf"):
        if (outdir / name).exists():
            shutil.copyfile(outdir / name, mdir / name)
    _touch(mdir / "finished")
    if not state.finished:
        _start_files(run, state)


# ------------------------------------------------------------------------------------- final outputs

def _finish(run: _Run, stack, state, shifts, shrink):
    from isavar.isac.averages import fullres_averages
    from isavar.isac.ordering import apply_order, order_averages

    p, outdir = run.p, run.outdir
    apix = stack.pixel_size_A
    work_apix = apix / shrink if apix else None
    c = len(state.averages)
    t = time.time()
    if c and not p.skip_ordering:
        order, oparams = order_averages(np.stack(state.averages), p, run.executor)
    else:
        order, oparams = np.arange(c), np.zeros((c, 4))
    run.timings["ordering_s"] = time.time() - t
    result = isac_run.result_from_state(state, shifts, shrink, order=None if p.skip_ordering else order,
                                        order_params=None if p.skip_ordering else oparams)
    # full-parameter bookkeeping for the original images
    full = original_image_params(state.params, shifts, shrink)
    class_rank = np.full(c, -1, np.int64)
    class_rank[order] = np.arange(c)
    full_ordered = full.copy()
    cls_of = result.class_of(state.n_total)
    acc = cls_of >= 0
    if c:
        from isavar.isac._ops import compose

        full_ordered[acc] = compose(full[acc], oparams[cls_of[acc]])
    t = time.time()
    # every process sums the members it reads (exact sums: the same bits on any executor)
    fullres = fullres_averages(stack, result, full_ordered, p, chunk=full_size_chunk(stack.images.box),
                               executor=run.executor) if c else None
    run.timings["fullres_s"] = time.time() - t
    if not executor_root(run):
        return result
    if c and not p.skip_ordering:
        ordered = apply_order(np.stack(state.averages), order, oparams)
        _write_hdf_averages(outdir / "ordered_class_averages.hdf", ordered, [state.members[k] for k in order],
                            work_apix)
        rows = [(i, int(k), oparams[k, 0], 0.0, 0.0, int(oparams[k, 3])) for i, k in enumerate(order)]
        write_text_atomic(outdir / "chains_params.txt",
                          "".join(f"{a:12d} {b:12d} {al:14.6f} {x:14.6f} {y:14.6f} {m:12d}\n"
                                  for a, b, al, x, y, m in rows))
    else:
        ordered = np.stack(state.averages) if c else np.zeros((0, p.box, p.box), np.float32)
    _write_hdf_averages(outdir / "class_averages.hdf", state.averages, state.members, work_apix)
    write_params_file(outdir / "all_parameters.txt", state.params)
    write_index_file(outdir / "processed_images.txt", state.processed)
    write_index_file(outdir / "not_processed_images.txt",
                     np.setdiff1d(np.arange(state.n_total), state.processed))
    _write_relion_outputs(run, stack, state, result, ordered, order, class_rank, full_ordered, fullres, work_apix)
    if getattr(run, "write_aligned", False) and c:
        t = time.time()
        write_aligned_particles(run.outdir / "aligned_particles.star", stack, full_ordered, class_rank, cls_of,
                                project_dir=getattr(run, "project_dir", None))
        run.timings["aligned_s"] = time.time() - t
    if c:
        from isavar.report.montage import save_montage

        save_montage(outdir / "class_averages.png", ordered,
                     [f"#{i + 1}: {len(state.members[k])}" for i, k in enumerate(order)],
                     title=f"ISAC2: {c} classes, {len(state.processed)} of {state.n_total} particles")
    summary = {
        "particles_in": int(state.n_total), "particles_accounted": int(len(state.processed)),
        "classes": int(c), "seed": int(p.rand_seed),
        "working_pixel_size_A": work_apix, "shrink": float(shrink),
        "per_class": [{"class": i + 1, "source_index": int(k), "members": int(len(state.members[k])),
                       "pixel_error_working_px": float(state.pixel_errors[k]),
                       "pixel_error_A": float(state.pixel_errors[k] * work_apix) if work_apix else None,
                       "main": int(state.origin[k][0]), "generation": int(state.origin[k][1])}
                      for i, k in enumerate(order)],
        "generations": state.history,
    }
    write_json(outdir / "summary.json", summary)
    # run times go with the other facts of this particular run, so that summary.json depends on the data only
    write_provenance(outdir, command="isac2", parameters=p.to_dict(), seed=p.rand_seed, executor=run.executor,
                     extra={"input": input_fingerprint(run.stack_path, stack), "timings_s": run.timings})
    _touch(outdir / "finished")
    run.save_manifest(stage="finished")
    return result


def executor_root(run) -> bool:
    return run.executor.is_root()


def original_image_params(params, shifts, shrink) -> np.ndarray:
    """Parameters for the original images: pre-alignment shift then ISAC parameters at the input scale.

    ``P = compose((0, sx0, sy0, 0), (alpha, sx / shrink, sy / shrink, m))`` (spec §8.3); rows of
    unaccounted images (mirror -1) get the pre-alignment shift only.
    """
    from isavar.isac._ops import compose

    params = np.asarray(params, np.float64)
    n = len(params)
    pre = np.column_stack([np.zeros(n), shifts[:, 0], shifts[:, 1], np.zeros(n)])
    isac = params.copy()
    isac[:, 1:3] /= shrink
    bad = isac[:, 3] < 0
    isac[bad] = 0.0
    return compose(pre, isac)


def _image_name_in(path: Path, image: Path, project_dir) -> str:
    """How a STAR file at ``path`` names ``image``: relative to ``project_dir`` when given, else to its folder."""
    from isavar.io.star import stack_name_for

    if project_dir is None:
        return os.path.relpath(image, path.parent)
    return stack_name_for(image, project_dir)


def _write_relion_outputs(run, stack, state, result, ordered, order, class_rank, full, fullres, work_apix):
    from isavar.conventions import format_image_name
    from isavar.io import write_image_stack

    outdir = run.outdir
    project_dir = getattr(run, "project_dir", None)
    apix = stack.pixel_size_A or 1.0
    c = len(state.members)
    if c:
        write_image_stack(outdir / "class_averages.mrcs", ordered, work_apix, overwrite=True)
        if fullres is not None:
            write_image_stack(outdir / "class_averages_fullres.mrcs", fullres[order], apix, overwrite=True)
    else:
        for name in ("class_averages.mrcs", "class_averages_fullres.mrcs", "class_averages_fullres.star"):
            (outdir / name).unlink(missing_ok=True)
    n_acc = max(len(state.processed), 1)
    errors = np.array([float(state.pixel_errors[k]) for k in order])

    def classes(stack_name, pixel):
        return pd.DataFrame({
            "rlnReferenceImage": [format_image_name(i, _image_name_in(outdir / "x.star", outdir / stack_name,
                                                                      project_dir)) for i in range(c)],
            "rlnClassNumber": np.arange(1, c + 1),
            "rlnClassDistribution": [len(state.members[k]) / n_acc for k in order],
            "isavarMemberCount": [len(state.members[k]) for k in order],
            # ISAC2's stability measure lives on the working (shrunk) grid: both units, named
            "isavarPixelErrorWorkingPx": errors,
            "isavarPixelErrorAngst": errors * (work_apix if work_apix else np.nan),
            "isavarImagePixelSize": np.full(c, float(pixel) if pixel else np.nan),
        })

    _write_star_atomic(outdir / "class_averages.star", {"model_classes": classes("class_averages.mrcs", work_apix)})
    if c and fullres is not None:
        # the full-size averages at the input pixel size: what relion_refine --ref needs
        _write_star_atomic(outdir / "class_averages_fullres.star",
                           {"model_classes": classes("class_averages_fullres.mrcs", apix)})
    original = stack.table.reset_index(drop=True).copy()
    if "pixel_size_A" not in original.columns or original["pixel_size_A"].isna().any():
        original["pixel_size_A"] = apix
    cls_of = result.class_of(state.n_total)
    acc = cls_of >= 0
    table = _accounted_columns(original, full, np.where(acc, class_rank[np.maximum(cls_of, 0)] + 1, 0)
                               if c else np.zeros(len(original), np.int64), apix)
    # accounted: the ISAC2 class and 2D alignment; unaccounted: the input rows unchanged
    _write_particle_star(outdir / "particles.star", table[acc], stack, np.flatnonzero(acc), project_dir)
    _write_particle_star(outdir / "unaccounted_particles.star", original[~acc], stack, np.flatnonzero(~acc),
                         project_dir)


#: Columns that the accounted particles' table replaces; input values are kept as ``input_<name>``.
_REPLACED_COLUMNS = ("class_number", "align_alpha_deg", "align_sx_px", "align_sy_px", "align_mirror",
                     "angle_rot_deg", "angle_tilt_deg", "angle_psi_deg", "origin_x_A", "origin_y_A")


def _accounted_columns(original, full, class_number, apix):
    """The input table with ISAC2's class and 2D alignment (RELION convention) for every row.

    Parameters
    ----------
    original : pandas.DataFrame
        Input particle table (canonical column names), one row per input image.
    full : ndarray, (n, 4)
        2D alignment ``[alpha, sx, sy, mirror]`` of each image at the original pixel size (mirror -1 when
        unaccounted).
    class_number : ndarray of int, (n,)
        1-based class in the order of the ordered averages (0 when unaccounted).
    apix : float
        Original pixel size (Å).

    Returns
    -------
    pandas.DataFrame
        Input columns that this table replaces are kept as ``input_<name>`` (the 3D pose, a previous class
        or 2D alignment) unless the input already has that ``input_<name>`` (a table written by an earlier
        run keeps its first input's values); ``angle_rot_deg`` is dropped, since a 2D alignment has no
        rotation about the viewing axis other than psi.
    """
    from isavar.conventions import align2d_to_relion

    table = original.copy()
    for col in _REPLACED_COLUMNS:
        if col in table.columns and f"input_{col}" not in table.columns:     # an earlier run's are kept
            table[f"input_{col}"] = table[col]
    table = table.drop(columns="angle_rot_deg", errors="ignore")
    mirror = np.clip(full[:, 3], 0, 1)
    psi, tilt, ox, oy = align2d_to_relion(full[:, 0], full[:, 1], full[:, 2], mirror)
    table["class_number"] = class_number
    table["align_alpha_deg"] = full[:, 0]
    table["align_sx_px"] = full[:, 1]
    table["align_sy_px"] = full[:, 2]
    table["align_mirror"] = mirror.astype(np.int64)
    table["angle_psi_deg"] = psi
    table["angle_tilt_deg"] = tilt
    table["origin_x_A"] = ox * apix
    table["origin_y_A"] = oy * apix
    return table


def _write_particle_star(path, sub, stack, rows, project_dir=None):
    """A RELION 3.1 STAR referring to the original images when they are MRC stacks (named relative to
    ``project_dir`` when given, else to the STAR's folder)."""
    from isavar.conventions import format_image_name
    from isavar.io import write_particles
    from isavar.io.star import build_star_blocks

    path = Path(path)
    paths = sub["image_path"].astype(str).tolist() if "image_path" in sub.columns else []
    mrc_ok = paths and all(str(x).lower().endswith((".mrcs", ".mrc")) for x in paths)
    sidecar = path.with_suffix(".mrcs")
    if mrc_ok or not len(sub):           # refer to the original images, or none: a header-only file
        blocks = build_star_blocks(sub, "x", stack.images.box)
        if mrc_ok:
            blocks["particles"]["rlnImageName"] = [
                format_image_name(int(ii), _image_name_in(path, Path(ip), project_dir))
                for ip, ii in zip(paths, sub["image_index"].astype(int))]
        else:
            sidecar.unlink(missing_ok=True)
        _write_star_atomic(path, blocks)
        return
    path.unlink(missing_ok=True)
    sidecar.unlink(missing_ok=True)
    rows = np.asarray(rows)
    step = full_size_chunk(stack.images.box)
    chunks = (stack.images[rows[s:s + step]] for s in range(0, len(rows), step))
    write_particles(path, chunks, sub, pixel_size_A=stack.pixel_size_A, project_dir=project_dir)


def write_aligned_particles(path, stack, params, class_rank, cls_of, *, project_dir=None) -> int:
    """Write every accounted particle aligned into its class frame, mirror applied, with its STAR file.

    RELION's 2D tools (``relion_stack_create --apply_transformation``, Class2D)
    ignore ``rlnAngleTilt`` and cryoSPARC's ``alignments2D`` has no mirror, so
    the mirrored half of an ISAC2 alignment cannot be reused through pose
    columns; these images carry it in their pixels instead.

    Parameters
    ----------
    path : path
        Output ``.star``; the images go to ``<stem>.mrcs`` beside it.
    stack : ParticleStack
        The input particles.
    params : ndarray, (N, 4)
        ``(alpha, sx, sy, mirror)`` taking each original image into the frame of
        its (ordered) class average, original pixels.
    class_rank : ndarray of int, (C,)
        Position of each class in the ordered averages.
    cls_of : ndarray of int, (N,)
        Class (acceptance order) of each particle, -1 when unaccounted.
    project_dir : path, optional
        Name the stack relative to this RELION project directory.

    Returns
    -------
    int
        Particles written. Each row keeps the input columns (the input pose as
        ``input_*``), has ``rlnClassNumber``, zero ``rlnAnglePsi``/``Tilt`` and
        origins, the applied alignment in ``rlnIsavar_align_*`` (mirror
        included) and the source image in ``rlnImageOriginalName``.
    """
    from isavar.conventions import format_image_name
    from isavar.io import write_particles
    from isavar.isac._ops import transform

    rows = np.flatnonzero(np.asarray(cls_of) >= 0)
    original = stack.table.reset_index(drop=True)
    table = _accounted_columns(original, np.asarray(params, np.float64), np.zeros(len(original), np.int64),
                               stack.pixel_size_A or 1.0).iloc[rows].reset_index(drop=True)
    table["class_number"] = class_rank[np.asarray(cls_of)[rows]] + 1
    table["angle_psi_deg"], table["angle_tilt_deg"] = 0.0, 0.0
    table["origin_x_A"], table["origin_y_A"] = 0.0, 0.0
    if "image_path" in table.columns and "image_index" in table.columns:
        table["rlnImageOriginalName"] = [format_image_name(int(i), _image_name_in(Path(path), Path(p), project_dir))
                                         for p, i in zip(table["image_path"], table["image_index"])]
    prm = np.asarray(params, np.float64)[rows]

    def chunks():
        step = full_size_chunk(stack.images.box)
        for s in range(0, len(rows), step):
            yield transform(stack.images[rows[s:s + step]], prm[s:s + step], interpolation="fourier")

    path = Path(path)
    path.unlink(missing_ok=True)
    path.with_suffix(".mrcs").unlink(missing_ok=True)
    write_particles(path, chunks(), table, pixel_size_A=stack.pixel_size_A or 1.0, project_dir=project_dir)
    return len(rows)


def _write_star_atomic(path, blocks):
    from isavar.io.star import write_star_blocks

    write_star_blocks(path, blocks, float_format="%.6f")
