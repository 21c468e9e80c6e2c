"""Split the particles of an `isavar 3dva` run by latent coordinate into STAR/.cs subsets.

Reads OUTDIR/particles.star and writes OUTDIR/split_<rule>/subset_NN.star and .cs
(images referenced in place) plus split.json. Either thresholds on one latent
(subset 1 below the first threshold, subset 2 above it, ...) or k-means on all latents
(subsets ordered by their mean latent of --component). Each subset can be refined on
its own in RELION or cryoSPARC.

Examples:
  isavar 3dva-split va_out --component 1 --threshold 0
  isavar 3dva-split va_out --component 2 --threshold -1 1
  isavar 3dva-split va_out --kmeans 3
"""

from __future__ import annotations

import argparse

from isavar.cli._common import add_verbosity_arguments, non_negative_int, positive_int, project_dir, setup_logging


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Output directory of a 3dva run and the split rule."""
    parser.add_argument("output_directory", help="an isavar 3dva output directory")
    parser.add_argument("--component", type=positive_int, default=1, help="latent used by --threshold (1-based, default 1)")
    parser.add_argument("--threshold", type=float, nargs="+", default=None,
                        help="cut points on that latent (default 0)")
    parser.add_argument("--kmeans", type=int, default=0, help="k-means on all latents with this many clusters")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the k-means initialisation")
    parser.add_argument("--project-dir", dest="project_dir", default=None,
                        help="RELION project directory: the subset STAR files name images relative to it "
                             "(default: the current directory, as RELION does)")
    add_verbosity_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``isavar 3dva-split``."""
    from isavar.errors import InputError
    from isavar.workflows.covariance import run_split

    if args.kmeans and args.threshold is not None:
        raise InputError("give either --threshold or --kmeans, not both")
    if args.kmeans < 0 or args.kmeans == 1:
        raise InputError(f"--kmeans needs at least 2 clusters (got {args.kmeans})")
    setup_logging(args)
    run_split(args.output_directory, component=args.component, thresholds=args.threshold, kmeans=args.kmeans,
              seed=args.seed, project_dir=project_dir(args))
    return 0
