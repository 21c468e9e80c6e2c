"""Convert particle stacks or volumes between RELION STAR, MRCS, EMAN2/SPHIRE HDF and cryoSPARC .cs.

The formats come from the suffixes: .star (RELION 3.0/3.1+; writes RELION 3.1 with
<stem>.mrcs beside it), .mrcs/.mrc (bare image stack), .hdf (EMAN2/SPHIRE) and .cs
(cryoSPARC; writes <stem>.mrcs beside it). Images are streamed in chunks, so memory
use does not grow with the number of particles. A volume (.mrc flagged as a volume,
or a 3D .hdf) is converted as a volume. Existing outputs are never replaced without
--force, and the input files are never modified. --pixel-size fills in a pixel size
the input does not state; to replace a stated one, add --replace-pixel-size.

The free disk space is checked before writing. Outputs are written under hidden
temporary names (.NAME.PID.tmp) and renamed at the end; temporaries that a killed
run left behind are removed by the next run, and a lone <stem>.mrcs left by a run
killed before its .star/.cs was written is replaced without --force.

Examples
--------
  isavar convert particles.star particles.hdf          # RELION -> SPHIRE/EMAN2
  isavar convert sphire_stack.hdf for_relion.star      # SPHIRE -> RELION 3.1 (+ for_relion.mrcs)
  isavar convert J42_particles.cs particles.star       # cryoSPARC -> RELION
  isavar convert particles.star images.mrcs            # images only (metadata dropped, with a warning)
  isavar convert stack.mrcs particles.star --pixel-size 1.35
  isavar convert map.mrc map.hdf                       # a volume
  isavar convert bdb:Particles#stack stack.hdf         # SPHIRE BDB (normal or virtual) -> HDF
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from isavar.cli._common import (
    add_verbosity_arguments,
    naming_os_errors,
    positive_float,
    positive_int,
    project_dir,
    setup_logging,
)
from isavar.errors import InputError

log = logging.getLogger("isavar.cli.convert")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``convert`` options."""
    parser.add_argument("src", metavar="SRC",
                        help="input file (.star, .mrcs, .mrc, .hdf, .cs) or an EMAN2/SPHIRE BDB stack (bdb:DIR#name)")
    parser.add_argument("dst", metavar="DST", help="output file (.star, .mrcs, .hdf, .cs; .mrc/.hdf for volumes)")
    parser.add_argument("--force", action="store_true", help="replace existing output files")
    parser.add_argument("--pixel-size", "--apix", dest="pixel_size", type=positive_float, default=None, metavar="A",
                        help="pixel size in Å where the input does not state it")
    parser.add_argument("--replace-pixel-size", action="store_true",
                        help="let --pixel-size replace the pixel size the input states")
    parser.add_argument("--chunk-size", type=positive_int, default=1024, metavar="N",
                        help="images held in memory at once (default 1024)")
    parser.add_argument("--project-dir", dest="project_dir", default=None,
                        help="RELION project directory: relative image names are read from it (then from the "
                             "STAR's folder and its parents) and a STAR output names its stack relative to it "
                             "(default: the current directory, as RELION does)")
    add_verbosity_arguments(parser)


def _is_volume(path: Path) -> bool:
    from isavar.io import particle_format

    kind = particle_format(path)
    if kind == "mrcs" and path.suffix.lower() in (".mrc", ".map"):
        from isavar.io.mrc import read_mrc_header

        return read_mrc_header(path)["is_volume"]
    if kind == "hdf":
        import h5py

        try:
            with h5py.File(path, "r") as fh:
                first = fh["MDF/images"]["0"]["image"]
                return first.ndim == 3 and first.shape[0] > 1
        except (OSError, KeyError):
            return False
    return False


def _output_files(dst: Path) -> list[Path]:
    from isavar.io import particle_format

    if particle_format(dst) in ("star", "cs"):
        return [dst, dst.with_name(dst.stem + ".mrcs")]
    return [dst]


def _made_by_isavar(path: Path) -> bool:
    try:
        import mrcfile

        with mrcfile.open(path, header_only=True, permissive=True) as mrc:
            return bytes(mrc.header.label[0]).startswith(b"Created by isavar")
    except Exception:                                     # not an MRC file at all
        return False


def _is_orphaned_sidecar(out: Path, dst: Path) -> bool:
    """A ``<stem>.mrcs`` that isavar wrote beside a ``.star``/``.cs`` target that does not exist.

    ``convert`` writes the stack first and the metadata file last, so this is what a run killed in
    between leaves behind.
    """
    return out != dst and not dst.exists() and out.suffix.lower() == ".mrcs" and _made_by_isavar(out)


def _check_targets(src: Path, dst: Path, force: bool, stack_paths) -> None:
    from isavar.workflows.outputs import check_can_write

    inputs = {src.resolve(), *(Path(p).resolve() for p in stack_paths)}
    for out in _output_files(dst):
        if out.resolve() in inputs:
            raise InputError(f"would overwrite the input file {out}; choose another output name", path=dst)
        if out.exists() and out.is_dir():
            raise InputError("is a directory", path=out)
        if out.exists() and not force and not _is_orphaned_sidecar(out, dst):
            lone = out != dst and not dst.exists()
            raise InputError("already exists" + (f" without {dst.name} beside it" if lone else "")
                             + " (use --force to replace it)", path=out)
    check_can_write(dst)


