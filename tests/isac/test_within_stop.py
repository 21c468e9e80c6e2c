"""Cheaper searches of issue 11: the within-group convergence stop and the coarse-to-fine pre-alignment range."""

import numpy as np
import pytest

from isavar.isac import _ops, prealign, stability
from isavar.isac.generation import normalise_for_alignment
from isavar.isac.params import Isac2Params
from isavar.isac.run import make_grid
from isavar.isac.stability import class_stability_task, last_discrete_pass, max_displacement
from isavar.parallel.serial import SerialExecutor

from isac_data import prototypes, small_params


def test_max_displacement_hand_worked():
    old = np.array([[10.0, 0.0, 0.0, 0], [0.0, 1.0, 1.0, 1]])
    # image 0: rotated by 60 degrees -> chord 2 sin(30 deg) r = r; image 1: shifted by (3, 4) -> 5 px
    new = np.array([[70.0, 0.0, 0.0, 0], [0.0, 4.0, 5.0, 1]])
    assert max_displacement(old, new, 10.0) == pytest.approx(10.0)
    assert max_displacement(old, new, 2.0) == pytest.approx(5.0)
    # the angle wraps: 179 -> -179 is a 2 degree turn
    assert max_displacement(np.array([[179.0, 0, 0, 0]]), np.array([[-179.0, 0, 0, 0]]), 29.0) == pytest.approx(
        2 * np.sin(np.deg2rad(1.0)) * 29.0)
    flipped = new.copy()
    flipped[0, 3] = 1
    assert max_displacement(old, flipped, 10.0) == np.inf
    assert max_displacement(np.zeros((0, 4)), np.zeros((0, 4)), 10.0) == 0.0


def test_settled_lets_the_fraction_rounded_down_move_on():
    """``settled``: at most ``floor(fraction * n)`` images may move further than the tolerance (a mirror change
    counts as far); fraction 0 is the ``max_displacement`` rule."""
    from isavar.isac.stability import displacements, settled

    n = 200
    old = np.zeros((n, 4))
    new = old.copy()
    new[:, 1] = 0.3                                     # every image moves 0.3 px
    new[0, 1], new[1, 3] = 2.0, 1                       # one moves 2 px, one changes its mirror
    assert displacements(old, new, 10.0)[1] == np.inf
    assert not settled(old, new, 10.0, 0.5) and not settled(old, new, 10.0, 0.5, 0.005)    # 1 of 200 allowed
    assert settled(old, new, 10.0, 0.5, 0.01) and settled(old, new, 10.0, 0.5, 0.014)       # 2 of 200
    assert settled(old, new, 10.0, 2.5, 0.005) and not settled(old, new, 10.0, 2.5)         # only the mirror
    assert settled(old[:60], new[:60] * [1, 0, 0, 0], 10.0, 0.5, 0.01)     # 60 images: none may move, none did
    assert not settled(old[:60], new[:60], 10.0, 0.5, 0.01)
    for fraction in (0.0, 0.01):
        assert settled(old, old, 10.0, 0.0, fraction) and settled(old[:0], old[:0], 10.0, 0.5, fraction)


@pytest.mark.parametrize("maxit,dst,expect", [(30, 90.0, 16), (18, 90.0, 4), (14, 90.0, 0), (8, 90.0, -1),
                                              (30, 0.0, -1)])
def test_last_discrete_pass_follows_sphire_schedule(maxit, dst, expect):
    p = Isac2Params(radius=50, maxit=maxit, dst=dst)
    assert last_discrete_pass(p) == expect
    passes = [it for it in range(maxit - 1) if stability.discrete_delta(it, it + 1, maxit, dst)]
    assert (passes[-1] if passes else -1) == expect


def _planted_class(n=40, seed=5):
    rng = np.random.default_rng(seed)
    proto = prototypes(28)[0]
    truth = np.column_stack([rng.uniform(-180, 180, n), rng.normal(0, 0.7, n), rng.normal(0, 0.7, n),
                             rng.integers(0, 2, n)])
    imgs = _ops.transform(np.repeat(proto[None], n, 0), _ops.inverse(truth))
    imgs += rng.normal(0, 0.15, imgs.shape).astype(np.float32)
    return normalise_for_alignment(imgs, _ops.circle(28, 10)), truth, rng


def _count_passes(monkeypatch):
    calls = []
    orig = _ops.align_single

    def spy(*args, **kwargs):
        calls.append(args[5])                      # delta of the pass
        return orig(*args, **kwargs)

    monkeypatch.setattr(_ops, "align_single", spy)
    return calls


