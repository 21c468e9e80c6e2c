"""ISAC stages: pre-alignment helpers, centring, within-group stability, a generation, ordering, driver."""

import numpy as np
import pytest

from isavar.isac import _ops
from isavar.isac.generation import EngineState, eqk_iteration, normalise_for_alignment, run_generation
from isavar.isac.ordering import apply_order, order_averages
from isavar.isac.params import Isac2Params, from_sphire_options
from isavar.isac.prealign import centre_of, centring_shifts, fit_tanh_to_frc, search_schedule
from isavar.isac.run import RunState, initial_state, isac2, make_grid
from isavar.isac.stability import class_stability_task
from isavar.errors import InputError
from isavar.parallel.serial import SerialExecutor

from isac_data import prototypes, small_params


def test_params_defaults_and_validation():
    p = Isac2Params(radius=50)
    # the working scale (issue 11): radius 26, SPHIRE's box and threshold scaled with it (76 and 0.7 at 29)
    assert (p.img_per_grp, p.thld_err, p.target_radius, p.target_nx, p.box, p.yr_eff) == (200, 0.628, 26, 68, 68, 1)
    assert p.shrink == pytest.approx(0.52)
    s = Isac2Params(radius=50, target_radius=29)
    assert (s.thld_err, s.target_nx) == (0.7, 76)
    assert Isac2Params(radius=50, target_radius=29, thld_err=0.5, target_nx=80).thld_err == 0.5
    assert Isac2Params.from_dict(p.to_dict()) == p                   # a recorded run keeps its values
    q = from_sphire_options({"radius": 40, "xr": 2, "executor": "pool", "verbose": 1})
    assert q.box == 69 and q.yr_eff == 2
    with pytest.raises(InputError, match="VPP"):
        from_sphire_options(radius=40, CTF=True, VPP=True)
    with pytest.raises(InputError, match="minimum_grp_size"):
        from_sphire_options(radius=40, img_per_grp=50)
    with pytest.raises(InputError, match="center_method"):
        from_sphire_options(radius=40, center_method=9)
    for name in ("eqk_shift_candidates", "later_round_floor"):
        with pytest.raises(InputError, match=name):
            from_sphire_options(radius=40, **{name: -1})


@pytest.mark.parametrize("nxs,expect", [(76, ([8, 4], [2, 1])), (74, ([4], [1])), (100, ([20, 8, 4], [5, 2, 1]))])
def test_prealignment_schedule(nxs, expect):
    assert search_schedule(nxs, 29) == expect


def test_fit_tanh_to_frc():
    freq = np.arange(33) / 64.0
    curve = 0.5 * (np.tanh(np.pi * (freq + 0.25) / (2 * 0.1 * 0.25)) - np.tanh(np.pi * (freq - 0.25) / (2 * 0.1 * 0.25)))
    half = curve / (2 - curve)                 # inverse of 2r/(1+r)
    fl, ff = fit_tanh_to_frc(half)
    assert 0.2 < fl < 0.3 and ff <= 0.2
    assert fit_tanh_to_frc(np.ones(33)) == (0.4, 0.2)


@pytest.mark.parametrize("method", [1, 2, 3, 4, 5, 6, 7])
def test_centring_methods_find_offset(method):
    n = 48
    y, x = np.mgrid[:n, :n] - n // 2
    img = np.exp(-((x - 3) ** 2 + (y + 2) ** 2) / (2 * 4.0 ** 2)).astype(np.float32)
    mask = _ops.circle(n, 16)
    c = centre_of(img, method, mask)
    assert np.allclose(c, [3, -2], atol=1.0), c


def test_centring_shifts_undo_rotation():
    # params (alpha, t): particle centre s = -R(-alpha) t; the centring shift moves it to the origin
    p = np.array([[30.0, 2.0, -1.0, 1]])
    s = _ops.particle_centre(p)
    assert np.allclose(centring_shifts(p, 0.5), -s / 0.5)


