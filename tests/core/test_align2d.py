"""Batched polar aligner (spec isac2 §4.4-§4.8; acceptance tests T2 and the delta passes of §4.7).

Planted truth: ``image = transform(reference, inverse(P))`` must give back ``P``. Tolerances: the angle is
refined by a parabola on a 256-sample curve (1.4 deg spacing), well below 0.5 deg when the trial centre hits
the true centre (integer shifts); the translation is searched on a grid, so the centre is found to within
half a step per axis, i.e. |error| <= step / sqrt(2) after rotation into the output frame, plus
interpolation error.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isavar.core import align2d, params2d
from isavar.core.align2d import (
    SpectraCache,
    aligned_average,
    align_to_reference,
    align_to_references,
    band_limit,
    coarse_scores,
    particle_centres,
    peak_offset,
    prepare_references,
    search_offsets,
    subset_references,
)
from isavar.core.polar import (
    _gather_polar,
    _gather_polar_numpy,
    normalize_rings,
    polar_grid,
    polar_transform,
    rotational_correlation,
)
from isavar.core.transform2d import transform_images

N = 64
GRID = polar_grid(1, 25)                      # maxrin 256, mashi = 32 - 25 - 1 = 6


def _blob(rng, n=N, k=7):
    y, x = np.mgrid[:n, :n] - n // 2
    img = np.zeros((n, n))
    for _ in range(k):
        cx, cy = rng.uniform(-11, 11, 2)
        s = rng.uniform(2.0, 4.5)
        img += rng.uniform(0.5, 1.5) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s * s))
    return img.astype(np.float32)


def _planted(ref, p):
    """Images with rot_shift2D(image, P) = reference."""
    inv = params2d.inverse(p)
    n = np.size(p.alpha)
    return transform_images(np.broadcast_to(ref, (n,) + ref.shape), inv.alpha, inv.sx, inv.sy, inv.mirror,
                            interpolation="cubic", border="zero")


def _angle_err(a, b):
    return np.abs((np.asarray(a, float) - np.asarray(b, float) + 180.0) % 360.0 - 180.0)


def _naive(images, refs, grid, *, xr, yr, step, mirror=True, delta=0.0, normalize=False, s=None):
    """Literal per-image, per-translation, per-reference transcription of spec §4.4-§4.8."""
    n, box = images.shape[0], images.shape[1]
    s = np.zeros((n, 2)) if s is None else s
    out = np.zeros((n, len(refs), 5))
    ref_polar = [polar_transform(r, grid).astype(np.float64) for r in refs]
    maxrin = grid.maxrin
    for i in range(n):
        xlo, xhi = search_offsets(s[i, 0], box, grid.last_ring, xr, step)
        ylo, yhi = search_offsets(s[i, 1], box, grid.last_ring, yr, step)
        for k, a in enumerate(ref_polar):
            best = -np.inf
            for ky in range(int(ylo), int(yhi) + 1):
                for kx in range(int(xlo), int(xhi) + 1):
                    d = np.array([kx * step, ky * step])
                    b = polar_transform(images[i], grid, shifts=[s[i] + d])[0]
                    if normalize:
                        b = normalize_rings(b, grid)
                    c, c_m = rotational_correlation(b.astype(np.float64), a, grid)
                    cands = [(c, 0)] + ([(c_m, 1)] if mirror else [])
                    res = []
                    for curve, m in cands:
                        if delta > 0:
                            js = np.arange(0, maxrin, max(1, int(delta / 360 * maxrin)))
                            j = js[np.flatnonzero(curve[js] == curve[js].max())[-1]]
                            frac = 0.0
                        else:
                            j = np.flatnonzero(curve == curve.max())[-1]
                            frac = peak_offset(curve[(j + np.arange(-3, 4)) % maxrin])
                        res.append((curve[j], j + frac, m))
                    q, pos, m = res[0] if (len(res) == 1 or res[0][0] >= res[1][0]) else res[1]
                    if q >= best:
                        best = q
                        alpha = (360.0 * pos / maxrin) % 360.0
                        ar = np.deg2rad(alpha)
                        w = s[i] + d
                        sx = -(np.cos(ar) * w[0] + np.sin(ar) * w[1])
                        sy = -(-np.sin(ar) * w[0] + np.cos(ar) * w[1])
                        out[i, k] = [q, alpha, sx, sy, m]
    return out


def _on_grid_params(rng, n, mirror):
    """Random P whose particle centre -R(-alpha) t is a whole pixel (a trial position of the search)."""
    alpha = rng.uniform(-180, 180, n)
    centre = rng.integers(-2, 3, (n, 2)).astype(float)
    a = np.deg2rad(alpha)
    # t = -R(alpha) s
    sx = -(np.cos(a) * centre[:, 0] + np.sin(a) * centre[:, 1])
    sy = -(-np.sin(a) * centre[:, 0] + np.cos(a) * centre[:, 1])
    return params2d.Params2D(alpha, sx, sy, np.broadcast_to(mirror, (n,)).astype(int))


@pytest.mark.parametrize("mirror_flag", [0, 1])
def test_T2_centre_on_the_grid_recovers_the_planted_parameters(rng, mirror_flag):
    ref = _blob(rng)
    n = 24
    p = _on_grid_params(rng, n, mirror_flag)
    np.testing.assert_allclose(params2d.particle_centre(p), np.round(params2d.particle_centre(p)), atol=1e-9)
    res = align_to_reference(_planted(ref, p), ref, GRID, x_range=3, y_range=3, step=1)
    assert res.alpha.shape == (n,) and res.alpha.dtype == np.float32 and res.mirror.dtype == np.int8
    assert np.all(res.mirror == mirror_flag)
    assert _angle_err(res.alpha, p.alpha).max() < 0.5
    assert np.abs(res.sx - p.sx).max() < 0.25 and np.abs(res.sy - p.sy).max() < 0.25
    assert np.all((res.alpha > -180) & (res.alpha <= 180))


def test_T2_subpixel_shifts_are_found_within_the_grid(rng):
    ref = _blob(rng)
    n = 24
    p = params2d.Params2D(rng.uniform(-180, 180, n), rng.uniform(-2.5, 2.5, n), rng.uniform(-2.5, 2.5, n),
                          rng.integers(0, 2, n))
    res = align_to_reference(_planted(ref, p), ref, GRID, x_range=3, y_range=3, step=1)
    assert np.all(res.mirror == p.mirror)
    err = np.hypot(res.sx - p.sx, res.sy - p.sy)
    assert err.max() <= np.sqrt(0.5) + 0.1
    # an off-grid centre biases the angle a little; still well inside one curve sample (1.4 deg)
    assert _angle_err(res.alpha, p.alpha).max() < 1.0
    # half-pixel steps halve the grid error
    fine = align_to_reference(_planted(ref, p), ref, GRID, x_range=3, y_range=3, step=0.5)
    assert np.hypot(fine.sx - p.sx, fine.sy - p.sy).max() <= 0.5 * np.sqrt(0.5) + 0.1


def _off_centre_particles(rng, ref, n):
    """Planted P with particle centres 4-4.5 px off (outside a +-1 search around the image centre, inside
    mashi = 6), their images, and current parameters whose centre is one pixel off (angle and mirror wrong:
    they are discarded)."""
    alpha = rng.uniform(-180, 180, n)
    centre = rng.choice([-4.5, -4.0, 4.0, 4.5], (n, 2))
    a = np.deg2rad(alpha)
    p = params2d.Params2D(alpha, -(np.cos(a) * centre[:, 0] + np.sin(a) * centre[:, 1]),
                          -(-np.sin(a) * centre[:, 0] + np.cos(a) * centre[:, 1]), rng.integers(0, 2, n))
    np.testing.assert_allclose(params2d.particle_centre(p), centre, atol=1e-9)   # s = -R(-alpha) t
    guess_s = centre + rng.choice([-1.0, 1.0], (n, 2))
    current = params2d.Params2D(np.zeros(n), -guess_s[:, 0], -guess_s[:, 1], np.zeros(n))
    return p, _planted(ref, p), current


def test_search_starts_from_the_current_particle_centre(rng):
    ref = _blob(rng)
    p, images, current = _off_centre_particles(rng, ref, 12)
    res = align_to_reference(images, ref, GRID, x_range=1, y_range=1, step=1, initial_params=current)
    assert np.all(res.mirror == p.mirror)
    assert _angle_err(res.alpha, p.alpha).max() < 0.5
    assert np.hypot(res.sx - p.sx, res.sy - p.sy).max() < 0.3
    # without the current params the +-1 search cannot reach the particle
    blind = align_to_reference(images, ref, GRID, x_range=1, y_range=1, step=1)
    assert np.hypot(blind.sx - p.sx, blind.sy - p.sy).max() > 2.0


def test_particle_centre_and_out_of_range_handling():
    box, ou = 64, 25                                          # mashi = 6
    p = np.array([[30.0, 2.0, -1.0, 0], [0.0, -9.0, 0.0, 1], [0.0, 0.0, 7.5, 0]])
    s = particle_centres(p, 3, box, ou, out_of_range="clamp")
    a = np.deg2rad(30.0)
    np.testing.assert_allclose(s[0], [-(np.cos(a) * 2 + np.sin(a) * 1), -(np.sin(a) * 2 - np.cos(a) * 1)])
    np.testing.assert_allclose(s[1], [6.0, 0.0])              # clamped to mashi
    np.testing.assert_allclose(s[2], [0.0, -6.0])
    r = particle_centres(p, 3, box, ou, out_of_range="reset")
    np.testing.assert_allclose(r[0], s[0])
    np.testing.assert_allclose(r[1:], 0.0)                    # reset to identity
    # centring shift cs: params := combine(params, (0, -cs, 0)), mirror flips the x part
    cs = particle_centres(np.array([[0.0, 0.0, 0.0, 0], [0.0, 0.0, 0.0, 1]]), 2, box, ou, center_shift=[1.0, 2.0])
    np.testing.assert_allclose(cs, [[1.0, 2.0], [-1.0, 2.0]])
    with pytest.raises(ValueError):
        particle_centres(p, 3, box, ou, out_of_range="bogus")


def test_search_range_follows_sphire():
    # N = 76, ou = 29: left = min(38 - 29 - 1 + s, xr), right = min(76 - 38 - 1 - s - 29, xr)
    lo, hi = search_offsets([0.0, 7.5, -8.0, 8.5], 76, 29, 1.0, 1.0)
    assert lo.tolist() == [-1, -1, 0, -1] and hi.tolist() == [1, 0, 1, 0]
    lo, hi = search_offsets([0.0], 76, 29, 8.0, 2.0)
    assert lo.tolist() == [-4] and hi.tolist() == [4]
    lo, hi = search_offsets([0.0], 76, 29, 1.0, 2.0)          # step larger than the range: centre only
    assert lo.tolist() == [0] and hi.tolist() == [0]


@settings(max_examples=40, deadline=None)
@given(vertex=st.floats(-1.0, 1.0), curv=st.floats(0.05, 5.0), top=st.floats(-10, 10))
def test_parabola_vertex_is_exact_for_a_parabola(vertex, curv, top):
    d = np.arange(-3, 4)
    assert peak_offset(top - curv * (d - vertex) ** 2) == pytest.approx(vertex, abs=1e-9)


def test_batched_search_equals_the_literal_transcription(rng):
    refs = np.stack([_blob(rng) for _ in range(3)])
    images = np.stack([_blob(rng) for _ in range(4)]) + 0.3 * rng.standard_normal((4, N, N)).astype(np.float32)
    s = np.array([[0.0, 0.0], [0.4, -0.7], [2.0, 1.0], [-5.5, 6.0]])   # last one at the range limit
    current = params2d.Params2D(np.zeros(4), -s[:, 0], -s[:, 1], np.zeros(4))
    for normalize, delta in [(False, 0.0), (True, 0.0), (True, 90.0)]:
        fast = align_to_references(images, refs, GRID, x_range=2, y_range=1, step=1, delta=delta,
                                   normalize_images=normalize, initial_params=current)
        slow = _naive(images, refs, GRID, xr=2, yr=1, step=1, delta=delta, normalize=normalize, s=s)
        np.testing.assert_allclose(fast.score, slow[..., 0], rtol=2e-4, atol=1e-3)
        np.testing.assert_array_equal(fast.mirror, slow[..., 4])
        assert _angle_err(fast.alpha, slow[..., 1]).max() < 1e-2
        np.testing.assert_allclose(fast.sx, slow[..., 2], atol=1e-3)
        np.testing.assert_allclose(fast.sy, slow[..., 3], atol=1e-3)
    # non-integer step takes the general gather path
    fast = align_to_references(images, refs, GRID, x_range=1, y_range=1, step=0.5, mirror=False,
                               normalize_images=False, initial_params=current)
    slow = _naive(images, refs, GRID, xr=1, yr=1, step=0.5, mirror=False, s=s)
    np.testing.assert_allclose(fast.score, slow[..., 0], rtol=2e-4, atol=1e-3)
    assert np.all(fast.mirror == 0)
    np.testing.assert_allclose(fast.sx, slow[..., 2], atol=1e-3)


def test_chunking_does_not_change_the_result(rng):
    refs = np.stack([_blob(rng) for _ in range(5)])
    images = rng.standard_normal((7, N, N)).astype(np.float32)
    prep = prepare_references(refs, GRID)
    a = align_to_references(images, prep, GRID, x_range=1, y_range=1, step=1)
    b = align_to_references(images, prep, GRID, x_range=1, y_range=1, step=1, chunk_size=2, pair_budget=10)
    # (BLAS blocking changes float32 rounding only)
    np.testing.assert_allclose(a.score, b.score, rtol=1e-5)
    np.testing.assert_array_equal(a.mirror, b.mirror)
    for f in ("alpha", "sx", "sy"):
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), atol=1e-3)
    single = align_to_reference(images, refs[2], GRID, x_range=1, y_range=1, step=1, normalize_images=True,
                                out_of_range="reset")
    np.testing.assert_allclose(single.score, a.score[:, 2], rtol=1e-5)
    np.testing.assert_allclose(single.alpha, a.alpha[:, 2], atol=1e-3)
    assert a.params.shape == (7, 5, 4)


def test_multireference_assigns_noisy_copies_to_their_reference(rng):
    k, per = 4, 6
    refs = np.stack([_blob(rng) for _ in range(k)])
    refs = (refs - refs.mean(axis=(1, 2), keepdims=True)) / refs.std(axis=(1, 2), keepdims=True)
    n = k * per
    truth = np.repeat(np.arange(k), per)
    p = _on_grid_params(rng, n, rng.integers(0, 2, n))
    images = np.concatenate([_planted(refs[j], params2d.Params2D(*(np.asarray(f)[truth == j] for f in p)))
                             for j in range(k)])
    images = images + 1.0 * rng.standard_normal(images.shape).astype(np.float32)   # SNR ~ 1
    res = align_to_references(images, refs, GRID, x_range=2, y_range=2, step=1)
    assert res.score.shape == (n, k)
    best = np.argmax(res.score, axis=1)
    np.testing.assert_array_equal(best, truth)
    rows = np.arange(n)
    assert np.all(res.mirror[rows, truth] == p.mirror)
    assert _angle_err(res.alpha[rows, truth], p.alpha).max() < 2.0
    assert np.hypot(res.sx[rows, truth] - p.sx, res.sy[rows, truth] - p.sy).max() <= 0.5


def test_discrete_pass_returns_only_multiples_of_delta(rng):
    ref = _blob(rng)
    n = 16
    p = params2d.Params2D(rng.uniform(-180, 180, n), np.zeros(n), np.zeros(n), rng.integers(0, 2, n))
    images = _planted(ref, p)
    res = align_to_reference(images, ref, GRID, x_range=1, y_range=1, step=1, delta=90.0)
    assert np.all(np.isin(np.round(res.alpha, 4), [0.0, 90.0, 180.0, -90.0]))
    # a subset of the angles of the continuous search: never a better peak
    full = align_to_reference(images, ref, GRID, x_range=1, y_range=1, step=1)
    assert np.all(res.score <= full.score + 1e-3 * np.abs(full.score))
    res15 = align_to_reference(images, ref, GRID, x_range=0, y_range=0, step=1, delta=15.0)
    jstep = int(15.0 / 360 * 256)                               # 10 samples = 14.0625 deg
    k = np.mod(res15.alpha, 360.0) / (360.0 * jstep / 256)
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)
    assert np.all(res15.mirror == p.mirror)


def test_identical_image_scores_the_autocorrelation_T3(rng):
    ref = _blob(rng)
    res = align_to_reference(ref[None], ref, GRID, x_range=1, y_range=1, step=1)
    a = polar_transform(ref, GRID).astype(np.float64)
    assert res.score[0] == pytest.approx(np.sum(GRID.sample_weights * a * a), rel=1e-4)
    assert res.alpha[0] == pytest.approx(0.0, abs=1e-3) and res.mirror[0] == 0
    assert res.sx[0] == pytest.approx(0.0, abs=1e-6) and res.sy[0] == pytest.approx(0.0, abs=1e-6)


def test_bad_arguments_are_rejected(rng):
    ref = _blob(rng)
    with pytest.raises(ValueError):
        align_to_reference(ref[None], np.stack([ref, ref]), GRID, x_range=1, y_range=1, step=1)
    with pytest.raises(ValueError):
        align_to_reference(ref[None], ref, GRID, x_range=1, y_range=1, step=0)
    with pytest.raises(ValueError):
        align_to_references(ref[None, :60, :60], ref[None], GRID, x_range=1, y_range=1, step=1)
    prep = prepare_references(ref, GRID, mirror=False)
    with pytest.raises(ValueError):
        align_to_reference(ref[None], prep, GRID, x_range=1, y_range=1, step=1, mirror=True)


def test_spectra_cache_reproduces_uncached_passes(rng):
    ref = _blob(rng)
    n = 10
    p = params2d.Params2D(rng.uniform(-180, 180, n), rng.uniform(-2, 2, n), rng.uniform(-2, 2, n),
                          rng.integers(0, 2, n))
    images = _planted(ref, p) + 0.3 * rng.standard_normal((n, N, N)).astype(np.float32)
    cache = SpectraCache()
    cur_a = cur_b = np.zeros((n, 4))
    for it in range(5):
        kw = dict(x_range=1, y_range=1, step=1, delta=90.0 if it == 0 else 0.0, normalize_images=it % 2 == 1)
        a = align_to_reference(images, ref, GRID, initial_params=cur_a, **kw)
        b = align_to_reference(images, ref, GRID, initial_params=cur_b, cache=cache, **kw)
        np.testing.assert_allclose(b.score, a.score, rtol=1e-5)
        np.testing.assert_array_equal(b.mirror, a.mirror)
        assert _angle_err(b.alpha, a.alpha).max() < 1e-2
        np.testing.assert_allclose(b.sx, a.sx, atol=1e-3)
        np.testing.assert_allclose(b.sy, a.sy, atol=1e-3)
        cur_a, cur_b = a.params, b.params
    # the centres walk on a lattice: most trial positions of later passes are reused
    assert cache.hits > cache.misses > 0 and len(cache) == cache.misses


def test_spectra_cache_invalidates_changed_images_and_off_lattice_centres(rng):
    refs = np.stack([_blob(rng) for _ in range(2)])
    images = np.stack([_blob(rng) for _ in range(3)])
    cache = SpectraCache()
    align_to_references(images, refs, GRID, x_range=1, y_range=1, step=1, cache=cache)
    assert (cache.hits, cache.misses) == (0, 27)
    changed = images.copy()
    changed[1] = np.roll(changed[1], 3, axis=1)                # new content: only its entries are recomputed
    got = align_to_references(changed, refs, GRID, x_range=1, y_range=1, step=1, cache=cache)
    assert (cache.hits, cache.misses) == (18, 36)
    want = align_to_references(changed, refs, GRID, x_range=1, y_range=1, step=1)
    np.testing.assert_allclose(got.score, want.score, rtol=1e-5)
    # a centre half a pixel off the image's lattice restarts that image's lattice
    cur = np.zeros((3, 4))
    cur[0, 1] = 0.5
    got = align_to_references(changed, refs, GRID, x_range=1, y_range=1, step=1, cache=cache, initial_params=cur)
    want = align_to_references(changed, refs, GRID, x_range=1, y_range=1, step=1, initial_params=cur)
    np.testing.assert_allclose(got.score, want.score, rtol=1e-5)
    np.testing.assert_allclose(got.sx, want.sx, atol=1e-3)
    assert cache.misses == 45
    # non-integer steps do not use the cache
    align_to_references(changed, refs, GRID, x_range=1, y_range=1, step=0.5, cache=cache)
    assert cache.misses == 45
    with pytest.raises(ValueError):
        align_to_references(changed, refs, GRID, x_range=1, y_range=1, step=1, cache=object())


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 3))
def test_quarter_turns_of_the_image_shift_the_angle_exactly(seed, k):
    """Equivariance: a 90 deg grid rotation about the centre permutes the ring samples exactly (n_r % 4 == 0),
    so the found angle moves by exactly k * 90 deg and score, shift length and mirror are unchanged."""
    rng = np.random.default_rng(seed)
    n = 65                                                    # odd: np.rot90 turns about pixel n // 2
    grid = polar_grid(1, 27)
    ref = _blob(rng, n)
    image = _blob(rng, n) + 0.5 * ref
    # which way np.rot90 turns in the parameter convention (content at q -> R(alpha) q)
    turned = transform_images(image, 90.0, 0.0, 0.0, 0)
    sign = 1 if np.abs(turned - np.rot90(image, 1)).max() < 1e-3 else -1
    assert np.abs(turned - np.rot90(image, sign)).max() < 1e-3
    base = align_to_reference(image[None], ref, grid, x_range=1, y_range=1, step=1)
    rot = align_to_reference(np.rot90(image, k)[None].copy(), ref, grid, x_range=1, y_range=1, step=1)
    assert rot.score[0] == pytest.approx(base.score[0], rel=1e-5)
    assert rot.mirror[0] == base.mirror[0]
    # input rotated by beta = sign * 90 k: P' = compose((-beta, 0, 0, 0), P), i.e. alpha' = alpha - beta
    beta = sign * 90.0 * k
    expect = base.alpha[0] - beta
    assert _angle_err(rot.alpha[0], expect) < 1e-3
    assert np.hypot(rot.sx[0], rot.sy[0]) == pytest.approx(np.hypot(base.sx[0], base.sy[0]), abs=1e-4)


@pytest.mark.parametrize("use_cache", [False, True])
def test_aligned_average_equals_the_real_space_average_inside_the_rings(rng, use_cache):
    # noisy copies of one image at random (alpha, t, mirror): the mean of transform_images(image, P) and the
    # ring-spectra average must agree inside the last ring up to interpolation error (bilinear ring samples,
    # linear resampling back to pixels, against quadratic real-space rotation)
    n = 40
    ref = _blob(rng)
    imgs = ref[None] + rng.normal(0, 0.2, (n, N, N)).astype(np.float32)
    p = np.column_stack([rng.uniform(-180, 180, n), rng.normal(0, 2, n), rng.normal(0, 2, n),
                         rng.integers(0, 2, n)])
    truth = transform_images(imgs, p[:, 0], p[:, 1], p[:, 2], p[:, 3].astype(int),
                             interpolation="quadratic").mean(0)
    cache = SpectraCache() if use_cache else None
    avg = aligned_average(imgs, p, GRID, cache=cache)
    if use_cache:                                   # second call served from the cache: same answer
        assert np.array_equal(aligned_average(imgs, p, GRID, cache=cache), avg)
        assert cache.hits == n
    y, x = np.mgrid[:N, :N] - N // 2
    inside = np.hypot(x, y) <= GRID.last_ring - 1
    assert np.corrcoef(avg[inside], truth[inside])[0, 1] > 0.995
    assert np.abs(avg - truth)[inside].max() < 0.1 * np.abs(truth).max()
    assert np.all(avg[np.hypot(x, y) >= GRID.last_ring + 1] == 0)


def test_aligned_average_follows_the_parameter_convention(rng):
    # one image transformed by P^-1 and averaged with P gives back the reference (rotation, shift, mirror)
    ref = _blob(rng)
    for m in (0, 1):
        p = params2d.Params2D(np.array([37.0]), np.array([1.5]), np.array([-2.0]), np.array([m]))
        img = _planted(ref, p)
        avg = aligned_average(img, p.to_array(), GRID)
        y, x = np.mgrid[:N, :N] - N // 2
        inside = np.hypot(x, y) <= GRID.last_ring - 2
        assert np.corrcoef(avg[inside], ref[inside])[0, 1] > 0.995


def _noisy_copies(rng, k=5, per=6, noise=1.0):
    refs = np.stack([_blob(rng) for _ in range(k)])
    refs = (refs - refs.mean(axis=(1, 2), keepdims=True)) / refs.std(axis=(1, 2), keepdims=True)
    truth = np.repeat(np.arange(k), per)
    p = _on_grid_params(rng, k * per, rng.integers(0, 2, k * per))
    images = np.concatenate([_planted(refs[j], params2d.Params2D(*(np.asarray(f)[truth == j] for f in p)))
                             for j in range(k)])
    return refs, images + noise * rng.standard_normal(images.shape).astype(np.float32), truth, p


@pytest.mark.parametrize("spread", [9.0, 2.0])
@pytest.mark.parametrize("offsets", [(0,), (-1, 0, 1), (-2, 0, 3)])
def test_compiled_polar_sampling_equals_the_numpy_formulation(rng, offsets, spread):
    """The numba gather does the NumPy formulation's arithmetic element by element: bitwise equal,
    for centres near and beyond the image edge (edge replication, ``spread`` 9) and for centres whose rings
    stay inside the image (``spread`` 2: the kernel's paths without clamping, one offset or several)."""
    images = rng.standard_normal((6, N, N)).astype(np.float32)
    idx = rng.integers(0, 6, 40)
    cx = N // 2 + rng.uniform(-spread, spread, 40)
    cy = N // 2 + rng.uniform(-spread, spread, 40)
    reach = GRID.last_ring + 1 + max(abs(o) for o in offsets)
    assert (spread + reach < N // 2) == (spread == 2.0)       # which kernel path the case takes
    ox = np.array(offsets)
    oy = np.array(offsets[::-1])
    a = _gather_polar(images.reshape(-1), N, idx, cx, cy, GRID, ox, oy)
    b = _gather_polar_numpy(images.reshape(-1), N, idx, cx, cy, GRID, ox, oy)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("delta", [0.0, 90.0])
def test_compiled_peak_search_equals_the_numpy_path(rng, monkeypatch, delta):
    """``USE_KERNELS = False`` (the NumPy peak search) gives the same numbers as the compiled kernels."""
    refs, images, _truth, _p = _noisy_copies(rng, k=3, per=4)
    kw = dict(x_range=1, y_range=1, step=1, delta=delta)
    a = align_to_references(images, refs, GRID, **kw)
    monkeypatch.setattr(align2d, "USE_KERNELS", False)
    b = align_to_references(images, refs, GRID, **kw)
    for f in ("score", "alpha", "sx", "sy", "mirror"):
        np.testing.assert_allclose(getattr(a, f), getattr(b, f), rtol=1e-6, atol=1e-5)


def test_subset_of_prepared_references_searches_like_the_full_set(rng):
    refs, images, _truth, _p = _noisy_copies(rng, k=4, per=3)
    prep = prepare_references(refs, GRID)
    full = align_to_references(images, prep, GRID, x_range=1, y_range=1, step=1)
    pick = np.array([2, 0])
    sub = align_to_references(images, subset_references(prep, pick), GRID, x_range=1, y_range=1, step=1)
    np.testing.assert_allclose(sub.score, full.score[:, pick], rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(sub.mirror, full.mirror[:, pick])
    assert _angle_err(sub.alpha, full.alpha[:, pick]).max() < 1e-2
    with pytest.raises(ValueError):
        subset_references(prep, [4])


def test_coarse_scores_rank_the_planted_reference_first(rng):
    """At SNR ~ 1 the coarse score (low ring frequencies, current centre) puts every noisy copy's own
    reference first, and it tracks the full search's scores."""
    refs, images, truth, _p = _noisy_copies(rng, k=5, per=6)
    prep = prepare_references(refs, GRID)
    coarse = coarse_scores(images, prep)
    assert coarse.shape == (len(images), 5)
    np.testing.assert_array_equal(np.argmax(coarse, axis=1), truth)
    full = align_to_references(images, prep, GRID, x_range=2, y_range=2, step=1).score
    assert np.corrcoef(coarse.ravel(), full.ravel())[0, 1] > 0.9
    # the full search can only do better than its own low-pass, unshifted part (up to the peak refinement)
    assert np.all(coarse <= full + 0.05 * np.abs(full))


@pytest.mark.parametrize("delta", [0.0, 90.0])
def test_coarse_to_fine_translations_agree_with_the_full_search(rng, delta):
    """With 3 of 9 translations refined exactly (chosen by the low-frequency coarse score), a pass gives the
    full search's answer for nearly every image, and exactly it where the best translation is among the 3."""
    ref = _blob(rng)
    n = 40
    p = params2d.Params2D(rng.uniform(-180, 180, n), rng.uniform(-2, 2, n), rng.uniform(-2, 2, n),
                          rng.integers(0, 2, n))
    images = _planted(ref, p) + 0.5 * rng.standard_normal((n, N, N)).astype(np.float32)
    kw = dict(x_range=1, y_range=1, step=1, delta=delta)
    full = align_to_reference(images, ref, GRID, **kw)
    fast = align_to_reference(images, ref, GRID, cache=SpectraCache(), coarse_rows=3, **kw)
    same = (np.abs(full.sx - fast.sx) < 1e-3) & (np.abs(full.sy - fast.sy) < 1e-3) & (full.mirror == fast.mirror)
    assert same.mean() >= 0.95
    assert _angle_err(full.alpha[same], fast.alpha[same]).max() < 1e-2
    np.testing.assert_allclose(fast.score[same], full.score[same], rtol=1e-5)
    assert np.all(fast.score <= full.score + 1e-4 * np.abs(full.score))     # never better than the full search
    if delta == 0:
        assert np.median(_angle_err(fast.alpha, p.alpha)) < 2.0


def test_multi_reference_shift_candidates_agree_with_the_full_search(rng):
    """EQK's coarse-to-fine translations (``shift_candidates``): with 3 of 9 trial translations searched at
    every frequency, chosen by the low-frequency score against all references, every noisy copy still finds
    its planted reference first and, for nearly all, exactly the full search's parameters for it; no pair
    scores better than the full search; with as many candidates as translations it is the full search."""
    refs, images, truth, p = _noisy_copies(rng, k=5, per=8)
    # the copies are off-centre by up to one step, so the centre is not always the best translation
    images = np.roll(images, (1, -1), axis=(1, 2))
    prep = prepare_references(refs, GRID)
    kw = dict(x_range=1, y_range=1, step=1)
    full = align_to_references(images, prep, GRID, **kw)
    fast = align_to_references(images, prep, GRID, shift_candidates=3, **kw)
    rows = np.arange(len(images))
    np.testing.assert_array_equal(np.argmax(fast.score, axis=1), truth)
    same = ((np.abs(full.sx - fast.sx) < 1e-3) & (np.abs(full.sy - fast.sy) < 1e-3)
            & (full.mirror == fast.mirror))[rows, truth]
    assert same.mean() >= 0.95
    np.testing.assert_allclose(fast.score[rows, truth][same], full.score[rows, truth][same], rtol=1e-5)
    assert np.all(fast.score <= full.score + 1e-4 * np.abs(full.score))
    # other pairs may miss their own best translation, so the restriction does lose something there
    assert not np.allclose(fast.score, full.score, rtol=1e-5)
    every = align_to_references(images, prep, GRID, shift_candidates=9, **kw)
    np.testing.assert_array_equal(every.score, full.score)
    np.testing.assert_array_equal(every.alpha, full.alpha)


# ------------------------------------------------------------------------------ band-limited references


def _kept_fraction(prep):
    full = sum(w.shape[0] * w.shape[1] for *_, w in prep.bands)
    return sum(blk[4].shape[0] * blk[4].shape[1] for blk in prep.blocks) / full


def test_band_limit_zero_tolerance_is_the_full_search(rng):
    prep = prepare_references(_blob(rng), GRID)
    assert band_limit(prep, 0.0) is prep


@pytest.mark.parametrize("use_cache", [False, True])
def test_band_limited_low_pass_reference_finds_the_same_parameters(rng, use_cache):
    # a reference low-passed at 0.15 cycles/pixel has (almost) no energy at high ring frequencies: the
    # band-limited search reads a fraction of the coefficients and finds the planted parameters as the
    # full search does (noisy images, so the curves differ by the left-out terms of the noise)
    from isavar.core.filters import tanh_lowpass

    ref = tanh_lowpass(_blob(rng), 0.15, 0.2)
    n = 40
    p = _on_grid_params(rng, n, rng.integers(0, 2, n))
    images = _planted(ref, p) + 0.05 * rng.standard_normal((n, N, N)).astype(np.float32)
    prep = prepare_references(ref, GRID)
    limited = band_limit(prep, 1e-4)
    assert 0.0 < _kept_fraction(limited) < 0.4
    kw = dict(x_range=2, y_range=2, step=1)
    full = align_to_reference(images, prep, GRID, **kw, cache=SpectraCache() if use_cache else None)
    lim = align_to_reference(images, limited, GRID, **kw, cache=SpectraCache() if use_cache else None)
    np.testing.assert_array_equal(lim.mirror, full.mirror)
    np.testing.assert_array_equal(lim.mirror, p.mirror)
    assert _angle_err(lim.alpha, full.alpha).max() < 0.2
    assert _angle_err(lim.alpha, p.alpha).max() < 1.0
    assert np.abs(lim.sx - full.sx).max() < 0.05 and np.abs(lim.sy - full.sy).max() < 0.05
    # the left-out coefficients hold at most 1e-4 of the energy: scores within sqrt(1e-4) of the scale
    assert np.abs(lim.score - full.score).max() <= 1e-2 * np.abs(full.score).max()


def test_band_limit_keeps_what_a_full_band_reference_needs(rng):
    # white noise has energy at every ring frequency: nothing may be left out
    ref = rng.standard_normal((N, N)).astype(np.float32)
    prep = prepare_references(ref, GRID)
    assert _kept_fraction(band_limit(prep, 1e-4)) > 0.95


def test_band_limited_multireference_search_and_subsets(rng):
    from isavar.core.filters import tanh_lowpass

    refs, images, _truth, _p = _noisy_copies(rng, k=4, per=3)
    refs = tanh_lowpass(refs, 0.2, 0.2)
    prep = prepare_references(refs, GRID)
    limited = band_limit(prep, 1e-4)
    assert _kept_fraction(limited) < 0.6
    full = align_to_references(images, prep, GRID, x_range=1, y_range=1, step=1)
    lim = align_to_references(images, limited, GRID, x_range=1, y_range=1, step=1)
    np.testing.assert_array_equal(np.argmax(lim.score, axis=1), np.argmax(full.score, axis=1))
    pick = np.array([3, 1])
    sub = align_to_references(images, subset_references(limited, pick), GRID, x_range=1, y_range=1, step=1)
    np.testing.assert_allclose(sub.score, lim.score[:, pick], rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(sub.mirror, lim.mirror[:, pick])



def _zeroed_outside_blocks(prep):
    """``prep`` with every weight the blocks of a band-limited ``prep`` leave out set to zero (whole bands)."""
    import dataclasses

    bands = []
    for b, (m_lo, m_hi, r_first, w) in enumerate(prep.bands):
        z = np.zeros_like(w)
        for blk in prep.blocks:
            if blk.band == b:
                z[blk.m_offset:blk.m_offset + blk.m_count, 2 * blk.ring_skip:] = blk.w
        bands.append((m_lo, m_hi, r_first, z))
    return dataclasses.replace(prep, bands=tuple(bands), blocks=())


@pytest.mark.parametrize("mirror", [True, False])
@pytest.mark.parametrize("use_cache", [False, True])
def test_band_limited_search_is_the_full_search_without_the_left_out_terms(rng, mirror, use_cache):
    from isavar.core.filters import tanh_lowpass

    ref = tanh_lowpass(_blob(rng), 0.2, 0.2)
    images = _noisy_copies(rng, k=2, per=5, noise=0.5)[1]
    limited = band_limit(prepare_references(ref, GRID, mirror=mirror), 1e-3)
    assert limited.blocks
    zeroed = _zeroed_outside_blocks(limited)
    kw = dict(x_range=2, y_range=2, step=1, mirror=mirror, delta=0.0)
    a = align_to_reference(images, limited, GRID, **kw, cache=SpectraCache() if use_cache else None)
    b = align_to_reference(images, zeroed, GRID, **kw, cache=SpectraCache() if use_cache else None)
    np.testing.assert_allclose(a.score, b.score, rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(a.mirror, b.mirror)
    assert _angle_err(a.alpha, b.alpha).max() < 1e-3


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), fl=st.floats(0.05, 0.5), tol=st.sampled_from([1e-5, 1e-4, 1e-3, 1e-2]))
def test_band_limit_leaves_out_at_most_the_tolerance_of_each_reference(seed, fl, tol):
    from isavar.core.filters import tanh_lowpass

    rng = np.random.default_rng(seed)
    refs = tanh_lowpass(np.stack([_blob(rng) for _ in range(3)]), fl, 0.2)
    prep = prepare_references(refs, GRID)
    limited = band_limit(prep, tol)
    zeroed = _zeroed_outside_blocks(limited)

    def energy(p):
        # ring-weighted energy of every reference; m >= 1 counts twice, as in the real correlation curve
        out = np.zeros(p.n_refs)
        for m_lo, m_hi, _r, w in p.bands:
            a = w.reshape(w.shape[0], w.shape[1] // 2, 2, p.n_refs, 4)[..., 0].astype(np.float64)
            twice = np.where(np.arange(m_lo, m_hi) == 0, 1.0, 2.0)[:, None, None]
            out += (twice * (a * a).sum(axis=2)).sum(axis=(0, 1))
        return out

    left_out = 1.0 - energy(zeroed) / energy(prep)
    assert np.all(left_out <= tol * (1 + 1e-9))
    first = [blk for blk in limited.blocks if blk.band == 0 and blk.m_offset == 0]
    assert first and first[0].ring_skip == 0                    # m = 0 keeps every ring


# ------------------------------------------------------------------ translations on the reference side

def _lattice_params(rng, n, mirror):
    """Random P whose translation t is a whole-pixel lattice point: from the identity, the reference-side search
    tries exactly ``t = M^m u`` (``u`` on the lattice), so these are its trial positions."""
    return params2d.Params2D(rng.uniform(-180, 180, n), rng.integers(-2, 3, n).astype(float),
                             rng.integers(-2, 3, n).astype(float), np.broadcast_to(mirror, (n,)).astype(int))


@pytest.mark.parametrize("mirror_flag", [0, 1])
def test_reference_side_translations_recover_the_planted_parameters(rng, mirror_flag):
    ref = _blob(rng)
    n = 24
    p = _lattice_params(rng, n, mirror_flag)
    prep = prepare_references(ref, GRID, translations=(3, 3, 1))
    assert prep.n_references == 1 and prep.n_refs == 49 and prep.shifts.shape == (49, 2)
    res = align_to_reference(_planted(ref, p), prep, GRID, x_range=3, y_range=3, step=1)
    assert res.alpha.shape == (n,) and res.alpha.dtype == np.float32 and res.mirror.dtype == np.int8
    assert np.all(res.mirror == mirror_flag)
    assert _angle_err(res.alpha, p.alpha).max() < 0.5
    assert np.abs(res.sx - p.sx).max() < 0.25 and np.abs(res.sy - p.sy).max() < 0.25
    # any planted translation is found to within the lattice's half diagonal, as with image-side translations
    q = params2d.Params2D(rng.uniform(-180, 180, n), rng.uniform(-2.5, 2.5, n), rng.uniform(-2.5, 2.5, n),
                          rng.integers(0, 2, n))
    res = align_to_reference(_planted(ref, q), prep, GRID, x_range=3, y_range=3, step=1)
    assert np.all(res.mirror == q.mirror)
    assert np.hypot(res.sx - q.sx, res.sy - q.sy).max() <= np.sqrt(0.5) + 0.1
    half = align_to_reference(_planted(ref, q), prepare_references(ref, GRID, translations=(3, 3, 0.5)), GRID,
                              x_range=3, y_range=3, step=0.5)
    assert np.hypot(half.sx - q.sx, half.sy - q.sy).max() <= 0.5 * np.sqrt(0.5) + 0.1


def test_reference_side_search_starts_from_the_current_centre_and_keeps_it_in_range(rng):
    ref = _blob(rng)
    p, images, current = _off_centre_particles(rng, ref, 12)
    prep = prepare_references(ref, GRID, translations=(1, 1, 1))
    res = align_to_reference(images, prep, GRID, x_range=1, y_range=1, step=1, initial_params=current)
    assert np.all(res.mirror == p.mirror)
    assert np.hypot(res.sx - p.sx, res.sy - p.sy).max() <= np.sqrt(0.5) + 0.1
    # a wide range never moves a particle centre beyond mashi (6 px): the search keeps the rings inside
    wide = align_to_reference(images, prepare_references(ref, GRID, translations=(5, 5, 1)), GRID, x_range=5,
                              y_range=5, step=1, initial_params=current)
    moved = params2d.particle_centre(params2d.Params2D(wide.alpha, wide.sx, wide.sy, wide.mirror))
    assert np.abs(moved).max() <= GRID_MASHI + 1e-4
    with pytest.raises(ValueError, match="translations"):
        align_to_reference(images, prep, GRID, x_range=2, y_range=2, step=1)


GRID_MASHI = N // 2 - 25 - 1


def test_reference_side_multireference_search_and_subsets(rng):
    refs, images, truth, p = _noisy_copies(rng, k=4, per=4, noise=0.5)
    prep = prepare_references(refs, GRID, translations=(3, 3, 1))      # planted translations reach 2 sqrt(2)
    res = align_to_references(images, prep, GRID, x_range=3, y_range=3, step=1)
    assert res.score.shape == (16, 4)
    np.testing.assert_array_equal(np.argmax(res.score, axis=1), truth)
    own = np.arange(16), truth
    assert np.all(res.mirror[own] == np.asarray(p.mirror))
    # these planted centres lie on the image-side lattice, not on the reference side's: off-lattice shifts
    # and the noise bias the angle by a little more than one curve sample (1.4 deg)
    assert _angle_err(res.alpha[own], p.alpha).max() < 3.0
    assert np.hypot(res.sx[own] - p.sx, res.sy[own] - p.sy).max() <= np.sqrt(0.5) + 0.2
    pick = np.array([3, 1])
    sub = align_to_references(images, subset_references(prep, pick), GRID, x_range=3, y_range=3, step=1)
    np.testing.assert_allclose(sub.score, res.score[:, pick], rtol=1e-5, atol=1e-3)
    np.testing.assert_array_equal(sub.mirror, res.mirror[:, pick])
    # band-limited references keep the translations
    limited = band_limit(prep, 1e-3)
    assert limited.translations == (3.0, 3.0, 1.0) and limited.n_references == 4


@pytest.mark.parametrize("side", ["images", "references"])
def test_pairs_search_only_the_chosen_pairs_with_the_same_numbers(rng, side):
    """``pairs``: the chosen (image, reference) pairs get the very numbers of the full search, the others
    score -inf; with the translations on either side."""
    refs, images, truth, _p = _noisy_copies(rng, k=4, per=4, noise=0.5)
    prep = prepare_references(refs, GRID, translations=(1, 1, 1) if side == "references" else None)
    full = align_to_references(images, prep, GRID, x_range=1, y_range=1, step=1)
    pairs = rng.random((16, 4)) < 0.4
    pairs[np.arange(16), truth] = True
    pairs[3] = False                                   # an image with no pair at all
    part = align_to_references(images, prep, GRID, x_range=1, y_range=1, step=1, pairs=pairs)
    for got, want in zip((part.score, part.alpha, part.sx, part.sy, part.mirror),
                         (full.score, full.alpha, full.sx, full.sy, full.mirror)):
        np.testing.assert_array_equal(got[pairs], want[pairs])
    assert np.all(part.score[~pairs] == -np.inf)
    with pytest.raises(ValueError, match="pairs must be"):
        align_to_references(images, prep, GRID, x_range=1, y_range=1, step=1, pairs=pairs[:, :3])
    with pytest.raises(ValueError, match="shift_candidates"):
        align_to_references(images, prep, GRID, x_range=1, y_range=1, step=1, pairs=pairs, shift_candidates=2)
