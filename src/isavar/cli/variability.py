"""3D variability (SPHIRE sx3dvariability reimplemented): var3D and ave3D from oriented particles.

Every particle is the centre of a group made of itself and its img_per_grp - 1
nearest projection directions (antipodal views count, mirrored; with --sym all
symmetry copies count). Members are brought exactly into the group's frame
(in-plane rotation from the rotation matrices, origin shift removed), the group
mean and standard deviation are computed (--CTF: Wiener mean and CTF-corrected
variance on the same scale), and both 2D map sets are reconstructed: var3D (the
reconstruction of the 2D standard-deviation maps, as SPHIRE; --var3D-stat var
for variances) and ave3D.

Outputs (OUTPUT_DIRECTORY, which must not exist): var3D.mrc, ave3D.mrc,
var2D.star/.mrcs and ave2D.star/.mrcs (input order, unless --no_*_save),
symmetrized_particles.star (sym != c1), var3D_slices.png, summary.json,
log.txt, provenance.json.

SPHIRE 1.4.2 spellings are accepted: --output_dir DIR (instead of the positional
directory), --symmetrize (write symmetrized_particles.star and stop),
--ave2D/--var2D/--ave3D/--var3D FILE (those outputs are always written under the
fixed names above; the names are only logged), --decimate (with --decimate < 1,
--fl is read in cycles/pixel of the decimated images, as SPHIRE), --window,
--overhead (ignored).

Examples:
  isavar 3dvariability particles.star var_out --img_per_grp=100 --CTF --fl=0.15 --aa=0.1
  isavar 3dvariability particles.star var_c4 --sym=c4 --img_per_grp=50 --workers 2
  isavar 3dvariability var_out/var2D.star var_again --VAR
"""

from __future__ import annotations

import argparse
import logging

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
from isavar.errors import InputError

