"""ISAC2 2D classification (SPHIRE sp_isac2.py reimplemented; same options, names and defaults).

Iterative Stable Alignment and Clustering: equal-size k-means with alignment,
followed by a stability test of every class (several randomised reference-free
alignments must agree within --thld_err pixels). Images in stable classes with more
than --minimum_grp_size members are "accounted"; the rest are re-classified in
further generations and main iterations.

Outputs (OUTDIR): class_averages.hdf / ordered_class_averages.hdf (SPHIRE layout),
class_averages.mrcs + class_averages.star (ordered), class_averages_fullres.mrcs,
particles.star (accounted particles with rlnClassNumber and 2D alignment),
unaccounted_particles.star, all_parameters.txt, processed_images.txt,
not_processed_images.txt, class_averages.png, summary.json, provenance.json.
Interrupted runs continue when the same command is run again.

Examples:
  isavar isac2 particles.star isac_out --radius=50 --CTF
  isavar isac2 particles.star isac_out --radius 50 --CTF --img_per_grp 100 --workers 2
  isavar isac2 stack.hdf isac_out --radius=40 --restart=0
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
    non_negative_int,
    positive_int,
    project_dir,
)


def _bool_flag(parser, name, help_):
    parser.add_argument(f"--{name}", action="store_true", default=False, help=help_)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of sp_isac2.py (names and defaults) plus isavar's executor and verbosity flags."""
    parser.add_argument("stack", help="input particles: .star, .mrcs, .hdf, .cs or a BDB stack bdb:DIR#name")
    parser.add_argument("outdir", help="output directory (created; an existing ISAC2 run is continued)")
    parser.add_argument("--radius", type=int, required=True, help="particle radius in pixels (required)")
    parser.add_argument("--img_per_grp", type=int, default=200, help="images per class (default 200)")
    _bool_flag(parser, "CTF", "phase-flip the images with their CTF")
    _bool_flag(parser, "VPP", "phase-plate data: amplitude whitening + phase flip (not with --CTF)")
    parser.add_argument("--xr", type=int, default=1, help="x search range, working pixels (default 1)")
    parser.add_argument("--yr", type=int, default=-1, help="y search range; -1 = same as --xr (default -1)")
    parser.add_argument("--ts", type=finite_float, default=1.0, help="translational search step (default 1.0)")
    parser.add_argument("--thld_err", type=finite_float, default=None,
                        help="pixel-error threshold of stable membership, working pixels (default: SPHIRE's 0.7 "
                             "at its target_radius 29, scaled to --target_radius: 0.628 at 26)")
    parser.add_argument("--target_radius", type=int, default=26,
                        help="particle radius after shrinking, working pixels (default 26; SPHIRE's is 29: "
                             "SAC rounds about 1.25x the CPU time, the same quality in the benchmarks)")
    parser.add_argument("--target_nx", type=int, default=None,
                        help="working box; effective box target_nx + xr - 1 (default: SPHIRE's 76 at its "
                             "target_radius 29, scaled to --target_radius: 68 at 26)")
    parser.add_argument("--ir", type=int, default=1, help="inner ring of the polar alignment (default 1)")
    parser.add_argument("--rs", type=int, default=1, help="ring step (default 1)")
    parser.add_argument("--maxit", type=int, default=18,
                        help="passes of the within-group alignment; 30 is SPHIRE's default (default 18: two "
                             "discrete-angle cycles instead of five, the same quality in the benchmarks)")
    parser.add_argument("--center_method", type=int, default=-1, choices=range(-1, 8),
                        help="pre-alignment centring: -1 average shift, 0 none, 1 phase centre of gravity, "
                             "2 CCF Gaussian, 3 CCF difference of Gaussians, 4 CCF with the mask, "
                             "5 CCF with the rotational average, 6 thresholded phase CoG, 7 binarised CCF "
                             "(default -1)")
    parser.add_argument("--dst", type=finite_float, default=90.0,
                        help="discrete angle (degrees) of the periodic coarse passes; 0 disables (default 90)")
    parser.add_argument("--FL", type=finite_float, default=0.2,
                        help="first EQK low-pass cut-off, 1/pixel (default 0.2)")
    parser.add_argument("--FH", type=finite_float, default=0.45,
                        help="last EQK low-pass cut-off, 1/pixel (default 0.45)")
    parser.add_argument("--FF", type=finite_float, default=0.2, help="tanh filter fall-off (default 0.2)")
    parser.add_argument("--init_iter", type=int, default=7, help="maximum SAC rounds per generation (default 7)")
    parser.add_argument("--iter_reali", type=int, default=1,
                        help="check stability every iter_reali SAC rounds (default 1)")
    parser.add_argument("--stab_ali", type=int, default=4,
                        help="randomised alignments per stability test (default 4; SPHIRE: 5)")
    parser.add_argument("--minimum_grp_size", type=int, default=60,
                        help="a class is accepted with more than this many stable members (default 60)")
    parser.add_argument("--rand_seed", type=non_negative_int, default=None,
                        help="seed of every random choice (default: drawn and recorded in provenance.json)")
    _bool_flag(parser, "skip_prealignment", "do not pre-align (centre) the particles")
    parser.add_argument("--restart", type=int, default=-1,
                        help="-1 continue an interrupted run; 0 redo the first unfinished main iteration; "
                             "k > 0 restart after main iteration k (default -1)")
    parser.add_argument("--filament_width", type=int, default=-1,
                        help="filament width in pixels (helical mode; -1 = single particles)")
    _bool_flag(parser, "filament_mask_ignore", "filaments: use the rectangular mask only for normalisation")
    _bool_flag(parser, "skip_ordering", "do not order the class averages")
    parser.add_argument("--delta_good", type=int, default=0,
                        help="the first generation of a main iteration must yield more than this many "
                             "good classes (default 0)")
    parser.add_argument("--write-aligned", dest="write_aligned", action="store_true",
                        help="also write aligned_particles.star/.mrcs: each accounted particle rotated, shifted "
                             "and mirrored into its class frame (RELION's 2D tools and cryoSPARC cannot apply "
                             "ISAC2's mirror from pose columns)")
    add_input_arguments(parser)
    parser.add_argument("--eqk_search", choices=["candidates", "flat"], default="candidates",
                        help="EQK search: 'candidates' aligns each image exactly only to the references a coarse "
                             "score picks (cost about linear in the particle count); 'flat' to every reference, "
                             "as SPHIRE (cost grows as its square) (default candidates)")
    parser.add_argument("--eqk_candidates", type=positive_int, default=8,
                        help="candidate references per image of the 'candidates' EQK search (default 8)")
    parser.add_argument("--eqk_pairs", choices=["own", "union"], default="own",
                        help="'candidates' EQK search: complete each image's correlation curves only against its "
                             "own candidate references ('own', default) or against every reference of its group "
                             "of images ('union')")
    parser.add_argument("--eqk_neighbours", type=non_negative_int, default=0,
                        help="'candidates' EQK search with more than 4x this many classes: after a generation's "
                             "first EQK iteration score each image coarsely only against this many references "
                             "nearest to its current class (the coarse step then no longer grows with the class "
                             "count; it let in more noise images in the benchmarks, see docs/deviations.md); 0 "
                             "scores every reference (default 0)")
    parser.add_argument("--eqk_shift_candidates", type=non_negative_int, default=0,
                        help="EQK search: trial translations per image searched at every ring frequency, chosen by "
                             "a low-frequency score against the image's references; 0 searches all, as SPHIRE "
                             "(default 0)")
    parser.add_argument("--main_stop", type=finite_float, default=0.2,
                        help="a main iteration after the first whose first generation accepts fewer than this "
                             "fraction of its classes ends the run; 0 goes on while any class is accepted, as "
                             "SPHIRE (default 0.2)")
    parser.add_argument("--within_shift_candidates", type=non_negative_int, default=0,
                        help="within-group passes: trial translations per image searched exactly after a coarse "
                             "low-frequency score; 0 searches all exactly, as SPHIRE (default 0)")
    parser.add_argument("--within_stop", type=finite_float, default=0.5,
                        help="within-group runs: stop once a pass after the last discrete-angle pass moves no image "
                             "by more than this many working pixels; 0 runs all --maxit passes, as SPHIRE "
                             "(default 0.5)")
    parser.add_argument("--within_stop_fraction", type=finite_float, default=0.01,
                        help="within-group runs: the fraction of a group's images (rounded down) that may still move "
                             "further than --within_stop when the run stops; 0: none (default 0.01)")
    parser.add_argument("--prealign_search", choices=["coarse", "full"], default="full",
                        help="pre-alignment passes over the whole translational range: 'coarse' tries every second "
                             "step, then +-1 step around the best; 'full' every step, as SPHIRE (default full)")
    parser.add_argument("--shift_search", choices=["references", "images"], default="references",
                        help="where the pre-alignment tries its trial translations: 'references' samples every "
                             "image once per pass and moves the reference; 'images' samples every image at every "
                             "trial translation, as SPHIRE (default references)")
    parser.add_argument("--band_tol", type=finite_float, default=1e-4,
                        help="alignment correlations leave out the ring frequencies of a reference that hold at "
                             "most this fraction of its energy (its low-pass filter leaves almost none there); 0 "
                             "uses all, as SPHIRE (default 1e-4)")
    parser.add_argument("--round_stop", choices=["plateau", "sphire"], default="plateau",
                        help="a generation's SAC rounds stop once the membership agreement (above 0.5) rose by "
                             "less than 0.05: 'plateau' also when it fell; 'sphire' only when it rose, as SPHIRE "
                             "(default plateau)")
    parser.add_argument("--round_agreement", type=finite_float, default=0.8,
                        help="a generation's SAC rounds also stop once the membership agreement with the previous "
                             "check reaches this value (0: off, as SPHIRE; default 0.8)")
    parser.add_argument("--round_eqk_iterations", type=non_negative_int, default=3,
                        help="SAC rounds after a generation's first: EQK iterations only at the last this many "
                             "cut-offs of the filter ramp --FL -> --FH, from the previous round's averages (0: the "
                             "whole ramp in every round, as SPHIRE; default 3)")
    parser.add_argument("--full_ramp_rounds", type=positive_int, default=2,
                        help="with --round_eqk_iterations > 0: the first this many SAC rounds of a generation run "
                             "the whole filter ramp --FL -> --FH (default 2; 1: only the first round)")
    parser.add_argument("--later_round_floor", type=finite_float, default=0.0,
                        help="generations after the run's first: the membership agreement above which --round_stop's "
                             "rule may stop them (0.5: as the run's first generation and SPHIRE; default 0)")
    parser.add_argument("--member_check", type=finite_float, default=0.5,
                        help="after the stability test, keep a stable member only if its correlation with the mean "
                             "of its class's other stable members is at least this fraction of the class's median; "
                             "the others go back to the pool (removes noise images that aligned consistently by "
                             "chance; 0: no check, as SPHIRE; default 0.5)")
    parser.add_argument("--empty_stop", type=non_negative_int, default=2,
                        help="a generation (not the run's first) stops after this many stability checks in a row "
                             "at which all its stable images together are too few for one accepted class (at most "
                             "--minimum_grp_size; the left-overs of a later main iteration are often pure junk); "
                             "0 runs such a generation to --init_iter rounds, as SPHIRE (default 2)")
    add_executor_arguments(parser)
    add_verbosity_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """Run ``isavar isac2``."""
    from pathlib import Path

    from isavar.isac.params import from_sphire_options
    from isavar.workflows.isac2 import run_isac2

    params = from_sphire_options(args)
    with naming_os_errors(args.outdir), executor_from_args(args) as executor:
        progress = make_progress(args, is_root=executor.is_root())
        try:
            result = run_isac2(Path(args.stack), Path(args.outdir), params, executor=executor, progress=progress,
                               pixel_size_A=args.apix, project_dir=project_dir(args),
                               write_aligned=args.write_aligned)
        finally:
            progress.close()
    import logging

    logging.getLogger("isavar").info("ISAC2 finished: %d classes, %d of %d particles accounted -> %s",
                                     result.n_classes, len(result.accounted), len(result.params), args.outdir)
    return 0
