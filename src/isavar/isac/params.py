"""ISAC2 parameters: one frozen dataclass with SPHIRE 1.4.2 names, defaults and meanings.

The field names are those of ``sp_isac2.py`` options (``img_per_grp``, ``thld_err``,
``FL``/``FH``/``FF``, ...) so that a SPHIRE user finds every option under the
name they know; each field documents its unit and effect (spec isac2 §9).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from isavar.errors import InputError


#: SPHIRE's working scale: particle radius (pixels) after shrinking, its working box and stability threshold there
SPHIRE_TARGET_RADIUS = 29
SPHIRE_TARGET_NX = 76
SPHIRE_THLD_ERR = 0.7


def working_box(target_radius: int) -> int:
    """SPHIRE's working box (76 at radius 29) scaled to the particle radius ``target_radius`` (pixels)."""
    return int(round(SPHIRE_TARGET_NX * target_radius / SPHIRE_TARGET_RADIUS))


def stability_threshold(target_radius: int) -> float:
    """SPHIRE's pixel-error threshold (0.7 pixels at radius 29) in pixels of the working scale ``target_radius``."""
    return round(SPHIRE_THLD_ERR * target_radius / SPHIRE_TARGET_RADIUS, 3)


@dataclass(frozen=True)
class Isac2Params:
    """Parameters of an ISAC2 run (defaults = SPHIRE 1.4.2 ``sp_isac2.py``, except ``maxit``, the working scale
    ``target_radius`` and the isavar extensions; :func:`sphire_142` gives SPHIRE's search).

    Attributes
    ----------
    radius : int
        Particle radius in pixels of the input images (required).
    img_per_grp : int
        Images per class: each generation uses ``K = N // img_per_grp`` classes.
    CTF : bool
        Phase-flip the images with their CTF (pre-alignment and working stack).
    VPP : bool
        Phase-plate data: whiten amplitudes with the mean radial amplitude and phase flip.
    xr, yr : int
        Translational search range (+-pixels, working scale); ``yr = -1`` means ``xr``.
    ts : float
        Translational step (pixels, working scale).
    thld_err : float or None
        Pixel-error threshold (working pixels) for stable class membership. None (default): SPHIRE's 0.7 pixels
        at its working scale, i.e. ``0.7 * target_radius / 29`` (the same threshold on the particle; 0.628 at
        26).
    target_radius : int
        Particle radius after shrinking (outer ring of the polar alignments). Default 26 (isavar; SPHIRE 29):
        every alignment samples 0.81 times as many pixels, a SAC round costs about 0.8 times the CPU, with the
        same quality in the benchmarks (``docs/deviations.md``); 29 is SPHIRE's working scale.
    target_nx : int or None
        Working box; the effective box is ``target_nx + xr - 1``. None (default): SPHIRE's 76 at its
        ``target_radius`` 29, scaled with ``target_radius`` (68 at 26).
    ir, rs : int
        Inner ring and ring step of the polar alignments.
    maxit : int
        Passes of the within-group refinement (``maxit - 1`` alignments + final average). Default 18 (isavar;
        SPHIRE 30): two discrete-angle cycles instead of five, a within-group stage about 1.5x cheaper per SAC
        round at the same quality over five seeds (``docs/deviations.md``); 30 is SPHIRE's search.
    center_method : int
        Reference centring of the pre-alignment: -1 average shift, 0 none, 1..7 (spec §1.1.1).
    dst : float
        Discrete angle (degrees) of the periodic coarse rotational passes; 0 disables them.
    FL, FH, FF : float
        First and last tanh low-pass cut-off (cycles/pixel) of the EQK-means references, and fall-off.
    init_iter : int
        Maximum SAC rounds (EQK-means + within-group stage) per generation.
    iter_reali : int
        Stability is checked in SAC rounds ``r`` with ``r % iter_reali == 0`` (and always in the last).
    stab_ali : int
        Independent randomised within-group alignments for the stability test. Default 4 (isavar; SPHIRE 5):
        with the member check (``member_check``) taking out the noise images that a weaker test lets through,
        4 runs cost about 0.9 of the CPU seconds of 5 and accounted more particles at the same purity
        (``bench/isac2.md``, thirteenth pass); 5 is SPHIRE's test.
    minimum_grp_size : int
        A class is accepted if it has more than this many stable members.
    rand_seed : int or None
        The seed of every random choice (None: fresh OS entropy, recorded in the output).
    skip_prealignment : bool
        Do not pre-align (centring shifts are zero).
    restart : int
        -1 continue, 0 redo the first unfinished main iteration, k > 0 restart after main iteration k.
    filament_width : int
        Filament width in input pixels (-1: single particles).
    filament_mask_ignore : bool
        Filaments: use the rectangular mask for normalisation only.
    skip_ordering : bool
        Do not order the class averages.
    delta_good : int
        The first generation of a main iteration must give more than this many good classes.
    prealign_maxit : int
        isavar extension: pre-alignment passes per translational step.
    eqk_search : {"candidates", "flat"}
        isavar extension: "candidates" (default) aligns each image exactly only to the references chosen by
        a cheap coarse score (:func:`isavar.isac.generation.eqk_search_candidates`; cost about linear in N,
        ``docs/deviations.md``); "flat" aligns every image to every reference in each EQK iteration (SPHIRE,
        cost ``N x K``).
    eqk_candidates : int
        isavar extension: candidate references per image of the "candidates" search (with at most twice
        this many classes the search is flat: the candidates of a group of images would cover most classes).
    eqk_pairs : {"own", "union"}
        isavar extension, "candidates" search: the images whose best candidate is the same reference are aligned
        together, to the references most often among their candidates (at most ``5 x eqk_candidates``).
        "own" (default): each image's correlation curves are completed (inverse FFTs, peak search) only
        against its own candidates; "union" (the 10th-19th sessions' search): against every reference of its
        group. Measured: ``bench/isac2.md``, sixteenth pass.
    eqk_neighbours : int
        isavar extension: with the "candidates" search and more than ``4 x eqk_neighbours`` classes, every image
        after the first EQK iteration of a generation is scored coarsely only against the ``eqk_neighbours``
        references nearest to the class it was in (by the references' mutual coarse scores) and that class,
        so the coarse step costs ``N x (eqk_neighbours + 1) + K x K`` scores instead of ``N x K`` (an image then
        has at most ``eqk_neighbours + 1`` candidates); 0 (default): against every reference (the restriction
        let in more noise images in the benchmarks, ``docs/deviations.md``).
    eqk_shift_candidates : int
        isavar extension: ``R > 0`` ranks every image's 9 trial translations of the EQK search by a
        low-frequency score (ring frequencies m <= 24) against its references and correlates only the best
        ``R`` at every ring frequency (EQK iterations about 14 % cheaper at 10,000 particles); 0 (default)
        searches every translation fully (SPHIRE). Not the default: it let pure-noise images into the
        accepted classes (``docs/deviations.md``).
    within_shift_candidates : int
        isavar extension: 0 (default) searches every trial translation of a within-group pass exactly
        (SPHIRE); ``R > 0`` ranks them by a low-frequency coarse score and searches only the best ``R`` exactly
        (cheaper; see ``docs/deviations.md`` for why it is not the default).
    prealign_search : {"coarse", "full"}
        isavar extension: "coarse" searches the full translational range of a pre-alignment pass coarse to
        fine (every second step, then +-1 step around the best); "full" (default) searches every step
        (SPHIRE). "coarse" is not the default: with ``--maxit 18`` as well it lowered the mean purity ratio
        of five seeds of the 2,000-particle benchmark by 0.10 (``bench/isac2.md``).
    shift_search : {"references", "images"}
        isavar extension: where the trial translations of the pre-alignment passes go. "references" (default):
        the reference is prepared at each trial translation and every image is polar-sampled once per pass,
        around its current centre (:func:`isavar.core.align2d.prepare_references`); "images": every image is
        sampled around each trial centre (SPHIRE). SPHIRE's scores up to the half-pixel edge of the reference's
        disc, on a lattice fixed in the reference's frame instead of the image's; ``docs/deviations.md``.
    within_stop : float
        isavar extension: a within-group run stops once an alignment pass after the last discrete-angle pass
        moves no image by more than this many pixels (a point within ``target_radius``; a changed mirror
        always counts); default 0.5; 0 runs all ``maxit`` passes (SPHIRE). Quality over five seeds of the
        2,000-particle benchmark with ``band_tol`` and ``round_stop`` at their defaults: ``bench/isac2.md``.
    within_stop_fraction : float
        isavar extension: the ``within_stop`` test lets this fraction of a group's images (rounded down) move
        further, e.g. 2 of 200 with 0.01; those still moving are the ones the stability test rejects. Default
        0.01 (``bench/isac2.md``, sixteenth pass); 0: no image may move further (the 7th-19th sessions' rule).
    band_tol : float
        isavar extension: the correlations leave out a reference's highest ring frequencies and innermost
        rings of each frequency band as long as the coefficients left out hold at most this fraction of the
        reference's (ring-weighted) energy (:func:`isavar.core.align2d.band_limit`); the tanh-filtered
        references of ISAC have almost none there. Default 1e-4; 0 uses every coefficient (SPHIRE).
    main_stop : float
        isavar extension: a main iteration after the first whose first generation accepts fewer than this
        fraction of its classes ends the run (its accepted classes are kept). Default 0.2; 0 is SPHIRE's rule
        (main iterations go on while the first generation accepts more than ``delta_good`` classes). The
        main iterations after the first work on the images left over, mostly unstable ones and junk; with
        SPHIRE's rule they go on picking one small class at a time out of them. Measured: ``bench/isac2.md``.
    round_stop : {"plateau", "sphire"}
        isavar extension: when a generation's SAC rounds stop before ``init_iter``. Both need a membership
        agreement above 0.5 with the previous check; "sphire" stops only when the agreement rose by less
        than 0.05 but more than 0 (SPHIRE: a round whose agreement fell never stops the generation);
        "plateau" (default) also stops when it fell (the memberships have stopped improving).
    round_agreement : float
        isavar extension: a generation's SAC rounds also stop once the membership agreement with the previous
        check reaches this value. Default 0.8 (isavar): at 10,000 particles the first generation stopped one
        round earlier in 2 of 3 seeds (10-17 % fewer CPU seconds, purity ratio 0.01 lower); at 2,000 particles
        the plateau rule stopped first in all 9 seeds run (``bench/isac2.md``, eleventh pass). 0: only
        ``round_stop``'s rule (SPHIRE).
    round_eqk_iterations : int
        isavar extension: the SAC rounds after a generation's first run their EQK iterations only at the last
        ``round_eqk_iterations`` cut-offs of the filter ramp (FL -> FH), starting from the previous round's
        averages instead of blurring them back to FL. Default 3 (0.35, 0.40, 0.45 with the default FL, FH);
        0: the whole ramp in every round (SPHIRE: 6 iterations). The first ``full_ramp_rounds`` rounds of a
        generation always run the whole ramp. Measured: ``bench/isac2.md``, twelfth pass.
    full_ramp_rounds : int
        isavar extension: with ``round_eqk_iterations > 0``, the first this many SAC rounds of a generation run
        the whole filter ramp (the first starts from random images; the second blurs the first round's class
        averages back to FL once more), the later ones its last ``round_eqk_iterations`` cut-offs. Default 2:
        the classes of the run's first main iteration are tighter than with 1 (``bench/isac2.md``, sixteenth
        pass).
    later_round_floor : float
        isavar extension: in the generations after the run's first, ``round_stop``'s rule applies once the
        membership agreement is above this value (SPHIRE: 0.5 in every generation). Default 0: a later
        generation, on left-over images, also stops when an agreement below 0.5 fell or rose by less than
        0.05. Measured: ``bench/isac2.md``, tenth pass.
    member_check : float
        isavar extension: after the stability test, a stable member is kept only if its correlation, inside the
        particle disc, with the mean of the class's other stable members is at least this fraction of the
        class's median (:func:`isavar.isac.stability.member_check`); the others go back to the pool and the
        average is rebuilt without them. It removes the pure-noise images that aligned consistently by chance
        (``bench/isac2.md``, thirteenth pass). Default 0.5, the smallest fraction that removed every accepted
        noise image in 20 seeds of the 2,000-particle benchmark; 0: no check (SPHIRE).
    empty_stop : int
        isavar extension: a generation other than the run's first also stops after this many stability checks
        in a row at which its stable images, all classes together, were at most ``minimum_grp_size``: too few
        for even one accepted class (a subset of junk, typically a later main iteration's left-overs).
        Default 2; 0 never (SPHIRE runs such a generation to ``init_iter`` rounds).
    """

    radius: int
    img_per_grp: int = 200
    CTF: bool = False
    VPP: bool = False
    xr: int = 1
    yr: int = -1
    ts: float = 1.0
    thld_err: float | None = None
    target_radius: int = 26
    target_nx: int | None = None
    ir: int = 1
    rs: int = 1
    maxit: int = 18
    center_method: int = -1
    dst: float = 90.0
    FL: float = 0.2
    FH: float = 0.45
    FF: float = 0.2
    init_iter: int = 7
    iter_reali: int = 1
    stab_ali: int = 4
    minimum_grp_size: int = 60
    rand_seed: int | None = None
    skip_prealignment: bool = False
    restart: int = -1
    filament_width: int = -1
    filament_mask_ignore: bool = False
    skip_ordering: bool = False
    delta_good: int = 0
    # isavar extensions (not SPHIRE options)
    prealign_maxit: int = field(default=14, metadata={"help": "pre-alignment passes per translational step"})
    eqk_search: str = field(default="candidates", metadata={
        "help": "EQK search: 'candidates' (exact alignment against a few references per image chosen by a "
                "coarse score; cost linear in the number of images) or 'flat' (every image against every "
                "reference, SPHIRE)"})
    eqk_candidates: int = field(default=8, metadata={"help": "candidate references per image of the EQK search"})
    eqk_pairs: str = field(default="own", metadata={
        "help": "'candidates' EQK search: complete each image's correlations only against its own candidates "
                "('own') or against every reference of its group ('union')"})
    eqk_neighbours: int = field(default=0, metadata={
        "help": "EQK candidate search with more than 4x this many classes: score each image coarsely only "
                "against this many references nearest to its current class (0: against every reference)"})
    eqk_shift_candidates: int = field(default=0, metadata={
        "help": "EQK search: trial translations per image searched at every ring frequency, chosen by a "
                "low-frequency score against the image's references (0: all, SPHIRE)"})
    within_shift_candidates: int = field(default=0, metadata={
        "help": "within-group passes: trial translations per image searched exactly after a coarse score "
                "(0: all, SPHIRE)"})
    prealign_search: str = field(default="full", metadata={
        "help": "pre-alignment passes over the full translational range: 'coarse' (every second step, then "
                "+-1 step around the best) or 'full' (every step, SPHIRE)"})
    shift_search: str = field(default="references", metadata={
        "help": "trial translations of the pre-alignment on the reference (each image sampled once per pass) "
                "or on the images (sampled at every trial translation, SPHIRE)"})
    within_stop: float = field(default=0.5, metadata={
        "help": "within-group runs: stop once an alignment pass after the last discrete-angle pass moves no "
                "image by more than this many pixels (0: all maxit passes, SPHIRE)"})
    within_stop_fraction: float = field(default=0.01, metadata={
        "help": "within-group runs: the fraction of a group's images that may still move further than within_stop "
                "when the run stops (0: none)"})
    band_tol: float = field(default=1e-4, metadata={
        "help": "fraction of a reference's energy its left-out ring coefficients may hold in the correlations "
                "(0: all coefficients, SPHIRE)"})
    main_stop: float = field(default=0.2, metadata={
        "help": "a main iteration after the first whose first generation accepts fewer than this fraction of "
                "its classes ends the run (0: go on while any class is accepted, SPHIRE)"})
    round_stop: str = field(default="plateau", metadata={
        "help": "SAC rounds stop once the membership agreement (above 0.5) rose by less than 0.05: 'plateau' "
                "also when it fell, 'sphire' only when it rose"})
    round_agreement: float = field(default=0.8, metadata={
        "help": "SAC rounds also stop once the membership agreement with the previous check reaches this "
                "value (0: off, SPHIRE)"})
    round_eqk_iterations: int = field(default=3, metadata={
        "help": "SAC rounds after a generation's first: EQK iterations only at the last this many cut-offs of "
                "the filter ramp FL -> FH (0: the whole ramp in every round, SPHIRE)"})
    full_ramp_rounds: int = field(default=2, metadata={
        "help": "with round_eqk_iterations > 0: the first this many SAC rounds of a generation run the whole "
                "filter ramp FL -> FH"})
    later_round_floor: float = field(default=0.0, metadata={
        "help": "generations after the run's first: the agreement above which round_stop's rule may stop them "
                "(0.5: as the run's first generation, SPHIRE)"})
    member_check: float = field(default=0.5, metadata={
        "help": "after the stability test, keep a stable member only if its correlation with the mean of the "
                "class's other members is at least this fraction of the class's median (0: no check, SPHIRE)"})
    empty_stop: int = field(default=2, metadata={
        "help": "a generation stops after this many stability checks in a row with at most minimum_grp_size "
                "stable images in all (0: never, SPHIRE)"})

    def __post_init__(self):
        # the working box and the stability threshold follow the working scale unless given
        if self.target_nx is None:
            object.__setattr__(self, "target_nx", working_box(self.target_radius))
        if self.thld_err is None:
            object.__setattr__(self, "thld_err", stability_threshold(self.target_radius))

    # ------------------------------------------------------------------ derived values
    @property
    def yr_eff(self) -> int:
        """The y search range (``xr`` when ``yr == -1``)."""
        return self.xr if self.yr == -1 else self.yr

    @property
    def shrink(self) -> float:
        """Resampling ratio ``target_radius / radius`` (working pixels per input pixel)."""
        return self.target_radius / self.radius

    @property
    def box(self) -> int:
        """Effective working box ``target_nx + xr - 1``."""
        return self.target_nx + self.xr - 1

    @property
    def filament(self) -> bool:
        """True in filament (helical) mode."""
        return self.filament_width > 0

    def validate(self) -> "Isac2Params":
        """Check the values; raise :class:`~isavar.errors.InputError` naming the option."""
        def bad(opt, msg):
            raise InputError(f"--{opt}: {msg}")

        if self.radius is None or self.radius < 1:
            bad("radius", "the particle radius (pixels) is required and must be >= 1")
        if self.CTF and self.VPP:
            bad("VPP", "--CTF and --VPP cannot be used together")
        if self.img_per_grp < 2:
            bad("img_per_grp", "must be >= 2")
        if self.minimum_grp_size > self.img_per_grp:
            bad("minimum_grp_size", f"must be <= img_per_grp ({self.img_per_grp})")
        if self.xr < 0 or self.yr_eff < 0:
            bad("xr", "translational ranges must be >= 0")
        if self.ts <= 0:
            bad("ts", "must be > 0")
        if self.target_radius < 2 or self.target_radius >= self.box // 2:
            bad("target_radius", f"must be >= 2 and < half the working box ({self.box // 2})")
        if self.ir < 1 or self.rs < 1 or self.ir >= self.target_radius:
            bad("ir", "inner ring and ring step must be >= 1 and ir < target_radius")
        if self.maxit < 2:
            bad("maxit", "must be >= 2")
        if self.center_method not in range(-1, 8):
            bad("center_method", "must be one of -1, 0, 1, ..., 7")
        if self.dst < 0:
            bad("dst", "must be >= 0")
        if not (0 < self.FL <= self.FH <= 0.5) or self.FF <= 0:
            bad("FL", "need 0 < FL <= FH <= 0.5 and FF > 0")
        if self.init_iter < 1 or self.iter_reali < 1:
            bad("init_iter", "init_iter and iter_reali must be >= 1")
        if self.stab_ali < 2:
            bad("stab_ali", "must be >= 2")
        if self.thld_err <= 0:
            bad("thld_err", "must be > 0")
        if self.restart < -1:
            bad("restart", "must be -1, 0 or a main-iteration number")
        if self.eqk_search not in ("candidates", "flat"):
            bad("eqk_search", f"must be 'candidates' or 'flat', got {self.eqk_search!r}")
        if self.eqk_candidates < 1:
            bad("eqk_candidates", "must be >= 1")
        if self.eqk_neighbours < 0:
            bad("eqk_neighbours", "must be >= 0")
        if self.eqk_shift_candidates < 0:
            bad("eqk_shift_candidates", "must be >= 0")
        if self.within_shift_candidates < 0:
            bad("within_shift_candidates", "must be >= 0")
        if self.prealign_search not in ("coarse", "full"):
            bad("prealign_search", f"must be 'coarse' or 'full', got {self.prealign_search!r}")
        if self.shift_search not in ("references", "images"):
            bad("shift_search", f"must be 'references' or 'images', got {self.shift_search!r}")
        if self.round_eqk_iterations < 0:
            bad("round_eqk_iterations", "must be >= 0")
        if self.eqk_pairs not in ("own", "union"):
            bad("eqk_pairs", f"must be 'own' or 'union', got {self.eqk_pairs!r}")
        if self.full_ramp_rounds < 1:
            bad("full_ramp_rounds", "must be >= 1")
        if not 0 <= self.later_round_floor <= 1:
            bad("later_round_floor", "must be between 0 and 1")
        if not 0 <= self.round_agreement <= 1:
            bad("round_agreement", "must be between 0 and 1")
        if self.round_stop not in ("plateau", "sphire"):
            bad("round_stop", f"must be 'plateau' or 'sphire', got {self.round_stop!r}")
        if not 0 <= self.band_tol < 1:
            bad("band_tol", "must be >= 0 and < 1")
        if not 0 <= self.main_stop <= 1:
            bad("main_stop", "must be between 0 and 1")
        if not 0 <= self.member_check < 1:
            bad("member_check", "must be >= 0 and < 1")
        if self.empty_stop < 0:
            bad("empty_stop", "must be >= 0")
        if not self.within_stop >= 0:
            bad("within_stop", "must be >= 0")
        if not 0 <= self.within_stop_fraction < 1:
            bad("within_stop_fraction", "must be >= 0 and < 1")
        return self

    def to_dict(self) -> dict:
        """The parameters as a plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Isac2Params":
        """Build from a dict, ignoring unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_recorded(cls, data: dict) -> "Isac2Params":
        """The parameters a run recorded (its manifest): a field the run's isavar did not have yet takes the
        value that isavar behaved as (:data:`BEFORE_FIELD`), not today's default."""
        return cls.from_dict({**BEFORE_FIELD, **data})

    def science_dict(self) -> dict:
        """Parameters that change the result (everything but ``restart``)."""
        d = self.to_dict()
        d.pop("restart", None)
        return d


