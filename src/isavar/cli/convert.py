"""Convert particle stacks or volumes between RELION STAR, MRCS, EMAN2/SPHIRE HDF and cryoSPARC .cs.

The formats come from the suffixes: .star (RELION 3.0/3.1+; writes RELION 3.1 with
<stem>.mrcs beside it), .mrcs/.mrc (bare image stack), .hdf (EMAN2/SPHIRE) and .cs
(cryoSPARC; writes <stem>.mrcs beside it). Images are streamed in chunks, so memory
use does not grow with the number of particles. A volume (.mrc flagged as a volume,
or a 3D .hdf) is converted as a volume. Existing outputs are never replaced without
--force, and the input files are never modified.

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

from isavar.cli._common import add_verbosity_arguments, setup_logging
from isavar.errors import InputError

log = logging.getLogger("isavar.cli.convert")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``convert`` options."""
    parser.add_argument("src", metavar="SRC",
                        help="input file (.star, .mrcs, .mrc, .hdf, .cs) or an EMAN2/SPHIRE BDB stack (bdb:DIR#name)")
    parser.add_argument("dst", metavar="DST", help="output file (.star, .mrcs, .hdf, .cs; .mrc/.hdf for volumes)")
    parser.add_argument("--force", action="store_true", help="replace existing output files")
    parser.add_argument("--pixel-size", type=float, default=None, metavar="A",
                        help="pixel size in Å where the input does not state it")
    parser.add_argument("--chunk-size", type=int, default=1024, metavar="N",
                        help="images held in memory at once (default 1024)")
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


def _check_targets(src: Path, dst: Path, force: bool, stack_paths) -> None:
    inputs = {src.resolve(), *(Path(p).resolve() for p in stack_paths)}
    for out in _output_files(dst):
        if out.resolve() in inputs:
            raise InputError(f"would overwrite the input file {out}; choose another output name", path=dst)
        if out.exists() and not force:
            raise InputError("already exists (use --force to replace it)", path=out)


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

    setup_logging(args)
    src, dst = Path(args.src), Path(args.dst)
    src_kind = particle_format(src)
    dst_kind = particle_format(dst)
    if src_kind != "bdb" and not src.exists():
        raise InputError("file not found", path=src)
    if args.chunk_size < 1:
        raise InputError("--chunk-size must be at least 1")
    if _is_volume(src):
        if dst_kind not in ("mrcs", "hdf"):
            raise InputError(f"{src} is a volume; a volume can be written as .mrc or .hdf, not {dst.suffix}",
                             path=dst)
        _check_targets(src, dst, args.force, [])
        volume, voxel = read_volume(src)
        write_volume(dst, volume, voxel if voxel else args.pixel_size, overwrite=args.force)
        log.info("wrote volume %s (%s, voxel %s Å)", dst, "x".join(map(str, volume.shape)), voxel)
        return 0
    stack = read_particles(src)
    try:
        _check_targets(src, dst, args.force, {s.path for s in stack.images.sources})
        lost = _lost_metadata(stack.table, dst_kind)
        if lost:
            log.warning("%s holds images only: %s from %s are not written", dst, ", ".join(lost), src)
        pixel = args.pixel_size if args.pixel_size is not None else stack.pixel_size_A
        table = stack.table
        if args.pixel_size is not None:
            table = table.assign(pixel_size_A=float(args.pixel_size))
        write_particles(dst, stack.images, table, pixel_size_A=pixel, overwrite=args.force,
                        chunk_size=args.chunk_size)
    finally:
        stack.close()
    log.info("wrote %d particles (box %d) to %s", len(stack.table), stack.images.box, dst)
    return 0
