"""Keep chosen ISAC2 classes and write their member particles (SPHIRE's steps after ISAC2).

Choose the classes in one of three ways:
  --classes 1,4,7-9        class numbers, 1-based; --numbering ordered (default: the order of
                           ordered_class_averages.hdf, class_averages.mrcs and rlnClassNumber of isavar's
                           particles.star) or unordered (the order of class_averages.hdf); --zero-based for
                           the 0-based image numbers e2display.py shows
  --averages FILE          an edited copy of class_averages.hdf / ordered_class_averages.hdf /
                           class_averages.mrcs with the bad averages deleted (SPHIRE's way; HDF copies are
                           matched by their 'members' headers, .mrcs copies by their pixels)
  --select-star FILE       a RELION selection STAR (rows with rlnSelected 1; class by rlnClassNumber)
  --auto                   the classes whose stability-test pixel error is at most --max-pixel-error
                           (default the run's --thld_err; isavar runs only; measured in bench/isac2.md:
                           helps when many images are junk, costs good classes when few are)
With --generation MAIN,GEN the class numbers count the averages of one generation
(mainMMM/generationGGG/class_averages_MMM_GGG.hdf): the members of one class for RCT.

Writes OUT/particles.star (RELION 3.1: rlnClassNumber, 2D alignment at the input pixel size) with
particles.mrcs, particles.cs (cryoSPARC), isacselect.txt (sp_process.py --isacselect list), the kept
averages (class_averages.hdf/.mrcs), class_selection.star (rlnSelected), and the substack as
sp_pipe.py isac_substack makes it (its text files, and EMAN2DB/isac_substack.bdb for BDB input, else
isac_substack.hdf).

Examples:
  isavar isac2-select isac_out good --classes 1,3,5-9
  isavar isac2-select isac_out good --averages ordered_class_averages_good.hdf
  isavar isac2-select isac_out rct12 --generation 1,2 --classes 12
  isavar isac2-select isac_out good --select-star class_selection.star --stack bdb:Particles#data
"""

from __future__ import annotations

import argparse

from isavar.cli._common import add_verbosity_arguments, setup_logging
from isavar.errors import InputError


def _generation(text: str) -> tuple[int, int]:
    try:
        main, gen = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MAIN,GENERATION (e.g. 1,2), got {text!r}") from None
    return main, gen


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """ISAC2 directory, output directory and the choice of classes."""
    parser.add_argument("isac_dir", metavar="ISAC_OUTDIR", help="output directory of isavar isac2 or sp_isac2.py")
    parser.add_argument("outdir", metavar="OUT", help="new output directory")
    choice = parser.add_argument_group("which classes (exactly one)")
    choice.add_argument("--classes", default=None, metavar="LIST", help="class numbers, e.g. 1,3,5-9")
    choice.add_argument("--averages", default=None, metavar="FILE",
                        help="edited copy of the class averages holding only the kept ones (.hdf or .mrcs)")
    choice.add_argument("--select-star", "--select_star", dest="select_star", default=None, metavar="FILE",
                        help="RELION selection STAR (rlnSelected)")
    choice.add_argument("--auto", action="store_true",
                        help="keep the classes whose stability-test pixel error is at most --max-pixel-error "
                             "(isavar runs; see bench/isac2.md for when this helps)")
    parser.add_argument("--max-pixel-error", "--max_pixel_error", dest="max_pixel_error", type=float, default=None,
                        metavar="PX", help="threshold for --auto (default: the run's --thld_err)")
    parser.add_argument("--numbering", choices=["ordered", "unordered"], default="ordered",
                        help="which order --classes and rlnClassNumber count (default ordered)")
    parser.add_argument("--zero-based", "--zero_based", dest="zero_based", action="store_true",
                        help="--classes start at 0 (e2display.py image numbers)")
    parser.add_argument("--generation", type=_generation, default=None, metavar="MAIN,GEN",
                        help="--classes count the averages of this generation of this main iteration (RCT)")
    parser.add_argument("--stack", default=None,
                        help="the particles ISAC2 ran on (default: the stack isavar isac2 recorded)")
    parser.add_argument("--substack_basename", "--substack-basename", dest="substack_basename",
                        default="isac_substack", help="basename of the substack files (default isac_substack)")
    parser.add_argument("--force", action="store_true", help="write into an existing output directory")
    add_verbosity_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``isavar isac2-select``."""
    from isavar.workflows.isac2_select import parse_class_list, run_isac2_select

    setup_logging(args)
    classes = parse_class_list(args.classes) if args.classes is not None else None
    if args.zero_based and args.generation is not None:
        raise InputError("--zero-based does not apply to --generation (its classes are numbered from 1)")
    summary = run_isac2_select(args.isac_dir, args.outdir, classes=classes, numbering=args.numbering,
                               zero_based=args.zero_based, averages=args.averages, selection_star=args.select_star,
                               generation=args.generation, stack=args.stack, substack_name=args.substack_basename,
                               force=args.force, auto=args.auto, max_pixel_error=args.max_pixel_error)
    print(f"{summary['particles']} particles of {len(summary['classes'])} classes written to {args.outdir}")
    return 0