def test_within_group_stability_on_one_class():
    rng = np.random.default_rng(5)
    proto = prototypes(28)[0]
    n = 40
    truth = np.column_stack([rng.uniform(-180, 180, n), rng.normal(0, 0.7, n), rng.normal(0, 0.7, n),
                             rng.integers(0, 2, n)])
    imgs = _ops.transform(np.repeat(proto[None], n, 0), _ops.inverse(truth))
    imgs += rng.normal(0, 0.15, imgs.shape).astype(np.float32)
    p = small_params()
    out = class_stability_task((normalise_for_alignment(imgs, _ops.circle(28, 10)), np.zeros((n, 4)), p,
                                make_grid(p), rng, True))
    assert len(out["stable"]) >= 0.9 * n
    # stable params are truth up to one common transform G: truth^-1 composed with params is constant
    rel = _ops.compose(_ops.inverse(truth[out["stable"]]), out["params"][out["stable"]])
    assert np.all(rel[:, 3] == rel[0, 3])
    spread = (rel[:, 0] - rel[0, 0] + 180) % 360 - 180
    # a stable member disagrees by less than thld_err pixels at radius target_radius between runs:
    # about thld_err / target_radius radians (5.7 degrees here); the typical error is much smaller
    assert np.abs(spread).max() < np.rad2deg(p.thld_err / p.target_radius)
    assert np.std(spread) < 1.5
    assert out["pixel_error"] < 1.0


def _working_subset(imgs, p):
    from isavar.isac.preprocess import correct_and_shrink, finish_working_images
    import pandas as pd

    shrunk, _ = correct_and_shrink(imgs, pd.DataFrame(index=range(len(imgs))), p, None)
    working = finish_working_images(shrunk, np.zeros((len(imgs), 2)), None, p)
    return normalise_for_alignment(working, _ops.circle(p.box, p.target_radius))


def test_generation_recovers_planted_classes(planted):
    imgs, truth, _ = planted
    p = small_params()
    res = run_generation(_working_subset(imgs, p), p, make_grid(p), SerialExecutor(), main=1, gen=1)
    assert len(res.members) == len(imgs) // p.img_per_grp
    big = [m for m in res.members if len(m) > p.minimum_grp_size]
    assert len(big) >= 3
    for m in big:                                    # classes are pure in the planted prototypes
        labels = truth[m][truth[m] >= 0]
        assert np.bincount(labels).max() >= 0.95 * len(labels)


def test_eqk_iteration_uses_the_given_assignment_rule(planted):
    # classes held at the planted truth (noise in class 0) make the references averages of the planted
    # classes; one iteration with SPHIRE's equal-size rule against them keeps the planted classes
    imgs, truth, _ = planted
    p = small_params()
    sub, grid = _working_subset(imgs, p), make_grid(p)
    fixed = np.where(truth >= 0, truth, 0)
    refs, params = sub[:4].copy(), np.zeros((len(sub), 4))
    for it in range(3):
        refs, params, got = eqk_iteration(sub, refs, params, p.FH, p, grid, SerialExecutor(),
                                          np.random.default_rng(it), assign=lambda scores: fixed)
        assert np.array_equal(got, fixed)
    _, _, got = eqk_iteration(sub, refs, params, p.FH, p, grid, SerialExecutor(), np.random.default_rng(9))
    assert sorted(np.bincount(got).tolist()) == [57, 57, 57, 59]    # equal sizes; the last class closed: the rest
    real = truth >= 0
    assert np.mean(got[real] == truth[real]) >= 0.9


