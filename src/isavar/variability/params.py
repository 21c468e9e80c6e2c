"""Parameters of the 3D variability analysis (SPHIRE ``sx3dvariability`` re-implementation).

The science settings live in one frozen dataclass, :class:`VariabilityParams`,
with physically named fields; :func:`from_sphire_options` maps the legacy
SPHIRE 1.4.2 / 2017-documentation option names onto it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from isavar.errors import InputError

#: Symmetry names accepted (n >= 1 for c and d groups).
_SYM_HELP = "c<n>, d<n>, tet, oct or icos"


def normalise_symmetry(sym: str) -> str:
    """Lower-case and validate a point-group name.

    Parameters
    ----------
    sym : str
        ``c1``, ``C4``, ``d3``, ``tet``, ``oct``, ``icos``.

    Returns
    -------
    str
        The lower-case name.

    Raises
    ------
    InputError
        If the name is not a supported point group.
    """
    s = str(sym).strip().lower()
    if s in ("tet", "oct", "icos"):
        return s
    if len(s) >= 2 and s[0] in "cd" and s[1:].isdigit() and int(s[1:]) >= 1:
        return f"{s[0]}{int(s[1:])}"
    raise InputError(f"unknown symmetry {sym!r} (use {_SYM_HELP})")


@dataclass(frozen=True)
class VariabilityParams:
    """Settings of a 3D variability run.

    Attributes
    ----------
    img_per_grp : int
        Group size G: each particle is the centre of a group made of itself and
        its ``G - 1`` nearest projection directions (antipodal views mirrored).
    symmetry : str
        Point group (``c1``, ``c<n>``, ``d<n>``, ``tet``, ``oct``, ``icos``); the
        reconstruction imposes it and the neighbour search uses every symmetry copy.
    force_symmetrize : bool
        Expand the orientations by the group first (each particle appears once per
        group element, the identity block first) and write the expanded metadata.
    ctf : bool
        CTF-aware statistics: Wiener group means and a CTF-corrected variance on the
        same scale as the plain sample variance.
    lowpass_fl : float
        tanh low-pass stop-band in cycles/pixel of the *input* images (0 = off).
    lowpass_aa : float
        tanh fall-off width (must be > 0 when ``lowpass_fl > 0``).
    normalize : bool
        Background normalisation of each image (mean 0, std 1 outside the disc of
        radius ``nx//2 - 2``) before alignment.
    mask_radius_px : float
        Radius (input pixels) of the spherical mask applied to the 3D outputs;
        ``-1`` = half the box minus 2 pixels.
    npad : int
        Fourier padding factor of the reconstruction.
    save_ave2d, save_var2d : bool
        Write the per-group 2D averages / variability maps.
    var_input : bool
        The input already holds 2D variance (or std) maps: reconstruct them directly.
    snd : bool
        Squared normalised differences (§3.13) instead of group statistics.
    var3d_stat : {"std", "var"}
        Statistic reconstructed into ``var3D``: per-group 2D standard deviation
        (SPHIRE behaviour) or variance.
    decimate : float
        Fourier down-sampling factor in (0, 1] applied before the analysis;
        ``1`` = none (outputs are always returned on the input grid).
    window : int
        Central crop (input pixels) before decimation; 0 = none.
    auto_decimate : bool
        With a low-pass (``lowpass_fl > 0``) and ``decimate == 1``, work on the
        smallest FFT-friendly box that still holds every frequency the filter
        passes (|H| > 1e-3): exact up to that threshold, much faster.
    wiener_snr : float
        SNR constant of the Wiener mean (SPHIRE: 1e5, i.e. almost a pseudo-inverse).
    subtract_edge_level : bool
        Subtract each 2D map's mean at the edge of its disc before reconstruction (SPHIRE
        subtracted the corner mean): a constant noise floor in the std maps then does not turn into
        an edge-peaked 3D background.
    chunk_size : int
        Group centres processed together (memory bound: about
        ``chunk_size * G * nx**2 * 4`` bytes of transient images at worst).
    verbose : bool
        Per-group statistics in the log.
    """

    img_per_grp: int = 10
    symmetry: str = "c1"
    force_symmetrize: bool = False
    ctf: bool = False
    lowpass_fl: float = 0.0
    lowpass_aa: float = 0.0
    normalize: bool = True
    mask_radius_px: float = -1.0
    npad: int = 2
    save_ave2d: bool = True
    save_var2d: bool = True
    var_input: bool = False
    snd: bool = False
    var3d_stat: str = "std"
    decimate: float = 1.0
    window: int = 0
    auto_decimate: bool = True
    wiener_snr: float = 1.0e5
    subtract_edge_level: bool = True
    chunk_size: int = 1024
    verbose: bool = False

    def __post_init__(self):
        object.__setattr__(self, "symmetry", normalise_symmetry(self.symmetry))
        self.validate()

    def validate(self) -> None:
        """Check the settings; raise :class:`~isavar.errors.InputError` on a bad combination."""
        if self.img_per_grp < 2 and not (self.var_input or self.snd):
            raise InputError(f"--img_per_grp must be >= 2 (got {self.img_per_grp})")
        if self.lowpass_fl < 0 or self.lowpass_aa < 0:
            raise InputError("--fl and --aa must be >= 0")
        if self.lowpass_fl > 0 and self.lowpass_aa == 0:
            raise InputError("fall-off (--aa) must be > 0 when a low-pass (--fl) is requested")
        if self.lowpass_fl >= 0.5:
            raise InputError(f"--fl is in cycles/pixel and must be < 0.5 (got {self.lowpass_fl})")
        if self.npad < 1:
            raise InputError(f"--npad must be >= 1 (got {self.npad})")
        if not 0.0 < self.decimate <= 1.0:
            raise InputError(f"--decimate must be in (0, 1] (got {self.decimate})")
        if self.window < 0:
            raise InputError(f"--window must be >= 0 (got {self.window})")
        if self.var3d_stat not in ("std", "var"):
            raise InputError(f"--var3D-stat must be std or var (got {self.var3d_stat!r})")
        if self.force_symmetrize and self.symmetry == "c1":
            raise InputError("--force_symmetrize needs a point group other than c1 (--sym)")
        if self.var_input and self.snd:
            raise InputError("--VAR and --SND cannot be combined")
        if self.chunk_size < 1:
            raise InputError("chunk_size must be >= 1")
        if self.wiener_snr <= 0:
            raise InputError("wiener_snr must be > 0")

    def replace(self, **changes) -> "VariabilityParams":
        """Return a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain dict of the settings (for provenance.json and summary.json)."""
        return dataclasses.asdict(self)


#: SPHIRE / documented option name -> VariabilityParams field (value used as given).
_SPHIRE_FIELDS = {
    "img_per_grp": "img_per_grp",
    "sym": "symmetry",
    "CTF": "ctf",
    "fl": "lowpass_fl",
    "aa": "lowpass_aa",
    "npad": "npad",
    "radius": "mask_radius_px",
    "VAR": "var_input",
    "SND": "snd",
    "VERBOSE": "verbose",
    "decimate": "decimate",
    "window": "window",
    "force_symmetrize": "force_symmetrize",
    "symmetrize": "force_symmetrize",
}


def from_sphire_options(**options) -> VariabilityParams:
    """Build parameters from SPHIRE option names (1.4.2 and the 2017 documentation).

    Parameters
    ----------
    **options
        Any of ``img_per_grp, sym, CTF, fl, aa, npad, radius, VAR, SND, VERBOSE,
        decimate, window, force_symmetrize / symmetrize, no_norm, no_ave2D_save,
        no_var2D_save``; ``overhead`` is accepted and ignored (it only fed a
        logged memory estimate in SPHIRE). Other isavar fields may be given by
        their own names. ``None`` values are ignored (keep the default).

    Returns
    -------
    VariabilityParams

    Raises
    ------
    InputError
        For an unknown option or an invalid combination.

    Notes
    -----
    Units: ``fl`` is taken in cycles/pixel of the input images (SPHIRE 1.4.2
    measured it on the decimated images; with ``decimate=1`` both agree).

    Examples
    --------
    >>> p = from_sphire_options(img_per_grp=50, sym="C4", no_norm=True)
    >>> (p.img_per_grp, p.symmetry, p.normalize)
    (50, 'c4', False)
    """
    fields = {f.name for f in dataclasses.fields(VariabilityParams)}
    kwargs: dict = {}
    for key, value in options.items():
        if value is None or key == "overhead":
            continue
        if key in _SPHIRE_FIELDS:
            kwargs[_SPHIRE_FIELDS[key]] = value
        elif key == "no_norm":
            kwargs["normalize"] = not bool(value)
        elif key == "no_ave2D_save":
            kwargs["save_ave2d"] = not bool(value)
        elif key == "no_var2D_save":
            kwargs["save_var2d"] = not bool(value)
        elif key in fields:
            kwargs[key] = value
        else:
            raise InputError(f"unknown 3D variability option {key!r}")
    return VariabilityParams(**kwargs)
