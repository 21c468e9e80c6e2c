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

from isavar.cli._common import (
    add_executor_arguments,
    add_input_arguments,
    add_verbosity_arguments,
    executor_from_args,
    finite_float,
    make_progress,
    naming_os_errors,
    positive_int,
    project_dir,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Input stack, output map, CTF, symmetry and padding."""
    parser.add_argument("stack", help="particles with 3D orientations: .star, .hdf, .cs, bdb:DIR#name")
    parser.add_argument("output", help="output map (.mrc or .hdf); must not exist unless --overwrite")
    parser.add_argument("--CTF", action="store_true", help="CTF-weighted reconstruction")
    parser.add_argument("--sym", default="c1", help="point group c<n>, d<n>, tet, oct, icos (default c1)")
    parser.add_argument("--npad", type=positive_int, default=2, help="padding factor (default 2)")
    parser.add_argument("--interpolation", choices=["linear", "nearest"], default="linear",
                        help="Fourier gridding: trilinear (default) or nearest voxel (SPHIRE nn4, faster)")
    parser.add_argument("--radius", type=finite_float, default=-1.0,
                        help="zero voxels beyond this radius in pixels, at most half the box (default -1: "
                             "no mask)")
    parser.add_argument("--chunk-size", dest="chunk_size", type=positive_int, default=512,
                        help="images per task (default 512)")
    parser.add_argument("--no-soft-mask", dest="soft_mask", action="store_false",
                        help="keep the box corners as reconstructed (default: flatten the map outside the "
                             "sphere of radius N/2 to its background with a 3-voxel cosine edge, as "
                             "relion_reconstruct does)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    add_input_arguments(parser)
    add_executor_arguments(parser)
    add_verbosity_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``isavar reconstruct``."""
    from isavar.errors import InputError
    from isavar.workflows.variability import run_reconstruct

    if args.radius != -1 and not args.radius > 0:
        raise InputError(f"--radius must be > 0 (or -1 for no mask), got {args.radius:g}")
    with naming_os_errors(args.output), executor_from_args(args) as executor:
        progress = make_progress(args, is_root=executor.is_root())
        try:
            run_reconstruct(args.stack, args.output, ctf=args.CTF, symmetry=args.sym, npad=args.npad,
                            interpolation=args.interpolation,
                            mask_radius_px=args.radius if args.radius > 0 else None, chunk_size=args.chunk_size,
                            executor=executor, progress=progress, overwrite=args.overwrite,
                            pixel_size_A=args.apix, project_dir=project_dir(args), soft_mask=args.soft_mask)
        finally:
            progress.close()
    return 0