@pytest.mark.parametrize("pairs", ["own", "union"])
def test_candidate_eqk_search_matches_the_flat_search(planted, pairs):
    """The candidate search (1 candidate of 4 references, so every group of images is aligned exactly to only
    part of the references; with ``eqk_pairs = own`` every image to its own candidate only) assigns like
    SPHIRE's flat search, whatever the executor."""
    from isavar.parallel.pool import PoolExecutor

    imgs, truth, _ = planted
    p = small_params(eqk_search="candidates", eqk_candidates=1, eqk_pairs=pairs)
    sub, grid = _working_subset(imgs, p), make_grid(p)
    fixed = np.where(truth >= 0, truth, 0)
    refs, params = sub[:4].copy(), np.zeros((len(sub), 4))
    flat = small_params(eqk_search="flat")
    for it in range(2):
        refs, params, _ = eqk_iteration(sub, refs, params, p.FH, flat, grid, SerialExecutor(),
                                        np.random.default_rng(it), assign=lambda scores: fixed)
    got = {}
    for name, q in (("candidates", p), ("flat", flat)):
        got[name] = eqk_iteration(sub, refs, params, p.FH, q, grid, SerialExecutor(), np.random.default_rng(9))
    real = truth >= 0
    assert np.mean(got["candidates"][2][real] == got["flat"][2][real]) >= 0.97
    assert np.mean(got["candidates"][2][real] == truth[real]) >= 0.9
    assert sorted(np.bincount(got["candidates"][2]).tolist()) == [57, 57, 57, 59]
    pool = PoolExecutor(2)
    try:
        again = eqk_iteration(sub, refs, params, p.FH, p, grid, pool, np.random.default_rng(9))
    finally:
        pool.close()
    for a, b in zip(again, got["candidates"]):
        np.testing.assert_array_equal(a, b)


def test_isac2_in_memory_end_to_end(planted):
    imgs, truth, _ = planted
    res = isac2(imgs, small_params())
    assert res.n_classes >= 3
    acc = res.accounted
    assert len(acc) >= 0.5 * len(imgs)
    for m in res.members:
        labels = truth[m][truth[m] >= 0]
        assert np.bincount(labels).max() >= 0.95 * len(labels)
    assert sorted(res.order.tolist()) == list(range(res.n_classes))
    assert (res.params[acc, 3] >= 0).all()
    assert (res.params[np.setdiff1d(np.arange(len(imgs)), acc), 3] == -1).all()


def test_results_do_not_depend_on_executor(planted):
    from isavar.parallel.pool import PoolExecutor

    imgs, _, _ = planted
    p = small_params(init_iter=1, maxit=6)
    a = isac2(imgs[:150], p)
    pool = PoolExecutor(2)
    try:
        b = isac2(imgs[:150], p, executor=pool)
    finally:
        pool.close()
    assert np.array_equal(a.params, b.params)
    assert np.array_equal(a.averages, b.averages)


def test_seed_changes_random_choices(planted):
    imgs, _, _ = planted
    p1 = small_params(init_iter=1, maxit=6, rand_seed=1)
    p2 = small_params(init_iter=1, maxit=6, rand_seed=2)
    from isavar.isac.generation import start_generation

    a = start_generation(imgs, p1, main=1, gen=1)
    b = start_generation(imgs, p2, main=1, gen=1)
    assert not np.array_equal(a.refs, b.refs)
    assert np.array_equal(a.refs, start_generation(imgs, p1, main=1, gen=1).refs)


@pytest.mark.parametrize("n_avg", [1, 2, 3, 7])
def test_ordering_any_number_seeded(n_avg):
    rng = np.random.default_rng(n_avg)
    protos = prototypes(28)
    avgs = protos[rng.integers(0, 4, n_avg)]
    par = np.column_stack([rng.uniform(-180, 180, n_avg), np.zeros(n_avg), np.zeros(n_avg),
                           rng.integers(0, 2, n_avg)])
    avgs = _ops.transform(avgs, par)
    p = small_params()
    o1, q1 = order_averages(avgs, p)
    o2, q2 = order_averages(avgs, p)
    assert sorted(o1.tolist()) == list(range(n_avg))
    assert np.array_equal(o1, o2) and np.array_equal(q1, q2)
    assert apply_order(avgs, o1, q1).shape == avgs.shape


