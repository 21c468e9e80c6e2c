"""Simulate a particle stack with ground truth (orientations, shifts, CTF, states, noise).

The particles are projections of a map (--volume), of a density computed from an
atomic model (--pdb) or of a built-in phantom (--phantom), multiplied by a CTF
(300 kV, Cs 2.7 mm, 10 % amplitude contrast unless told otherwise) and buried in
white Gaussian noise. The particle table holds the usual RELION columns (set to
the truth) and ground-truth copies: true_angle_rot_deg / _tilt_ / _psi_,
true_origin_x_A / _y_, true_defocus_u_A / _v_ / _angle_deg, true_conformation
(0-based index of the volume, -1 for pure noise), true_view (with
--orientations views:K) and true_is_noise (0/1).

OUT is a new (or empty) directory; it receives
  particles.star + particles.mrcs   (or particles.hdf, or particles.cs + particles.mrcs)
  volume_0.mrc, volume_1.mrc ...    the exact volumes projected, indexed by true_conformation
  provenance.json                   parameters, seed, noise level, counts
  simulate.log                      the log

Units: --defocus and --astigmatism in micrometres (SPHIRE style; 1 µm = 10,000 Å,
the table stores Å as RELION does), --shift-sd and --resolution in Å, --box and
--mask-radius in pixels, --apix in Å/pixel.

SNR = mean over particle images of the variance of the noise-free, CTF-modulated
image inside a centred disc (radius --mask-radius; default: the radius holding
99 % of the map's positive density), divided by the noise variance. --snr inf
gives noise-free images.

Examples
--------
  isavar simulate sim --phantom blob --n 2000 --box 64 --apix 2.0 --snr 0.1
  isavar simulate het --phantom two_state --weights 0.7 0.3 --orientations views:50 --no-ctf
  isavar simulate ubq --pdb model.pdb --box 64 --apix 1.5 --resolution 6 --defocus 0.8 2.5 --shift-sd 3
  isavar simulate mix --volume a.mrc --mix b.mrc:0.3 --format hdf --seed 7
  isavar simulate sym --phantom c4 --noise-fraction 0.2 --format cs
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import numpy as np

from isavar.cli._common import add_verbosity_arguments, finite_float, make_progress, non_negative_int, setup_logging
from isavar.errors import InputError

log = logging.getLogger("isavar.cli.simulate")

_SUFFIX = {"star": ".star", "hdf": ".hdf", "cs": ".cs"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulate`` options."""
    parser.add_argument("out", help="output directory (must not exist or be empty, unless --force)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--volume", metavar="MAP", help="project this map (.mrc or .hdf; its box and voxel size)")
    source.add_argument("--pdb", metavar="MODEL", help="atomic model (PDB or mmCIF) turned into a map with gemmi")
    source.add_argument("--phantom", metavar="NAME",
                        help="built-in phantom: blob (asymmetric), two_state (blob and blob minus one domain), "
                             "or a symmetric one: c<n>, d<n>, tet, oct, icos")
    parser.add_argument("--n", type=int, default=1000, help="number of images (default 1000)")
    parser.add_argument("--box", type=int, default=None,
                        help="box size in pixels for --pdb/--phantom (default 64); with --volume it must match "
                             "the map")
    parser.add_argument("--apix", type=finite_float, default=None,
                        help="pixel size in Å/pixel (default 2.0 for --pdb/--phantom, the map's voxel size "
                             "for --volume)")
    parser.add_argument("--resolution", type=finite_float, default=None,
                        help="resolution of the --pdb map in Å (default 3 x apix)")
    parser.add_argument("--snr", type=float, default=0.1, help="signal-to-noise ratio (default 0.1; inf = no noise)")
    parser.add_argument("--defocus", type=finite_float, nargs=2, default=(0.8, 2.5), metavar=("MIN", "MAX"),
                        help="defocus range in µm, uniform (default 0.8 2.5)")
    parser.add_argument("--astigmatism", type=finite_float, default=0.02,
                        help="largest |defocus U - V| in µm (default 0.02)")
    parser.add_argument("--no-ctf", action="store_true", help="no CTF (and no CTF columns in the table)")
    parser.add_argument("--voltage", type=finite_float, default=300.0, help="acceleration voltage in kV (default 300)")
    parser.add_argument("--cs", type=finite_float, default=2.7, help="spherical aberration in mm (default 2.7)")
    parser.add_argument("--amplitude-contrast", type=finite_float, default=0.1,
                        help="amplitude contrast as a fraction (default 0.1)")
    parser.add_argument("--shift-sd", type=finite_float, default=0.0,
                        help="standard deviation of the particle shifts (each axis) in Å (default 0)")
    parser.add_argument("--orientations", default="random",
                        help="random (uniform on SO(3), default) or views:K (K fixed views, random in-plane angle)")
    parser.add_argument("--mix", action="append", default=[], metavar="MAP:WEIGHT",
                        help="add a second state: MAP (same box) makes up WEIGHT (0-1) of the particles; repeatable")
    parser.add_argument("--weights", type=finite_float, nargs="+", default=None, metavar="W",
                        help="relative frequency of volume_0, volume_1, ... (overrides the --mix weights; "
                             "default: --mix weights, the rest shared equally by the main volumes)")
    parser.add_argument("--noise-fraction", type=finite_float, default=0.0,
                        help="fraction of images that are pure noise (true_is_noise = 1; default 0)")
    parser.add_argument("--symmetry", default=None,
                        help="point group of the volume, recorded in provenance (default: the phantom's group, "
                             "else c1); orientations cover all of SO(3) either way")
    parser.add_argument("--mask-radius", type=finite_float, default=None,
                        help="radius in pixels of the disc where the signal variance of the SNR is measured")
    parser.add_argument("--seed", type=non_negative_int, default=None,
                        help="random seed (default: fresh, recorded in provenance)")
    parser.add_argument("--format", choices=sorted(_SUFFIX), default="star",
                        help="particle format: star (+ .mrcs), hdf (EMAN2/SPHIRE) or cs (cryoSPARC + .mrcs)")
    parser.add_argument("--chunk-size", type=int, default=512, help="images rendered at a time (memory bound)")
    parser.add_argument("--force", action="store_true", help="write into an existing non-empty OUT")
    parser.add_argument("--project-dir", dest="project_dir", default=None,
                        help="RELION project directory: particles.star names its stack relative to it, so RELION "
                             "run from there opens it (default: the current directory)")
    add_verbosity_arguments(parser)


