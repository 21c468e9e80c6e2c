"""3D variability analysis: a low-rank covariance of the 3D density (PPCA with projections).

Estimates the mean volume, K component volumes V_k and each particle's latent
coordinates by EM for probabilistic PCA with the projection and CTF operator
(docs/covariance.md): X_i = C_i S_i (mu + sum_k z_ik V_k) + noise. Unlike
`isavar 3dvariability` (SPHIRE's statistic: back-projected 2D group standard
deviations, biased by noise, angular spread and ray cancellation), var3D.mrc here is a
consistent estimate of the voxel standard deviation sqrt(sum_k V_k^2), on the same scale
(noise standard deviation 1 after background normalisation). Each component is fitted on
two independent half sets; a per-shell Wiener prior from their agreement keeps noise out,
and summary.json says which components are above the noise level.

Outputs: var3D.mrc, mean.mrc, component_NN.mrc, mask.mrc, particles.star and particles.cs
(every input column plus latent_1..K; STAR rlnIsavar_latent_k), series/ (mu + t V_k
from the 5th to the 95th percentile of latent k), PNGs, summary.json, log.txt,
provenance.json. Split the particles by latent with `isavar 3dva-split`.

Examples:
  isavar 3dva particles.star va_out --components 3 --CTF
  isavar 3dva particles.star va_lp --components 2 --CTF --fl 0.15 --aa 0.1 --workers 2
  isavar 3dva particles.cs va_focus --components 2 --CTF --mask domain_mask.mrc
  isavar 3dva particles.star va_out --components 3 --CTF --resume   # after an interruption
  isavar 3dva-split va_out --component 1 --threshold 0
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
    non_negative_int,
    positive_float,
    positive_int,
    project_dir,
)

log = logging.getLogger("isavar")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Input, output, model size and the options shared with 3dvariability."""
    parser.add_argument("particles", help="particles with 3D orientations: .star, .hdf or .cs")
    parser.add_argument("output_directory", help="output directory (must not exist)")
    parser.add_argument("--components", type=positive_int, default=2, help="number of components K (default 2)")
    parser.add_argument("--CTF", action="store_true", help="model each particle's CTF (data not phase flipped)")
    parser.add_argument("--fl", type=finite_float, default=0.0,
                        help="tanh low-pass of the components, cycles/pixel (0 = off, default); also limits "
                             "the Fourier samples used, which makes the run faster")
    parser.add_argument("--aa", "--aaf", dest="aa", type=finite_float, default=0.0, help="tanh fall-off; must be > 0 with --fl")
    parser.add_argument("--mask", default=None, metavar="MAP",
                        help="mask for the components (values 0-1, same box); default: from the mean")
    parser.add_argument("--mean", default=None, metavar="MAP", help="use this mean volume (fixed)")
    parser.add_argument("--iterations", type=positive_int, default=20, help="largest number of EM iterations (default 20)")
    parser.add_argument("--tolerance", type=positive_float, default=2e-3,
                        help="stop when the components' span and eigenvalues change less (default 2e-3)")
    parser.add_argument("--sym", default="c1",
                        help="point group imposed on the mean only (components are not symmetrised)")
    parser.add_argument("--no_norm", action="store_true", help="skip the background normalisation")
    parser.add_argument("--npad", type=positive_int, default=2, help="padding of the 3D Fourier grid (default 2)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random initial components (default 0)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run in OUTPUT_DIRECTORY (same input and options) from its "
                             "last completed EM iteration; the result equals an uninterrupted run's")
    parser.add_argument("--chunk-size", dest="chunk_size", type=positive_int, default=512,
                        help="particles per task (bounds memory; the result does not depend on --workers)")
    add_input_arguments(parser)
    add_executor_arguments(parser)
    add_verbosity_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``isavar 3dva``."""
    from pathlib import Path

    from isavar.covariance import CovarianceParams
    from isavar.workflows.covariance import run_3dva

    params = CovarianceParams(n_components=args.components, iterations=args.iterations, tolerance=args.tolerance,
                              ctf=args.CTF, lowpass_fl=args.fl, lowpass_aa=args.aa, symmetry=args.sym,
                              normalize=not args.no_norm, npad=args.npad, chunk_size=args.chunk_size, seed=args.seed)
    with naming_os_errors(args.output_directory), executor_from_args(args) as executor:
        progress = make_progress(args, is_root=executor.is_root())
        try:
            run_3dva(Path(args.particles), Path(args.output_directory), params, executor=executor,
                     progress=progress, mask_path=args.mask, mean_path=args.mean, resume=args.resume,
                     pixel_size_A=args.apix, project_dir=project_dir(args))
        finally:
            progress.close()
    return 0