def test_ordering_brings_copies_into_one_frame():
    rng = np.random.default_rng(3)
    proto = prototypes(28)[0]
    n = 6
    par = np.column_stack([rng.uniform(-180, 180, n), np.zeros(n), np.zeros(n), rng.integers(0, 2, n)])
    avgs = _ops.transform(np.repeat(proto[None], n, 0), par)
    order, q = order_averages(avgs, small_params())
    ordered = apply_order(avgs, order, q)
    mask = _ops.circle(28, 10) > 0.5
    ref = ordered[0][mask]
    for img in ordered[1:]:
        assert np.corrcoef(ref, img[mask])[0, 1] > 0.95


def test_run_state_round_trip():
    p = small_params()
    st = initial_state(120, p)
    st.averages = [np.ones((28, 28), np.float32)]
    st.members = [np.array([1, 5, 7])]
    st.pixel_errors = [0.3]
    st.origin = [(1, 1)]
    st.engine = EngineState(params=np.zeros((120, 4)), refs=np.zeros((2, 28, 28), np.float32),
                            members=[np.array([1]), np.array([], np.int64)], prev_members=None,
                            pixel_errors=np.zeros(2), mirror_rates=np.ones(2))
    back = RunState.from_arrays(st.to_arrays())
    assert back.n_total == 120 and back.members[0].tolist() == [1, 5, 7]
    assert back.engine.members[1].size == 0 and back.engine.prev_members is None
    assert np.array_equal(back.params, st.params)


def test_too_few_images_is_input_error():
    with pytest.raises(InputError, match="img_per_grp"):
        initial_state(30, small_params())


def _ctf_table(n, rng):
    import pandas as pd

    return pd.DataFrame({"defocus_u_A": rng.uniform(8000, 20000, n), "defocus_v_A": rng.uniform(8000, 20000, n),
                         "defocus_angle_deg": rng.uniform(0, 180, n), "voltage_kV": 300.0, "cs_mm": 2.7,
                         "amplitude_contrast": 0.1, "segment_angle_deg": rng.uniform(0, 180, n)})


@pytest.mark.parametrize("options", [
    dict(VPP=True),
    dict(CTF=True, center_method=2, iter_reali=2, init_iter=2),
    dict(filament_width=12, center_method=4),
    dict(filament_width=12, filament_mask_ignore=True, skip_prealignment=True, skip_ordering=True),
])
def test_modes_run_end_to_end(planted, options):
    imgs, truth, _ = planted
    rng = np.random.default_rng(0)
    sel = np.r_[0:50, 50:100, 200:230]
    p = small_params(maxit=6, init_iter=options.pop("init_iter", 1), stab_ali=3, **options)
    res = isac2(imgs[sel], p, table=_ctf_table(len(sel), rng), pixel_size_A=2.0)
    assert res.params.shape == (len(sel), 4)
    assert res.n_classes == len(res.members) and res.averages.shape[1:] == (p.box, p.box)
    assert np.isfinite(res.averages).all()
    if p.skip_ordering:
        assert res.order is None
    if p.skip_prealignment:
        assert not res.prealign_shifts.any()


def test_iter_reali_last_round_is_checked(planted, monkeypatch):
    """Q10: with iter_reali = 3 and 3 rounds, round 1 checks stability, round 2 not, round 3 because it is last."""
    from isavar.isac import generation

    flags = []

    def spy(task):
        flags.append(task[-1])                                  # the task's check-stability flag
        return class_stability_task(task)

    monkeypatch.setattr(generation, "class_stability_task", spy)
    imgs, _, _ = planted
    p = small_params(maxit=6, init_iter=3, iter_reali=3)
    res = isac2(imgs[:150], p)
    assert res.history and res.history[0]["rounds"] == 3
    n_classes = 150 // p.img_per_grp
    assert flags[:3 * n_classes] == [True] * n_classes + [False] * n_classes + [True] * n_classes


def test_filter_ramp_accumulates_as_sphire():
    """Q3: 0.2 -> 0.45 in steps of 0.05 summed in floating point gives 6 cut-offs, the last just below 0.45."""
    from isavar.isac.generation import filter_ramp

    ramp = filter_ramp(0.2, 0.45)
    assert len(ramp) == 6 and ramp[0] == 0.2 and 0.4499 < ramp[-1] < 0.45
    assert filter_ramp(0.3, 0.3) == [0.3]