def _check_out(out: Path, force: bool) -> None:
    from isavar.workflows.outputs import check_can_write

    if out.exists():
        if not out.is_dir():
            raise InputError("exists and is not a directory", path=out)
        if any(out.iterdir()) and not force:
            raise InputError("output directory exists and is not empty (use --force to write into it)", path=out)
    check_can_write(out)


def _check_options(args) -> None:
    from isavar.synthetic.simulate import check_symmetry, parse_orientations

    if args.n < 1:
        raise InputError(f"--n must be >= 1, got {args.n}")
    if args.box is not None and args.box < 8:
        raise InputError(f"--box must be >= 8, got {args.box}")
    if args.apix is not None and not args.apix > 0:
        raise InputError(f"--apix must be positive, got {args.apix}")
    if not (args.snr > 0 or math.isinf(args.snr)):
        raise InputError(f"--snr must be positive (or inf), got {args.snr}")
    lo, hi = args.defocus
    if not 0 < lo <= hi:
        raise InputError(f"--defocus needs 0 < MIN <= MAX (µm), got {lo} {hi}")
    if not 0 <= args.astigmatism < 2 * lo:
        raise InputError(f"--astigmatism must be in [0, 2 x MIN defocus) µm, got {args.astigmatism}")
    if args.shift_sd < 0:
        raise InputError(f"--shift-sd must be >= 0, got {args.shift_sd}")
    if not 0 <= args.noise_fraction <= 1:
        raise InputError(f"--noise-fraction must be in [0, 1], got {args.noise_fraction}")
    if args.chunk_size < 1:
        raise InputError(f"--chunk-size must be >= 1, got {args.chunk_size}")
    if not args.voltage > 0 or args.cs < 0 or not 0 <= args.amplitude_contrast < 1:
        raise InputError(f"need --voltage > 0, --cs >= 0 and 0 <= --amplitude-contrast < 1, got {args.voltage:g}, "
                         f"{args.cs:g}, {args.amplitude_contrast:g}")
    for name in ("resolution", "mask_radius"):
        value = getattr(args, name)
        if value is not None and not value > 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {value:g}")
    try:
        parse_orientations(args.orientations)
        if args.symmetry is not None:
            check_symmetry(args.symmetry)
    except ValueError as exc:
        raise InputError(str(exc)) from exc