log = logging.getLogger("isavar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The documented sx3dvariability options, SPHIRE 1.4.2 aliases and isavar's own flags."""
    parser.add_argument("prj_stack", help="particles with 3D orientations: .star, .hdf, .cs or a BDB stack bdb:DIR#name")
    parser.add_argument("output_directory", nargs="?", default=None,
                        help="output directory (must not exist)")
    parser.add_argument("--img_per_grp", type=int, default=10,
                        help="images per group incl. the centre: larger = less noisy but lower resolution "
                             "(default 10; SPHIRE 1.4.2 used 100)")
    parser.add_argument("--sym", default="c1", help="point group c<n>, d<n>, tet, oct, icos (default c1)")
    parser.add_argument("--CTF", action="store_true", help="Wiener group means and CTF-corrected variances")
    parser.add_argument("--fl", type=finite_float, default=0.0,
                        help="tanh low-pass stop-band, cycles/pixel of the input (0 = off; default 0)")
    parser.add_argument("--aa", "--aaf", dest="aa", type=finite_float, default=0.0,
                        help="tanh low-pass fall-off; must be > 0 when --fl > 0 (default 0; --aaf is the "
                             "spelling of SPHIRE's example command line)")
    parser.add_argument("--force_symmetrize", action="store_true",
                        help="symmetry-expand the orientations (always done when --sym is not c1; "
                             "symmetrized_particles.star is written)")
    parser.add_argument("--symmetrize", action="store_true",
                        help="SPHIRE 1.4.2: only write symmetrized_particles.star and stop")
    parser.add_argument("--no_norm", action="store_true", help="skip the background normalisation")
    parser.add_argument("--radius", type=finite_float, default=-1.0,
                        help="radius (pixels) of the spherical mask of the 3D outputs, in (0, box/2] "
                             "(default -1: box/2 - 2)")
    parser.add_argument("--npad", type=positive_int, default=2, help="reconstruction padding factor (default 2)")
    parser.add_argument("--no_ave2D_save", action="store_true", help="do not write ave2D.star/.mrcs")
    parser.add_argument("--no_var2D_save", action="store_true", help="do not write var2D.star/.mrcs")
    parser.add_argument("--VAR", action="store_true",
                        help="the input already holds 2D variance (or std) maps: reconstruct them as given")
    parser.add_argument("--SND", action="store_true",
                        help="squared normalised differences to reprojections of a reconstruction "
                             "instead of group variances")
    parser.add_argument("--VERBOSE", action="store_true", help="per-group statistics in the log")
    parser.add_argument("--var3D-stat", dest="var3d_stat", choices=["std", "var"], default="std",
                        help="reconstruct per-group 2D standard deviations (SPHIRE, default) or variances")
    sphire = parser.add_argument_group("SPHIRE 1.4.2 spellings")
    sphire.add_argument("--output_dir", default=None, help="output directory (alternative to the positional one)")
    for name in ("ave2D", "var2D", "ave3D", "var3D"):
        sphire.add_argument(f"--{name}", default=None, metavar="FILE",
                            help=f"accepted; {name} is always written under its fixed name")
    sphire.add_argument("--decimate", type=finite_float, default=1.0,
                        help="Fourier down-sampling of the analysis, (0, 1] (default 1 = none; the outputs "
                             "are always on the input grid)")
    sphire.add_argument("--window", type=int, default=0, help="central crop (input pixels) before decimation")
    sphire.add_argument("--overhead", type=finite_float, default=None, help="ignored (SPHIRE memory estimate)")
    adv = parser.add_argument_group("isavar")
    adv.add_argument("--chunk-size", dest="chunk_size", type=positive_int, default=1024,
                     help="group centres processed at once (a memory bound; the results do not depend on "
                          "it; default 1024)")
    adv.add_argument("--no-auto-decimate", dest="auto_decimate", action="store_false",
                     help="with --fl, work on the full box instead of the smallest box holding the "
                          "frequencies the filter passes")
    add_input_arguments(parser)
    add_executor_arguments(parser)
    add_verbosity_arguments(parser)


def params_from_args(args: argparse.Namespace):
    """Map parsed arguments to :class:`~isavar.variability.params.VariabilityParams`."""
    from isavar.variability.params import from_sphire_options

    fl = args.fl
    if 0 < args.decimate < 1 and fl > 0:
        fl = fl * args.decimate  # SPHIRE measured fl on the decimated images
    return from_sphire_options(
        img_per_grp=args.img_per_grp, sym=args.sym, CTF=args.CTF, fl=fl, aa=args.aa,
        force_symmetrize=args.force_symmetrize or args.symmetrize, no_norm=args.no_norm, radius=args.radius,
        npad=args.npad, no_ave2D_save=args.no_ave2D_save, no_var2D_save=args.no_var2D_save, VAR=args.VAR,
        SND=args.SND, VERBOSE=args.VERBOSE, var3d_stat=args.var3d_stat, decimate=args.decimate,
        window=args.window, chunk_size=args.chunk_size, auto_decimate=args.auto_decimate)


def run(args: argparse.Namespace) -> int:
    """Run ``isavar 3dvariability``."""
    from pathlib import Path

    from isavar.workflows.variability import run_variability

    outdir = args.output_directory or args.output_dir
    if args.output_directory and args.output_dir and args.output_directory != args.output_dir:
        raise InputError("give the output directory either positionally or with --output_dir, not both")
    if not outdir:
        raise InputError("no output directory given (positional OUTPUT_DIRECTORY or --output_dir)")
    if args.VAR and (args.ave2D or args.ave3D or args.var2D):
        raise InputError("--VAR cannot be combined with --ave2D, --ave3D or --var2D")
    params = params_from_args(args)
    with naming_os_errors(outdir), executor_from_args(args) as executor:
        progress = make_progress(args, is_root=executor.is_root())
        for name in ("ave2D", "var2D", "ave3D", "var3D"):
            if getattr(args, name):
                log.info("--%s=%s: written as the fixed isavar output of that name", name, getattr(args, name))
        try:
            result = run_variability(Path(args.prj_stack), Path(outdir), params, executor=executor,
                                     progress=progress, symmetrize_only=args.symmetrize, pixel_size_A=args.apix,
                                     project_dir=project_dir(args))
        finally:
            progress.close()
    if result is not None:
        log.info("3D variability finished: %d particles, var3D and %s in %s", result.n_particles,
                 "ave3D" if result.ave3d is not None else "no ave3D", outdir)
    return 0