def test_round_ramp_keeps_the_last_cut_offs():
    """``round_ramp``: the whole ramp in the first ``full_ramp_rounds`` rounds and with m = 0 or m beyond the
    ramp, else its last m."""
    from isavar.isac.generation import filter_ramp, round_ramp

    ramp = filter_ramp(0.2, 0.45)
    for m, later in [(0, ramp), (3, ramp[3:]), (1, ramp[5:]), (6, ramp), (9, ramp)]:
        for full in (1, 2, 3):
            p = small_params(round_eqk_iterations=m, full_ramp_rounds=full)
            assert [round_ramp(p, r) for r in range(6)] == [ramp] * full + [later] * (6 - full)
    assert round_ramp(small_params(round_eqk_iterations=3), 1) == ramp      # the default: 2 rounds in full
    assert round_ramp(small_params(round_eqk_iterations=3), 2) == ramp[3:]


@pytest.mark.parametrize("m,full,later", [(0, 1, [0.2, 0.25, 0.3, 0.35, 0.4, 0.45]), (3, 1, [0.35, 0.4, 0.45]),
                                          (3, 2, [0.2, 0.25, 0.3, 0.35, 0.4, 0.45])])
def test_later_rounds_run_the_last_cut_offs_of_the_ramp(planted, monkeypatch, m, full, later):
    """``round_eqk_iterations = m``: a generation's first ``full_ramp_rounds`` rounds run the whole ramp FL -> FH,
    the later rounds its last ``m`` cut-offs (m = 0: the whole ramp, as SPHIRE)."""
    from isavar.isac import generation

    cut_offs = []
    real = generation.eqk_iteration

    def spy(images, refs, params, fl, *args, **kwargs):
        cut_offs.append(round(fl, 6))
        return real(images, refs, params, fl, *args, **kwargs)

    monkeypatch.setattr(generation, "eqk_iteration", spy)
    monkeypatch.setattr(generation, "converged", lambda *a: False)
    imgs, _, _ = planted
    p = small_params(maxit=6, init_iter=2, round_eqk_iterations=m, full_ramp_rounds=full)
    res = run_generation(_working_subset(imgs[:150], p), p, make_grid(p), SerialExecutor(), main=1, gen=1)
    assert res.rounds == 2
    assert cut_offs == [0.2, 0.25, 0.3, 0.35, 0.4, 0.45] + later


@pytest.mark.parametrize("main,floor", [(1, 0.5), (2, 0.1)])
def test_later_round_floor_applies_after_the_runs_first_generation(planted, monkeypatch, main, floor):
    """``later_round_floor`` is the agreement floor of the round-stop rule in every generation but the run's
    first, which keeps SPHIRE's 0.5."""
    from isavar.isac import generation

    floors = []

    def spy(now, before, rule, level, floor_):
        floors.append(floor_)
        return False

    monkeypatch.setattr(generation, "converged", spy)
    imgs, _, _ = planted
    p = small_params(maxit=6, init_iter=2, later_round_floor=0.1)
    run_generation(_working_subset(imgs[:150], p), p, make_grid(p), SerialExecutor(), main=main, gen=1)
    assert floors == [floor]


def _finished_generation(n_total, members_per_class, p, *, gen=1, main=1):
    """A run state whose current generation (on every image) ends with the given stable members."""
    from isavar.isac.run import finish_generation

    state = initial_state(n_total, p)
    state.gen, state.main = gen, main
    k = len(members_per_class)
    state.engine = EngineState(params=np.zeros((n_total, 4)), refs=np.zeros((k, 8, 8), np.float32),
                               members=[np.asarray(m, np.int64) for m in members_per_class],
                               pixel_errors=np.zeros(k), mirror_rates=np.ones(k))
    return finish_generation(state, p)


