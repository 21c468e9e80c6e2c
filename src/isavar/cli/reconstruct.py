"""3D reconstruction of oriented particles by direct Fourier inversion.

Every image is inserted at its orientation (RELION rot/tilt/psi) after removing
its origin shift; with --CTF the insertion is CTF-weighted (Wiener-style); --sym
imposes a point group. The output voxel size is the input pixel size.

Examples:
  isavar reconstruct particles.star map.mrc --CTF
  isavar reconstruct particles.star map_c4.mrc --sym c4 --npad 2 --workers 2
"""

from __future__ import annotations

import argparse

from isavar.cli._common import add_executor_arguments, add_verbosity_arguments, make_progress, setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Input stack, output map, CTF, symmetry and padding."""
    parser.add_argument("stack", help="particles with 3D orientations: .star, .hdf, .cs, bdb:DIR#name")
    parser.add_argument("output", help="output map (.mrc or .hdf); must not exist unless --overwrite")
    parser.add_argument("--CTF", action="store_true", help="CTF-weighted reconstruction")
    parser.add_argument("--sym", default="c1", help="point group c<n>, d<n>, tet, oct, icos (default c1)")
    parser.add_argument("--npad", type=int, default=2, help="padding factor (default 2)")
    parser.add_argument("--interpolation", choices=["linear", "nearest"], default="linear",
                        help="Fourier gridding: trilinear (default) or nearest voxel (SPHIRE nn4, faster)")
    parser.add_argument("--radius", type=float, default=-1.0,
                        help="zero voxels beyond this radius in pixels (default: no mask)")
    parser.add_argument("--chunk-size", dest="chunk_size", type=int, default=512, help="images per task")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_executor_arguments(parser)
    add_verbosity_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``isavar reconstruct``."""
    from isavar.errors import InputError
    from isavar.parallel import make_executor
    from isavar.workflows.variability import run_reconstruct

    if args.npad < 1:
        raise InputError(f"--npad must be >= 1 (got {args.npad})")
    executor = make_executor(args.executor, args.workers)
    setup_logging(args, is_root=executor.is_root())
    progress = make_progress(args, is_root=executor.is_root())
    try:
        run_reconstruct(args.stack, args.output, ctf=args.CTF, symmetry=args.sym, npad=args.npad,
                        interpolation=args.interpolation, mask_radius_px=args.radius if args.radius > 0 else None,
                        chunk_size=args.chunk_size, executor=executor, progress=progress, overwrite=args.overwrite)
    finally:
        progress.close()
        close = getattr(executor, "close", None)
        if close is not None:
            close()
    return 0