def _parse_mix(text: str) -> tuple[Path, float]:
    path, sep, weight = text.rpartition(":")
    try:
        value = float(weight)
    except ValueError:
        value = float("nan")
    if not sep or not path or not 0 < value < 1:
        raise InputError(f"--mix expects MAP:WEIGHT with 0 < WEIGHT < 1, got {text!r}")
    return Path(path), value


def _load_primary(args) -> tuple[list[np.ndarray], float, dict]:
    """The main volume(s), the pixel size and a description for provenance."""
    from isavar.synthetic import phantom_volume, volume_from_model

    box = 64 if args.box is None else args.box
    if args.phantom is not None:
        apix = 2.0 if args.apix is None else args.apix
        try:
            vols = phantom_volume(args.phantom, box, apix)
        except ValueError as exc:
            raise InputError(f"--phantom: {exc}") from exc
        vols = list(vols) if isinstance(vols, tuple) else [vols]
        return vols, apix, {"phantom": args.phantom}
    if args.pdb is not None:
        apix = 2.0 if args.apix is None else args.apix
        vol = volume_from_model(args.pdb, box, apix, resolution_A=args.resolution)
        return [vol], apix, {"pdb": str(Path(args.pdb).resolve()), "resolution_A": args.resolution or 3.0 * apix}
    from isavar.io import read_volume

    vol, voxel = read_volume(args.volume)
    vol = _check_cube(vol, args.volume)
    if args.box is not None and args.box != vol.shape[0]:
        raise InputError(f"map box is {vol.shape[0]}, --box asks for {args.box} (resample the map first)",
                         path=args.volume)
    if args.apix is not None:
        if voxel and abs(voxel - args.apix) > 1e-3 * args.apix:
            log.warning("%s: voxel size %.4g Å in the header, using --apix %.4g Å", args.volume, voxel, args.apix)
        voxel = args.apix
    if not voxel or voxel <= 0:
        raise InputError("map has no voxel size in its header; give --apix", path=args.volume)
    return [vol], float(voxel), {"volume": str(Path(args.volume).resolve())}


def _check_cube(vol: np.ndarray, path) -> np.ndarray:
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise InputError(f"map must be a cube, got shape {vol.shape}", path=path)
    if not np.all(np.isfinite(vol)):
        raise InputError("map contains NaN or Inf", path=path)
    return np.ascontiguousarray(vol, dtype=np.float32)


def _load_mixes(args, box: int, apix: float) -> tuple[list[np.ndarray], list[float], list[str]]:
    from isavar.io import read_volume

    vols, weights, paths = [], [], []
    for text in args.mix:
        path, weight = _parse_mix(text)
        vol, voxel = read_volume(path)
        vol = _check_cube(vol, path)
        if vol.shape[0] != box:
            raise InputError(f"--mix map has box {vol.shape[0]}, the main volume has {box}", path=path)
        if voxel and abs(voxel - apix) > 0.01 * apix:
            raise InputError(f"--mix map has voxel size {voxel:.4g} Å, the main volume has {apix:.4g} Å", path=path)
        vols.append(vol)
        weights.append(weight)
        paths.append(str(path.resolve()))
    return vols, weights, paths


def _resolve_weights(args, n_primary: int, mix_weights: list[float]) -> list[float]:
    n_total = n_primary + len(mix_weights)
    if args.weights is not None:
        if len(args.weights) != n_total:
            raise InputError(f"--weights has {len(args.weights)} values for {n_total} volumes")
        if any(w < 0 for w in args.weights) or sum(args.weights) <= 0:
            raise InputError("--weights must be non-negative with a positive sum")
        total = sum(args.weights)
        return [w / total for w in args.weights]
    rest = 1.0 - sum(mix_weights)
    if rest <= 0:
        raise InputError(f"--mix weights add up to {sum(mix_weights):g}; they must leave room (< 1) for the "
                         "main volume")
    return [rest / n_primary] * n_primary + list(mix_weights)