def test_unstable_members_of_accepted_classes_return_to_the_pool():
    """Q7: every class accepted, a third of the images unstable -> a new main iteration on those images."""
    p = small_params(img_per_grp=50, minimum_grp_size=20)
    members = [np.arange(k * 90, k * 90 + 60) for k in range(5)]         # 5 classes: 60 stable of 90 each
    state, event = _finished_generation(450, members, p)
    assert event.good == [0, 1, 2, 3, 4] and event.bad.size == 0
    assert not state.finished and (state.main, state.gen) == (2, 1)
    unstable = np.setdiff1d(np.arange(450), np.concatenate(members))
    assert np.array_equal(state.subset, unstable)                       # 150 = 3 x img_per_grp images
    assert np.array_equal(state.processed, np.sort(np.concatenate(members)))


def test_rejected_classes_make_the_next_generation_and_few_images_end_the_run():
    p = small_params(img_per_grp=50, minimum_grp_size=20)
    rejected = [np.arange(100 * k, 100 * k + 20) for k in range(1, 6)]     # 20 stable: not > minimum_grp_size
    members = [np.arange(0, 60)] + rejected + [np.arange(600, 660)]
    state, event = _finished_generation(800, members, p)
    assert event.good == [0, 6] and not event.end_main             # int(1.2 x 100) >= 2 x img_per_grp
    assert (state.main, state.gen) == (1, 2)
    assert np.array_equal(state.subset, np.concatenate(rejected))       # only their stable members (spec 7.2)
    # fewer than 2 x img_per_grp images left unaccounted: the run ends
    state, event = _finished_generation(200, [np.arange(0, 60), np.arange(100, 160)], p)
    assert event.end_main and state.finished


def test_first_generation_with_too_few_good_classes_ends_the_run():
    p = small_params(img_per_grp=50, minimum_grp_size=20, delta_good=1)
    members = [np.arange(0, 60)] + [np.arange(100 * k, 100 * k + 5) for k in range(1, 8)]
    state, event = _finished_generation(800, members, p)
    assert event.good == [0] and event.end_main and state.finished
    state, event = _finished_generation(800, members, p, gen=2)           # not in a later generation:
    assert not state.finished and (state.main, state.gen) == (2, 1)       # few rejected -> next main


def test_main_iteration_accepting_few_of_its_classes_ends_the_run():
    """--main_stop: after the first main iteration, a first generation accepting fewer than that fraction of
    its classes ends the run (its accepted class kept); SPHIRE's rule (0) goes on while any class is accepted."""
    members = [np.arange(0, 60)] + [np.arange(100 * k, 100 * k + 15) for k in range(1, 10)]   # 1 of 10 good
    for main, main_stop, ends in [(2, 0.2, True), (2, 0.1, False), (2, 0.0, False), (1, 0.2, False)]:
        p = small_params(img_per_grp=50, minimum_grp_size=20, main_stop=main_stop)
        state, event = _finished_generation(1000, members, p, main=main)
        assert event.good == [0] and len(state.members) == 1
        assert state.finished == ends, (main, main_stop)
        if not ends:
            assert (state.main, state.gen) == (main, 2)              # 135 rejected images: the next generation
    with pytest.raises(InputError, match="main_stop"):
        small_params(main_stop=1.5).validate()


def test_candidate_search_generation_resumes_identically(planted):
    """A generation with the candidate EQK search and coarse-to-fine within-group passes, checkpointed after
    its first SAC round (state to arrays and back, as after a kill) and continued, equals the uninterrupted
    one."""
    imgs, _truth, _ = planted
    p = small_params(eqk_search="candidates", eqk_candidates=1, init_iter=2)
    sub, grid = _working_subset(imgs, p), make_grid(p)
    saved = []
    full = run_generation(sub, p, grid, SerialExecutor(), main=1, gen=1,
                          on_round=lambda st: saved.append(st.to_arrays()))
    state = EngineState.from_arrays(saved[0])
    resumed = run_generation(sub, p, grid, SerialExecutor(), main=1, gen=1, state=state)
    np.testing.assert_array_equal(resumed.params, full.params)
    np.testing.assert_array_equal(resumed.averages, full.averages)
    assert [m.tolist() for m in resumed.members] == [m.tolist() for m in full.members]