def _prepare_targets(dst: Path, force: bool) -> bool:
    """Remove stale temporaries of killed runs; returns True when an orphaned sidecar will be replaced."""
    from isavar.workflows.outputs import remove_stale_temporaries

    names = [p.name for p in _output_files(dst)]
    for path in remove_stale_temporaries(dst.parent if str(dst.parent) else Path("."), names):
        log.info("removed %s, left behind by a convert run that was killed", path)
    orphans = [out for out in _output_files(dst) if out.exists() and _is_orphaned_sidecar(out, dst)]
    for out in orphans:
        log.warning("%s has no %s beside it (a run killed while writing); it is replaced", out, dst.name)
    return bool(orphans) or force


def _pixel_size(args, stated, src: Path):
    """The pixel size to write: the stated one, unless --replace-pixel-size; --pixel-size where none."""
    given = args.pixel_size
    if given is None:
        return stated, False
    if stated and abs(stated - given) > 1e-6 * stated and not args.replace_pixel_size:
        raise InputError(f"states a pixel size of {stated:g} Å; --pixel-size {given:g} would replace it "
                         "(add --replace-pixel-size to do so, or drop --pixel-size)", path=src)
    return given, bool(stated) and args.replace_pixel_size


def _disk_need(n_images: int, box: int, dst_kind: str) -> float:
    """Bytes a particle stack of ``n_images`` needs, with a margin for headers and metadata."""
    per_image = 4.0 * box * box + (2048 if dst_kind in ("hdf",) else 256)
    return n_images * per_image * 1.02 + (1 << 20)


def _lost_metadata(table, dst_kind: str) -> list[str]:
    from isavar.io.particles import ALIGN2D_COLUMNS, CTF_COLUMNS, ORIENTATION_COLUMNS

    if dst_kind != "mrcs":
        return []
    groups = {"CTF": CTF_COLUMNS, "3D orientations": ORIENTATION_COLUMNS, "2D alignment": ALIGN2D_COLUMNS,
              "classes": ("class_number",)}
    lost = [name for name, cols in groups.items() if any(c in table.columns for c in cols)]
    if any(c.startswith("true_") for c in table.columns):
        lost.append("ground truth")
    return lost


def run(args: argparse.Namespace) -> int:
    """Convert ``args.src`` to ``args.dst``; returns 0."""
    from isavar.io import particle_format, read_particles, read_volume, write_particles, write_volume
    from isavar.io.particles import duplicated_rows, set_pixel_size
    from isavar.workflows.outputs import check_disk_space

    setup_logging(args)
    src, dst = Path(args.src), Path(args.dst)
    src_kind = particle_format(src)
    dst_kind = particle_format(dst)
    if src_kind != "bdb" and not src.exists():
        raise InputError("file not found", path=src)
    if _is_volume(src):
        if dst_kind not in ("mrcs", "hdf"):
            raise InputError(f"{src} is a volume; a volume can be written as .mrc or .hdf, not {dst.suffix}",
                             path=dst)
        force = _prepare_targets(dst, args.force)
        _check_targets(src, dst, force, [])
        volume, voxel = read_volume(src)
        voxel, replaced = _pixel_size(args, voxel, src)
        check_disk_space(dst, volume.nbytes * 1.02 + (1 << 20), f"writing {dst.name}")
        with naming_os_errors(dst):
            write_volume(dst, volume, voxel, overwrite=force)
        log.info("wrote volume %s (%s, voxel %s Å%s)", dst, "x".join(map(str, volume.shape)), voxel,
                 ", replacing the stated one" if replaced else "")
        return 0
    stack = read_particles(src, project_dir=project_dir(args))
    try:
        force = _prepare_targets(dst, args.force)
        _check_targets(src, dst, force, {s.path for s in stack.images.sources})
        dup = duplicated_rows(stack.table)
        if dup.any():
            log.warning("%s: %d rows repeat an earlier row (same image and metadata); copied as they are",
                        src, int(dup.sum()))
        lost = _lost_metadata(stack.table, dst_kind)
        if lost:
            log.warning("%s holds images only: %s from %s are not written", dst, ", ".join(lost), src)
        pixel, replaced = _pixel_size(args, stack.pixel_size_A, src)
        if args.pixel_size is not None and (replaced or not stack.pixel_size_A):
            stack = set_pixel_size(stack, pixel)            # also converts origins given in pixels to Å
        table = stack.table
        check_disk_space(dst, _disk_need(len(table), stack.images.box, dst_kind), f"writing {dst.name}")
        with naming_os_errors(dst):
            write_particles(dst, stack.images, table, pixel_size_A=pixel, overwrite=force,
                            chunk_size=args.chunk_size, project_dir=project_dir(args))
    finally:
        stack.close()
    log.info("wrote %d particles (box %d) to %s", len(stack.table), stack.images.box, dst)
    return 0