def _default_symmetry(args) -> str:
    from isavar.synthetic.phantoms import is_symmetric_phantom

    if args.symmetry is not None:
        return args.symmetry.strip().lower()
    if args.phantom is not None and is_symmetric_phantom(args.phantom):
        return args.phantom.strip().lower()
    return "c1"


def run(args: argparse.Namespace) -> int:
    """Run ``isavar simulate``; returns the exit status."""
    from isavar.io import write_particles, write_volume
    from isavar.synthetic import plan_simulation
    from isavar.workflows.outputs import write_provenance

    out = Path(args.out)
    _check_out(out, args.force)
    _check_options(args)
    volumes, apix, source = _load_primary(args)
    mix_vols, mix_weights, mix_paths = _load_mixes(args, volumes[0].shape[0], apix)
    weights = _resolve_weights(args, len(volumes), mix_weights)
    volumes = volumes + mix_vols
    symmetry = _default_symmetry(args)
    seed = int(args.seed) if args.seed is not None else int(np.random.SeedSequence().entropy % 2**63)

    try:
        plan = plan_simulation(volumes, args.n, pixel_size_A=apix, snr=args.snr,
                               defocus_range_A=tuple(d * 1e4 for d in args.defocus), ctf=not args.no_ctf,
                               shift_sd_A=args.shift_sd, orientations=args.orientations, weights=weights,
                               symmetry=symmetry, astigmatism_A=args.astigmatism * 1e4,
                               noise_fraction=args.noise_fraction, voltage_kV=args.voltage, cs_mm=args.cs,
                               amplitude_contrast=args.amplitude_contrast, mask_radius_px=args.mask_radius,
                               rng=seed)
    except ValueError as exc:
        raise InputError(str(exc)) from exc

    # Nothing is written before every input and option has been accepted.
    from isavar.workflows.outputs import check_disk_space

    check_disk_space(out, 4.0 * plan.n * (plan.box ** 2 + 512) + 4.0 * len(plan.volumes) * plan.box ** 3
                     + (1 << 20), f"{plan.n} images of {plan.box} px")
    out.mkdir(parents=True, exist_ok=True)
    setup_logging(args, log_file=out / "simulate.log")
    log.info("simulating %d images of %d px at %.4g Å/px from %d volume(s) (weights %s), seed %d", plan.n,
             plan.box, apix, len(plan.volumes), ", ".join(f"{w:.3g}" for w in weights), seed)
    log.info("SNR %s: noise sigma %.4g (signal variance %.4g inside r = %.1f px)", args.snr, plan.noise_sigma,
             plan.signal_variance, plan.mask_radius_px)

    volume_files = []
    for k, vol in enumerate(plan.volumes):
        path = out / f"volume_{k}.mrc"
        write_volume(path, vol, apix, overwrite=True)
        volume_files.append(path.name)
    particles = out / f"particles{_SUFFIX[args.format]}"
    progress = make_progress(args)
    progress.stage("simulate", total=plan.n)
    try:
        from isavar.cli._common import project_dir

        write_particles(particles, plan.image_chunks(args.chunk_size, progress=progress), plan.table,
                        pixel_size_A=apix, overwrite=True, project_dir=project_dir(args))
    finally:
        progress.close()

    parameters = {
        **source, "mix": mix_paths, "weights": weights, "n": args.n, "box": int(plan.box), "apix_A": apix,
        "snr": args.snr, "ctf": not args.no_ctf, "defocus_um": list(args.defocus), "astigmatism_um": args.astigmatism,
        "voltage_kV": args.voltage, "cs_mm": args.cs, "amplitude_contrast": args.amplitude_contrast,
        "shift_sd_A": args.shift_sd, "orientations": args.orientations, "noise_fraction": args.noise_fraction,
        "symmetry": symmetry, "mask_radius_px": args.mask_radius, "format": args.format,
    }
    write_provenance(out, command="simulate", parameters=parameters, seed=seed,
                     extra={"simulation": plan.summary(), "outputs": {"particles": particles.name,
                                                                     "volumes": volume_files}})
    log.info("wrote %s (%d images, noise sigma %.4g), %s and provenance.json", particles, plan.n, plan.noise_sigma,
             ", ".join(volume_files))
    return 0
