"""Equal-size assignment and the stability (pixel-error) test."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isavar.isac.kmeans import assign_groups, assign_groups_sparse
from isavar.isac.stability import (mean_error_and_gradient, mirror_consistent, multi_align_stability,
                                   pixel_errors_squared)


def test_assign_groups_hand_worked_3x7():
    # q = 2, r = 1. Sorted pairs: (0,0)=.99 (0,1)=.98 -> class 0 closed at 2 members;
    # (1,2)=.97 (2,3)=.96 (1,0) skip (img 0 taken) (2,4)=.94 -> class 2 closed;
    # (1,5)=.93 -> class 1 has 2 but is the last open class, closes at q + r = 3;
    # (0,6) skip (class 0 closed) (1,6)=.80 -> class 1 closed with 3.
    d = np.zeros((3, 7))
    d[0, 0], d[0, 1], d[1, 2], d[2, 3], d[1, 0], d[2, 4], d[1, 5], d[0, 6], d[1, 6] = (
        .99, .98, .97, .96, .95, .94, .93, .92, .80)
    got = assign_groups(d)
    assert got.tolist() == [0, 0, 1, 2, 2, 1, 1]


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(0, 40), st.integers(0, 10_000))
def test_assign_groups_sizes(k, extra, seed):
    n = k + extra
    d = np.random.default_rng(seed).normal(size=(k, n))
    a = assign_groups(d)
    sizes = np.sort(np.bincount(a, minlength=k))
    q, r = divmod(n, k)
    assert (a >= 0).all()
    assert sizes.tolist() == sorted([q] * (k - 1) + [q + r])


def test_assign_groups_recovers_clear_clusters():
    rng = np.random.default_rng(1)
    truth = np.repeat(np.arange(4), 25)
    d = rng.normal(0, 0.1, size=(4, 100))
    d[truth, np.arange(100)] += 1.0
    assert (assign_groups(d) == truth).all()


def test_mirror_consistent_finds_flip_pattern():
    rng = np.random.default_rng(0)
    m0 = rng.integers(0, 2, size=50)
    flips = np.array([0, 1, 0, 1, 1])
    mirrors = m0[None] ^ flips[:, None]
    mirrors[2, :5] ^= 1                      # 5 inconsistent members
    ok, got = mirror_consistent(mirrors)
    assert got.tolist() == flips.tolist()
    assert ok.sum() == 45 and not ok[:5].any()


def test_pixel_error_identity_and_single_angle_perturbation():
    # spec T4: L identical runs -> e = 0; one run's angle off by delta -> e^2 = r^2 (1 - |L-1+e^{i delta}|/L)
    rng = np.random.default_rng(2)
    n, L, d = 30, 5, 58.0
    base = np.column_stack([rng.uniform(-180, 180, n), rng.normal(0, 1, n), rng.normal(0, 1, n),
                            rng.integers(0, 2, n)])
    ali = np.repeat(base[None], L, axis=0)
    assert np.allclose(pixel_errors_squared(ali, np.zeros((L, 3)), d), 0, atol=1e-9)
    delta = 7.0
    ali[1, 3, 0] += delta
    e2 = pixel_errors_squared(ali, np.zeros((L, 3)), d)
    expect = (d / 2) ** 2 * (1 - abs(L - 1 + np.exp(1j * np.deg2rad(delta))) / L)
    assert e2[3] == pytest.approx(expect, rel=1e-9)
    assert np.allclose(np.delete(e2, 3), 0, atol=1e-9)


def _apply_frame(p, g_alpha, gx, gy, flip):
    """Express parameters in another run frame: X' = Mirror^flip G^-1 X (what an independent run sees)."""
    # p in frame F; a run frame F' related by F = G F' (G = rot g_alpha then shift). Build params in F'
    # as compose(p, inverse(G)) with an optional trailing mirror.
    a, sx, sy, m = p.T
    ga = np.deg2rad(g_alpha)
    # inverse of (g_alpha, (gx, gy), 0) = (-g_alpha, -R(-g_alpha) t, 0)
    c, s = np.cos(-ga), np.sin(-ga)
    ix, iy = -(c * gx + s * gy), -(-s * gx + c * gy)
    out = np.empty_like(p)
    sign = np.where(m > 0.5, -1.0, 1.0)
    b = -g_alpha
    cb, sb = np.cos(np.deg2rad(sign * b)), np.sin(np.deg2rad(sign * b))
    out[:, 0] = a + sign * b
    out[:, 1] = cb * sx + sb * sy + sign * ix
    out[:, 2] = -sb * sx + cb * sy + iy
    out[:, 3] = np.where(flip, 1 - m, m)
    return out