#: The isavar search options at SPHIRE's behaviour (flat EQK search, no within-group or empty-generation stop,
#: full correlations, SPHIRE's round and main-iteration rules).
SPHIRE_SEARCH = {"eqk_search": "flat", "eqk_pairs": "union", "eqk_neighbours": 0, "eqk_shift_candidates": 0,
                 "within_shift_candidates": 0, "prealign_search": "full",
                 "within_stop": 0.0, "within_stop_fraction": 0.0, "band_tol": 0.0, "main_stop": 0.0, "round_stop": "sphire",
                 "round_agreement": 0.0, "round_eqk_iterations": 0, "full_ramp_rounds": 1, "later_round_floor": 0.5,
                 "empty_stop": 0,
                 "member_check": 0.0,
                 "shift_search": "images"}
#: How isavar behaved before each of these options existed (SPHIRE's search), for runs recorded then.
BEFORE_FIELD = SPHIRE_SEARCH


def from_sphire_options(options=None, **kwargs) -> Isac2Params:
    """Build :class:`Isac2Params` from ``sp_isac2.py``-style options.

    Parameters
    ----------
    options : argparse.Namespace or dict, optional
        Attributes named like the SPHIRE options (``radius``, ``img_per_grp``, ``CTF``, ...);
        unknown attributes (``executor``, ``verbose``, ...) are ignored.
    **kwargs
        Further options overriding ``options``.

    Returns
    -------
    Isac2Params
        Validated parameters.
    """
    values = {}
    if options is not None:
        values.update(vars(options) if not isinstance(options, dict) else options)
    values.update(kwargs)
    return Isac2Params.from_dict(values).validate()


def sphire_142(radius: int, **overrides) -> Isac2Params:
    """SPHIRE 1.4.2's search for a particle radius: its defaults (``maxit`` 30, ``stab_ali`` 5,
    ``target_radius`` 29, hence ``target_nx`` 76 and ``thld_err`` 0.7) and every isavar extension
    that changes the search switched off (flat EQK search, no within-group or empty-generation stop, full
    correlations, SPHIRE's round and main-iteration rules), with optional overrides."""
    return from_sphire_options({"radius": radius, "maxit": 30, "stab_ali": 5, "target_radius": SPHIRE_TARGET_RADIUS,
                                **SPHIRE_SEARCH, **overrides})