@pytest.mark.parametrize("within_stop,fraction", [(0.0, 0.0), (0.5, 0.0), (0.5, 0.05)])
def test_within_stop_ends_runs_early_and_keeps_the_planted_alignment(monkeypatch, within_stop, fraction):
    imgs, truth, rng = _planted_class()
    p = small_params(maxit=18, stab_ali=3, within_stop=within_stop, within_stop_fraction=fraction)
    calls = _count_passes(monkeypatch)
    out = class_stability_task((imgs, np.zeros((len(imgs), 4)), p, make_grid(p), rng, True))
    per_run = len(calls) / p.stab_ali
    if within_stop == 0:
        assert len(calls) == p.stab_ali * (p.maxit - 1)          # SPHIRE: every pass of every run
    else:
        # the discrete passes (0 and 4) are always run; a clean class settles a few passes later
        assert last_discrete_pass(p) + 2 <= per_run < p.maxit - 1
        assert sum(d != 0 for d in calls) == 2 * p.stab_ali
    assert len(out["stable"]) >= 0.9 * len(imgs)
    rel = _ops.compose(_ops.inverse(truth[out["stable"]]), out["params"][out["stable"]])
    assert np.all(rel[:, 3] == rel[0, 3])
    spread = (rel[:, 0] - rel[0, 0] + 180) % 360 - 180
    assert np.abs(spread).max() < np.rad2deg(p.thld_err / p.target_radius)
    assert out["pixel_error"] < 1.0


def test_within_stop_leaves_pure_noise_unstable():
    rng = np.random.default_rng(8)
    imgs = normalise_for_alignment(rng.normal(0, 1, (60, 28, 28)).astype(np.float32), _ops.circle(28, 10))
    p = small_params(maxit=18, stab_ali=5, thld_err=0.7, within_stop=0.5)
    out = class_stability_task((imgs, np.zeros((60, 4)), p, make_grid(p), rng, True))
    assert len(out["stable"]) < p.minimum_grp_size


def test_within_stop_average_is_the_final_pass_average():
    """Stopped or not, the returned average is the FH-filtered real-space average of the returned params."""
    imgs, _truth, rng = _planted_class()
    p = small_params(maxit=18, within_stop=0.5)
    avg, params = stability.within_group_refinement(imgs, np.zeros((len(imgs), 4)), p, make_grid(p), rng)
    expect = _ops.tanh_lowpass(_ops.transform_sum(imgs, params) / np.float32(len(imgs)), p.FH, p.FF)
    np.testing.assert_allclose(avg, expect, rtol=0, atol=1e-6)


@pytest.mark.parametrize("search,shift_search", [("full", "references"), ("full", "images"),
                                                  ("coarse", "references")])
def test_prealign_range_recovers_planted_shifts(search, shift_search):
    """A full-range pass (+-4 px, step 1) finds integer shifts of a centred reference, coarse to fine or not,
    with the trial translations on the reference (the default) or on the images (SPHIRE)."""
    rng = np.random.default_rng(2)
    proto = prototypes(40)[2]
    shifts = rng.integers(-4, 5, (30, 2)).astype(float)
    imgs = _ops.fshift(np.repeat(proto[None], 30, 0), shifts)
    imgs += rng.normal(0, 0.05, imgs.shape).astype(np.float32)
    p = Isac2Params(radius=30, target_radius=12, target_nx=40, prealign_search=search, shift_search=shift_search)
    from isavar.core.polar import polar_grid

    out = prealign._align_range(imgs, proto, np.zeros((30, 4)), p, polar_grid(1, 12, 1), 4, 1, 0.0,
                                SerialExecutor(), 16)
    # the parameters move the particle back to the centre: its centre in the image is the planted shift
    np.testing.assert_allclose(_ops.particle_centre(out), shifts, atol=0.3)


@pytest.mark.parametrize("now,before,sphire,plateau", [
    (0.80, 0.79, True, True),        # rose by less than 0.05
    (0.80, 0.70, False, False),      # still rising
    (0.75, 0.80, False, True),       # fell: SPHIRE runs on, "plateau" stops
    (0.80, 0.80, False, True),       # unchanged
    (0.45, 0.44, False, False),      # below 0.5: never
    (0.45, 0.60, False, False),
])
def test_round_stop_rules(now, before, sphire, plateau):
    from isavar.isac.generation import converged

    assert converged(now, before, "sphire") is sphire
    assert converged(now, before, "plateau") is plateau
    # --round_agreement: an agreement at or above the level stops under either rule; 0 leaves the rules as they are
    for rule in ("sphire", "plateau"):
        assert converged(now, before, rule, level=0.8) is (now >= 0.8 or converged(now, before, rule))
        assert converged(now, before, rule, level=0.0) is converged(now, before, rule)
    # --later_round_floor: below 0.5 the rules apply from the given floor; 0.5 is the default
    low = {(0.45, 0.44): (True, True), (0.45, 0.60): (False, True)}.get((now, before), (sphire, plateau))
    assert converged(now, before, "sphire", floor=0.0) is low[0]
    assert converged(now, before, "plateau", floor=0.0) is low[1]
    assert converged(now, before, "plateau", floor=0.5) is plateau
    assert not converged(0.0, 0.0, "plateau", floor=0.0)          # no stable members twice: not a plateau
    assert not converged(0.03, 0.0, "plateau", floor=0.0)         # a first agreement is not a plateau
    assert converged(0.03, 0.02, "plateau", floor=0.0)


