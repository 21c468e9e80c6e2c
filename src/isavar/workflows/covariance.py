"""3D variability analysis (``isavar 3dva``): particle file in, output directory out; and its split command.

Output directory (must not exist; nothing is created when the input is rejected)
------------------------------------------------------------------------------
==================================  ======================================================
``var3D.mrc``                       standard-deviation map ``sqrt(sum_k V_k^2)`` (density
                                    units of the background-normalised images: noise
                                    standard deviation 1, as ``3dvariability``'s var3D)
``mean.mrc``                        the mean volume ``mu``
``component_NN.mrc``                ``V_k`` (latents of unit variance), by eigenvalue
``mask.mrc``                        the mask applied to the components
``particles.star``, ``particles.cs``  every input column plus ``latent_1..K``
                                    (STAR ``rlnIsavar_latent_k``); images referenced in
                                    place when they are MRC stacks
``series/component_K_frame_NN.mrc``  ``mu + t V_k``, ``t`` from the 5th to the 95th
                                    percentile of latent k (ChimeraX "vseries")
``var3D_slices.png``                central slices of var3D beside the mean
``components.png``                  slices of each component through its largest voxel
``latents.png``                     latent histograms and the latent 1-2 scatter
``summary.json``                    eigenvalues, noise eigenvalues, half-set figures, history
``log.txt``, ``provenance.json``
``checkpoint.npz``                  EM state after the last completed iteration, while the
                                    run is going (``--resume`` continues from it); removed
                                    when the run finishes
==================================  ======================================================
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd

from isavar._logging import run_log
from isavar._progress import NullProgress
from isavar.errors import InputError
from isavar.workflows.outputs import create_output_dir, remove_run_directory, write_json, write_provenance

log = logging.getLogger(__name__)

#: Frames of each volume series.
SERIES_FRAMES = 10


def _read_map(path, box: int, what: str) -> np.ndarray:
    from isavar.io import read_volume

    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} not found", path=path)
    try:
        vol, _ = read_volume(path)
    except Exception as exc:  # unreadable map: one clear line
        raise InputError(f"cannot read {what} ({exc})", path=path) from exc
    vol = np.asarray(vol, np.float32)
    if vol.shape != (box, box, box):
        raise InputError(f"{what} has shape {vol.shape}, the particles need ({box}, {box}, {box})", path=path)
    if not np.all(np.isfinite(vol)):
        raise InputError(f"{what} contains NaN or Inf", path=path)
    return vol


#: Checkpoint written after every EM iteration that continues (removed when the run finishes).
CHECKPOINT = "checkpoint.npz"


def _save_checkpoint(outdir: Path, params, state: dict) -> None:
    """Write the EM state atomically (``checkpoint.npz``; parameters and history as JSON)."""
    import json

    arrays = {key: np.asarray(state[key]) for key in ("mean", "components", "sigma2", "mask")}
    if state.get("high") is not None:
        arrays["high"] = np.asarray(state["high"])
    meta = {"params": params.to_dict(), "iteration": state["iteration"], "band_radius_px": state["band_radius_px"],
            "mean_free": state["mean_free"], "history": state["history"], "timings": state["timings"]}
    tmp = outdir / f".{CHECKPOINT}.tmp.npz"
    np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)
    os.replace(tmp, outdir / CHECKPOINT)


def _load_checkpoint(outdir: Path, params) -> dict:
    """The state of an interrupted run in ``outdir`` (parameters must match)."""
    import json

    path = outdir / CHECKPOINT
    if not path.exists():
        raise InputError(f"--resume: no {CHECKPOINT} (the run finished or never completed an iteration)", path=outdir)
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
        state = {key: data[key] for key in data.files if key != "meta"}
    if meta["params"] != json.loads(json.dumps(params.to_dict())):
        raise InputError("--resume: the parameters differ from those of the interrupted run", path=outdir)
    state.update({key: meta[key] for key in ("iteration", "band_radius_px", "mean_free", "history", "timings")})
    state.setdefault("high", None)
    return state


def run_3dva(stack_path, outdir, params, *, executor=None, progress=None, mask_path=None, mean_path=None,
             resume: bool = False, pixel_size_A: float | None = None, project_dir=None):
    """Run the covariance (PPCA) 3D variability analysis and write the output directory.

    Parameters
    ----------
    stack_path : path-like
        Particles with 3D orientations (.star, .hdf, .cs).
    outdir : path-like
        Output directory; must not exist.
    params : isavar.covariance.CovarianceParams
        Settings.
    executor : Executor, optional
        Default serial.
    progress : Progress, optional
        Progress reporter.
    mask_path, mean_path : path-like, optional
        A mask for the components (values in [0, 1]) and a fixed mean volume.
    resume : bool
        Continue the interrupted run in ``outdir`` (same input and parameters) from its
        last checkpoint; the result equals that of an uninterrupted run.
    pixel_size_A : float, optional
        Pixel size replacing the file's (``--apix``).
    project_dir : path-like, optional
        RELION project directory: relative image names are read from it first, and
        ``particles.star`` names the images relative to it (default: relative to
        ``outdir``).

    Returns
    -------
    isavar.covariance.CovarianceResult

    Raises
    ------
    InputError
        Unreadable input, missing orientations or CTF parameters, bad maps, existing
        output directory, invalid options; nothing is written in these cases.
    """
    from isavar.parallel.serial import SerialExecutor
    from isavar.variability.params import normalise_symmetry
    from isavar.variability.run import particle_geometry
    from isavar.workflows.variability import _read_input

    executor = executor or SerialExecutor()
    progress = progress or NullProgress()
    stack_path, outdir = Path(stack_path), Path(outdir)
    if outdir.exists() and not resume:
        raise InputError("output directory already exists (choose a new name, or --resume an interrupted run)",
                         path=outdir)
    if resume and not outdir.is_dir():
        raise InputError("--resume: no such output directory", path=outdir)
    if params.n_components < 1:
        raise InputError(f"--components must be at least 1 (got {params.n_components})")
    if params.iterations < 1:
        raise InputError(f"--iterations must be at least 1 (got {params.iterations})")
    if params.lowpass_fl < 0 or params.lowpass_fl > 0.5 or (params.lowpass_fl > 0 and params.lowpass_aa <= 0):
        raise InputError("--fl must be in (0, 0.5] cycles/pixel with --aa > 0 (or --fl 0 for no low-pass)")
    try:
        symmetry = normalise_symmetry(params.symmetry)
    except ValueError as exc:
        raise InputError(str(exc)) from exc
    params = params.__class__(**{**params.to_dict(), "symmetry": symmetry})
    stack, pixel = _read_input(stack_path, pixel_size_A, project_dir)
    table, images = stack.table, stack.images
    n, box = len(images), int(images.shape[-1])
    if n < 2 * params.n_components + 2:
        raise InputError(f"{n} particles are too few for {params.n_components} components", path=stack_path)
    geo = particle_geometry(table, pixel, need_ctf=params.ctf, source=stack_path)
    mask = _read_map(mask_path, box, "mask") if mask_path else None
    if mask is not None and (mask.min() < -1e-3 or mask.max() > 1 + 1e-3 or mask.max() <= 0):
        raise InputError("mask values must lie in [0, 1] with some voxels > 0", path=mask_path)
    mean = _read_map(mean_path, box, "mean map") if mean_path else None
    state = _load_checkpoint(outdir, params) if resume else None
    executor.barrier()            # every rank has checked that the directory did not exist before the root makes it
    if executor.is_root() and not resume:
        create_output_dir(outdir, must_not_exist=True)
    executor.barrier()

    def checkpoint(st):
        if executor.is_root():
            _save_checkpoint(outdir, params, st)

    try:
        with run_log(outdir / "log.txt", enabled=executor.is_root()) as run_log_file:
            try:
                result = _analyse(stack_path, outdir, params, executor, progress, table, images, stack, pixel, geo,
                                  mask, mean, state, checkpoint, resume, project_dir)
            except InputError as exc:         # bad data found while reading (NaN pixels): a new run leaves nothing
                if resume or not executor.is_root():
                    raise
                run_log_file.detach()
                remove_run_directory(outdir, created=True)
                raise InputError(f"{exc} (nothing was kept in {outdir})") from None
    finally:
        close = getattr(stack, "close", None)
        if close is not None:
            close()
    return result


def _analyse(stack_path, outdir, params, executor, progress, table, images, stack, pixel, geo, mask, mean, state,
             checkpoint, resume, project_dir):
    """The EM fit and, on the root process, the outputs (``run_3dva`` after its checks)."""
    from isavar.covariance import covariance

    n, box = len(images), int(images.shape[-1])
    log.info("isavar 3dva: %s -> %s", stack_path, outdir)
    log.info("parameters: %s", params.to_dict())
    result = covariance(table, images, params, geometry=geo, pixel_size_A=pixel, executor=executor,
                        progress=progress, mask=mask, mean=mean, checkpoint=checkpoint, state=state)
    if executor.is_root():
        t0 = time.perf_counter()
        files = write_outputs(outdir, result, table, stack, pixel, params, overwrite=resume,
                              project_dir=project_dir)
        result.timings_s["writing"] = time.perf_counter() - t0
        summary = {"input": str(stack_path), "n_particles": n, "box": box, "pixel_size_A": pixel,
                   "parameters": params.to_dict(), "files": sorted(files),
                   "var3d_scale": "standard deviation of the density, units of the background-normalised "
                                  "images (noise standard deviation 1), as 3dvariability's var3D"}
        summary.update(result.summary())
        write_json(outdir / "summary.json", summary)
        write_provenance(outdir, command="3dva", parameters=params.to_dict(), seed=params.seed,
                         executor=executor, extra={"input": str(stack_path), "n_particles": n, "box": box})
        log.info("eigenvalues %s; above the noise level: %s", ", ".join(f"{x:.4g}" for x in result.eigenvalues),
                 summary["above_noise"])
        log.info("outputs in %s: %s", outdir, ", ".join(sorted(files)))
        (outdir / CHECKPOINT).unlink(missing_ok=True)
    return result


def latent_columns(k: int) -> list[str]:
    """Table columns of the latent coordinates (STAR ``rlnIsavar_latent_k``, .cs ``latent_k``)."""
    return [f"latent_{i + 1}" for i in range(k)]


def write_outputs(outdir: Path, result, table: pd.DataFrame, stack, pixel: float, params, *,
                  overwrite: bool = False, project_dir=None) -> list[str]:
    """Write maps, tables, series and figures of a finished analysis; returns the file names.

    ``overwrite`` (a resumed run) replaces files an interrupted writing step left behind.
    """
    import functools

    from isavar.io import write_volume as _write_volume

    write_volume = functools.partial(_write_volume, overwrite=overwrite)

    files = []
    write_volume(outdir / "var3D.mrc", result.var3d, pixel)
    write_volume(outdir / "mean.mrc", result.mean, pixel)
    write_volume(outdir / "mask.mrc", result.mask, pixel)
    files += ["var3D.mrc", "mean.mrc", "mask.mrc"]
    k = result.components.shape[0]
    for i in range(k):
        name = f"component_{i + 1:02d}.mrc"
        write_volume(outdir / name, result.components[i], pixel)
        files.append(name)
    out = table.copy()
    for i, col in enumerate(latent_columns(k)):
        out[col] = result.latents[:, i]
    files += write_particle_tables(outdir, "particles", out, stack, project_dir)
    (outdir / "series").mkdir(exist_ok=overwrite)
    for i in range(k):
        lo, hi = np.percentile(result.latents[:, i], [5, 95])
        for f, t in enumerate(np.linspace(lo, hi, SERIES_FRAMES)):
            name = f"series/component_{i + 1}_frame_{f:02d}.mrc"
            write_volume(outdir / name, result.mean + np.float32(t) * result.components[i], pixel)
            files.append(name)
    try:
        files += _figures(outdir, result, pixel)
    except ImportError as exc:  # matplotlib missing: the figures are optional
        log.warning("figures not written (%s)", exc)
    return files


def write_particle_tables(outdir: Path, stem: str, table: pd.DataFrame, stack, project_dir=None) -> list[str]:
    """``<stem>.star`` and ``<stem>.cs`` with every column of ``table``, images referenced in place.

    When the images are not all MRC stacks (e.g. EMAN2 HDF), a ``<stem>.mrcs`` copy is written
    for the STAR file and the ``.cs`` file refers to it. The STAR file names images relative to
    ``project_dir`` (RELION's project directory) when given, else relative to ``outdir``; the
    ``.cs`` file relative to ``outdir``.
    """
    from isavar.conventions import format_image_name
    from isavar.io import write_particles
    from isavar.io.cryosparc import build_cs_array
    from isavar.io.star import build_star_blocks, stack_name_for, write_star_blocks

    box = int(stack.images.shape[-1])
    star, cs = outdir / f"{stem}.star", outdir / f"{stem}.cs"
    paths = table["image_path"].astype(str).tolist() if "image_path" in table.columns else []
    in_place = bool(paths) and all(p.lower().endswith((".mrcs", ".mrc")) for p in paths)
    files = [star.name, cs.name]
    if in_place:
        rel = [os.path.relpath(p, outdir) for p in paths]
        names = rel if project_dir is None else [stack_name_for(p, project_dir) for p in paths]
        idx = table["image_index"].astype(int).to_numpy()
        blocks = build_star_blocks(table, "x", box)
        blocks["particles"]["rlnImageName"] = [format_image_name(int(i), p) for p, i in zip(names, idx)]
        write_star_blocks(star, blocks)
        array = _with_blob_paths(build_cs_array(table, "x", box, rng=np.random.default_rng(0)), rel)
        array["blob/idx"] = idx
    else:
        rows = np.arange(len(table))
        chunks = (stack.images[rows[s:s + 256]] for s in range(0, len(rows), 256))
        write_particles(star, chunks, table, pixel_size_A=stack.pixel_size_A, project_dir=project_dir)
        array = build_cs_array(table, f"{stem}.mrcs", box, rng=np.random.default_rng(0))
        files.append(f"{stem}.mrcs")
    with open(cs, "wb") as fh:
        np.save(fh, array, allow_pickle=False)
    return files


def _with_blob_paths(array: np.ndarray, paths: list[str]) -> np.ndarray:
    """Copy of a structured array whose ``blob/path`` field is wide enough for ``paths``."""
    width = max(len(p.encode()) for p in paths)
    dtype = [(name, f"S{width}" if name == "blob/path" else array.dtype[name].base, array.dtype[name].shape)
             for name in array.dtype.names]
    out = np.zeros(array.shape, dtype=dtype)
    for name in array.dtype.names:
        out[name] = array[name] if name != "blob/path" else [p.encode() for p in paths]
    return out


def _figures(outdir: Path, result, pixel: float) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from isavar.report.slices import save_variability_slices

    files = []
    save_variability_slices(outdir / "var3D_slices.png", result.var3d, result.mean, pixel_size_A=pixel,
                            title="3dva: var3D (standard deviation) and mean")
    files.append("var3D_slices.png")
    k = result.components.shape[0]
    fig, axes = plt.subplots(k, 3, figsize=(7.5, 2.5 * k), squeeze=False)
    for i in range(k):
        comp = result.components[i]
        z0, y0, x0 = np.unravel_index(int(np.argmax(np.abs(comp))), comp.shape)
        for j, sl in enumerate((comp[z0], comp[:, y0, :], comp[:, :, x0])):  # through the largest voxel
            lim = float(np.abs(result.components[i]).max()) or 1.0
            axes[i, j].imshow(sl, cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower")
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            plane = ("xy z=%d" % z0, "xz y=%d" % y0, "yz x=%d" % x0)[j]
            axes[i, j].set_title(f"component {i + 1} ({plane}), eig {result.eigenvalues[i]:.3g}", fontsize=7)
    fig.tight_layout()
    fig.savefig(outdir / "components.png", dpi=100)
    plt.close(fig)
    files.append("components.png")
    ncol = k + (1 if k > 1 else 0)
    fig, axes = plt.subplots(1, ncol, figsize=(3 * ncol, 2.8), squeeze=False)
    for i in range(k):
        axes[0, i].hist(result.latents[:, i], bins=60, color="0.3")
        axes[0, i].set_title(f"latent {i + 1}", fontsize=8)
    if k > 1:
        axes[0, k].scatter(result.latents[:, 0], result.latents[:, 1], s=2, alpha=0.4)
        axes[0, k].set_xlabel("latent 1")
        axes[0, k].set_ylabel("latent 2")
    fig.tight_layout()
    fig.savefig(outdir / "latents.png", dpi=100)
    plt.close(fig)
    files.append("latents.png")
    return files


# --------------------------------------------------------------------------------------
# Split by latent coordinate
# --------------------------------------------------------------------------------------


def split_labels(latents: np.ndarray, *, component: int = 1, thresholds=None, kmeans: int = 0,
                 seed: int = 0) -> np.ndarray:
    """Subset label of each particle from its latent coordinates.

    Parameters
    ----------
    latents : numpy.ndarray
        ``(n, K)`` latent coordinates.
    component : int
        1-based component whose latent is thresholded.
    thresholds : sequence of float, optional
        Cut points on that latent: label ``j`` = number of thresholds below the value.
    kmeans : int
        Instead: k-means with this many clusters on all ``K`` latents (deterministic
        for a seed); labels sorted by the cluster mean of latent ``component``.
    seed : int
        Seed of the k-means initialisation.

    Returns
    -------
    numpy.ndarray
        ``(n,)`` int labels from 0.
    """
    z = np.asarray(latents, np.float64)
    if not 1 <= component <= z.shape[1]:
        raise InputError(f"--component must be between 1 and {z.shape[1]}")
    if kmeans:
        from scipy.cluster.vq import kmeans2

        rng = np.random.default_rng(seed)
        _, lab = kmeans2(z, int(kmeans), minit="++", seed=rng)
        order = np.argsort([z[lab == c, component - 1].mean() if np.any(lab == c) else np.inf
                            for c in range(int(kmeans))])
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        return rank[lab]
    cuts = np.sort(np.asarray(thresholds if thresholds is not None else [0.0], np.float64))
    return np.searchsorted(cuts, z[:, component - 1], side="right")


def run_split(outdir, *, component: int = 1, thresholds=None, kmeans: int = 0, seed: int = 0,
              project_dir=None) -> list[Path]:
    """Split ``OUTDIR/particles.star`` of a 3dva run into subsets by latent coordinate.

    Writes ``OUTDIR/split_<how>/subset_NN.star`` and ``.cs`` (images referenced in place)
    and ``split.json`` (counts, rule); the STAR files name images relative to ``project_dir``
    when given (else to their own folder). Returns the STAR files written.
    """
    from isavar.io import read_particles

    outdir = Path(outdir)
    star = outdir / "particles.star"
    if not star.exists():
        raise InputError("no particles.star: not a 3dva output directory", path=outdir)
    stack = read_particles(star, project_dir=project_dir)
    table = stack.table
    cols = [c for c in table.columns if c.startswith("latent_")]
    if not cols:
        raise InputError("particles.star has no latent columns (rlnIsavar_latent_k)", path=star)
    cols.sort(key=lambda c: int(c.split("_")[1]))
    z = table[cols].to_numpy(np.float64)
    labels = split_labels(z, component=component, thresholds=thresholds, kmeans=kmeans, seed=seed)
    how = f"kmeans{kmeans}" if kmeans else f"c{component}_t" + "_".join(f"{t:g}" for t in (thresholds or [0.0]))
    dest = outdir / f"split_{how}"
    if dest.exists():
        raise InputError("split directory exists already (remove it to split again)", path=dest)
    dest.mkdir()
    written = []
    counts = {}
    try:
        for lab in range(int(labels.max()) + 1):
            rows = np.flatnonzero(labels == lab)
            counts[f"subset_{lab + 1:02d}"] = int(rows.size)
            if not rows.size:
                continue
            sub = table.iloc[rows].reset_index(drop=True)
            write_particle_tables(dest, f"subset_{lab + 1:02d}", sub, _SubStack(stack, rows), project_dir)
            written.append(dest / f"subset_{lab + 1:02d}.star")
    finally:
        close = getattr(stack, "close", None)
        if close is not None:
            close()
    write_json(dest / "split.json", {"component": component, "thresholds": thresholds, "kmeans": kmeans,
                                     "seed": seed, "counts": counts})
    log.info("split %d particles into %s in %s", len(table), counts, dest)
    return written


class _SubStack:
    """Rows of a particle stack, for writing a subset."""

    def __init__(self, stack, rows):
        self.images = _SubImages(stack.images, rows)
        self.pixel_size_A = stack.pixel_size_A


class _SubImages:
    def __init__(self, images, rows):
        self._images, self._rows = images, np.asarray(rows)
        self.shape = (len(self._rows),) + tuple(images.shape[1:])

    def __len__(self):
        return len(self._rows)

    def __getitem__(self, index):
        return self._images[self._rows[index]]