def test_stability_recovers_frames_and_flags_unstable_members():
    rng = np.random.default_rng(3)
    n, L, d = 80, 5, 58.0
    truth = np.column_stack([rng.uniform(-180, 180, n), rng.normal(0, 1, n), rng.normal(0, 1, n),
                             rng.integers(0, 2, n)])
    runs = []
    for j in range(L):
        ga, gx, gy, flip = (0, 0, 0, 0) if j == L - 1 else (rng.uniform(-180, 180), *rng.normal(0, 1, 2), j % 2)
        pj = _apply_frame(truth, ga, gx, gy, flip)
        pj[:, 0] += rng.normal(0, 0.2, n)      # small jitter: e ~ 0.1 px
        pj[:, 1:3] += rng.normal(0, 0.05, (n, 2))
        runs.append(pj)
    ali = np.stack(runs)
    ali[0, :10, 0] += rng.uniform(30, 150, 10)     # 10 members misaligned in run 0
    res = multi_align_stability(ali, thld_err=0.7, diameter=d)
    assert set(res.stable.tolist()) == set(range(10, n))
    assert res.mirror_rate == 1.0
    assert (res.errors < 0.7).all()
    # averaged params are in the last run's frame: close to the truth
    diff = (res.params[:, 0] - truth[10:, 0] + 180) % 360 - 180
    assert np.abs(diff).max() < 1.0
    assert np.abs(res.params[:, 1:3] - truth[10:, 1:3]).max() < 0.2
    assert (res.params[:, 3] == truth[10:, 3]).all()


def test_stability_pure_noise_is_unstable():
    rng = np.random.default_rng(4)
    ali = np.stack([np.column_stack([rng.uniform(-180, 180, 60), rng.normal(0, 1, 60), rng.normal(0, 1, 60),
                                     rng.integers(0, 2, 60)]) for _ in range(5)])
    res = multi_align_stability(ali, thld_err=0.7, diameter=58.0)
    assert res.stable.size <= 2


def _greedy_reference(scores):
    """Literal Python transcription of SPHIRE's assign_groups loop (for the compiled version)."""
    k_n, n = scores.shape
    q, r = divmod(n, k_n)
    order = np.argsort(-scores.ravel(), kind="stable")
    out = np.full(n, -1)
    counts = np.zeros(k_n, int)
    open_ = np.ones(k_n, bool)
    n_open, n_left = k_n, n
    for k, i in zip(*np.divmod(order, n)):
        if out[i] >= 0 or not open_[k]:
            continue
        out[i] = k
        counts[k] += 1
        n_left -= 1
        if counts[k] >= (q if n_open > 1 else q + r):
            open_[k] = False
            n_open -= 1
            if n_open == 0 or n_left == 0:
                break
    return out


@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 6), extra=st.integers(0, 25), seed=st.integers(0, 2**31 - 1), ties=st.booleans())
def test_compiled_greedy_equals_the_literal_loop(k, extra, seed, ties):
    rng = np.random.default_rng(seed)
    n = k + extra
    d = rng.integers(0, 4, (k, n)).astype(float) if ties else rng.standard_normal((k, n))
    np.testing.assert_array_equal(assign_groups(d), _greedy_reference(d))


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 6), extra=st.integers(0, 25), seed=st.integers(0, 2**31 - 1), n_known=st.integers(1, 6))
def test_sparse_assignment(k, extra, seed, n_known):
    """With every pair known the sparse rule is the dense one; with a few known pairs per image it still gives
    every image a class and SPHIRE's class sizes."""
    rng = np.random.default_rng(seed)
    n = k + extra
    d = rng.standard_normal((k, n))
    kk, ii = np.divmod(np.arange(k * n), n)
    dense = assign_groups(d)
    fallback = lambda li, ok: d[np.ix_(ok, li)].T                              # noqa: E731
    np.testing.assert_array_equal(assign_groups_sparse(kk, ii, d.ravel(), n, k, fallback), dense)
    top = np.argsort(-d, axis=0, kind="stable")[:min(n_known, k)]              # (c, n)
    pk, pi = top.T.ravel(), np.repeat(np.arange(n), top.shape[0])
    got = assign_groups_sparse(pk, pi, d[pk, pi], n, k, fallback)
    assert np.all(got >= 0)
    np.testing.assert_array_equal(np.sort(np.bincount(got, minlength=k)), np.sort(np.bincount(dense, minlength=k)))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stability_fit_gradient_matches_finite_differences(seed):
    """The analytic gradient of the mean squared pixel error (used by the frame fit) against central differences,
    for random frames, angles, shifts and mirrors."""
    rng = np.random.default_rng(seed)
    n_runs, n = 5, 40
    params = np.zeros((n_runs, n, 4))
    params[..., 0] = rng.uniform(-180, 180, (n_runs, n))
    params[..., 1:3] = rng.normal(0, 2, (n_runs, n, 2))
    params[..., 3] = rng.integers(0, 2, (n_runs, n))
    g = rng.normal(0, 1, (n_runs, 3)) * [30.0, 1.0, 1.0]
    value, grad = mean_error_and_gradient(params, g, 58.0)
    assert value == pytest.approx(pixel_errors_squared(params, g, 58.0).mean(), rel=1e-12)
    numeric = np.zeros_like(g)
    for j in range(n_runs):
        for k in range(3):
            step = np.zeros_like(g)
            step[j, k] = 1e-6
            numeric[j, k] = (pixel_errors_squared(params, g + step, 58.0).mean()
                             - pixel_errors_squared(params, g - step, 58.0).mean()) / 2e-6
    np.testing.assert_allclose(grad, numeric, atol=1e-5 * np.abs(numeric).max())