def test_band_limited_within_group_keeps_the_planted_alignment():
    # the band-limited correlations (--band_tol) keep the stability stage's outcome on a planted class
    imgs, truth, _rng = _planted_class()
    grid = make_grid(small_params())
    outs = {}
    for tol in (0.0, 1e-4):
        p = small_params(maxit=18, stab_ali=3, band_tol=tol)
        outs[tol] = class_stability_task((imgs, np.zeros((len(imgs), 4)), p, grid, np.random.default_rng(3), True))
    full, lim = outs[0.0], outs[1e-4]
    assert len(lim["stable"]) >= 0.9 * len(imgs)
    assert abs(len(lim["stable"]) - len(full["stable"])) <= 2


@pytest.mark.parametrize("empty_stop,main", [(0, 2), (2, 2), (2, 1)])
def test_empty_stop_ends_a_generation_of_pure_noise(empty_stop, main):
    """A generation whose stable images could not make one accepted class stops after ``empty_stop`` such
    checks in a row (SPHIRE, 0: runs to ``init_iter``), except the run's first generation; its state carries
    the count through a checkpoint."""
    from isavar.isac.generation import EngineState, run_generation, start_generation, sac_round

    rng = np.random.default_rng(3)
    imgs = normalise_for_alignment(rng.normal(0, 1, (100, 28, 28)).astype(np.float32), _ops.circle(28, 10))
    p = small_params(init_iter=4, maxit=8, stab_ali=3, thld_err=0.5, empty_stop=empty_stop, round_stop="sphire")
    grid = make_grid(p)
    rounds = []
    res = run_generation(imgs, p, grid, SerialExecutor(), main=main, gen=1,
                         on_round=lambda st: rounds.append(sum(len(m) for m in st.members)))
    assert all(n <= p.minimum_grp_size for n in rounds)                  # pure noise: nothing stable
    assert res.rounds == (empty_stop if empty_stop and main > 1 else p.init_iter)
    state = sac_round(imgs, start_generation(imgs, p, main=2, gen=1), p, grid, SerialExecutor(), main=2, gen=1)
    assert state.empty_checks == 1
    back = EngineState.from_arrays(state.to_arrays())
    assert back.empty_checks == 1 and not back.done
    old = {k: v for k, v in state.to_arrays().items() if k != "empty_checks"}   # a checkpoint of an older isavar
    assert EngineState.from_arrays(old).empty_checks == 0


def test_empty_stop_keeps_a_generation_with_stable_classes():
    """Planted classes are stable from the first check: the count stays 0 and the generation runs as before."""
    from isavar.isac.generation import run_generation
    from isac_data import planted_stack

    imgs, truth, _ = planted_stack(n_per=50, n_noise=0, snr=1.0, box=28)
    imgs = normalise_for_alignment(imgs, _ops.circle(28, 10))
    p = small_params(init_iter=2, maxit=8, stab_ali=3)
    res = run_generation(imgs, p, make_grid(p), SerialExecutor(), main=1, gen=1)
    assert res.rounds == 2
    assert sum(len(m) for m in res.members) > p.minimum_grp_size


def test_a_recorded_run_keeps_the_behaviour_of_fields_it_did_not_have():
    """Resuming a run recorded before a field existed compares against how isavar behaved then."""
    recorded = Isac2Params(radius=50).to_dict()
    for name in ("empty_stop", "main_stop", "round_stop", "round_eqk_iterations", "member_check"):
        del recorded[name]
    old = Isac2Params.from_recorded(recorded)
    assert (old.empty_stop, old.main_stop, old.round_stop, old.round_eqk_iterations, old.member_check) == \
        (0, 0.0, "sphire", 0, 0.0)
    assert old.maxit == 18 and old.within_stop == 0.5               # recorded values are kept
    # a run of the 16th-19th sessions (round_eqk_iterations recorded, these three not yet)
    recorded = Isac2Params(radius=50).to_dict()
    for name in ("full_ramp_rounds", "eqk_pairs", "within_stop_fraction"):
        del recorded[name]
    old = Isac2Params.from_recorded(recorded)
    assert (old.round_eqk_iterations, old.full_ramp_rounds, old.eqk_pairs, old.within_stop_fraction) == \
        (3, 1, "union", 0.0)
    assert Isac2Params.from_recorded(Isac2Params(radius=50).to_dict()) == Isac2Params(radius=50)
