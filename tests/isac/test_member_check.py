"""The member check after the stability test (``--member_check``): planted noise members are dropped."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isavar.isac import _ops, stability
from isavar.isac.stability import class_stability_task, correlations_with_others, member_check
from isavar.isac.run import make_grid
from isavar.isac.working import normalise_for_alignment

from isac_data import prototypes, small_params


def _class_with_noise(n_real=60, n_noise=6, snr=0.1, seed=0, box=28):
    """Aligned members: one prototype plus white noise at a per-pixel SNR ``snr``, then pure-noise images."""
    rng = np.random.default_rng(seed)
    proto = prototypes(box)[0]
    proto = (proto - proto.mean()) / proto.std()
    sigma = 1.0 / np.sqrt(snr)
    real = proto[None] + rng.normal(0, sigma, (n_real, box, box))
    noise = rng.normal(0, np.sqrt(1.0 + sigma ** 2), (n_noise, box, box))
    return np.concatenate([real, noise]).astype(np.float32), proto, sigma


def test_correlations_with_others_equal_numpy_corrcoef():
    images, _, _ = _class_with_noise(n_real=12, n_noise=3, seed=1)
    mask = _ops.circle(28, 10) > 0.5
    cc = correlations_with_others(images, mask)
    for i in range(len(images)):
        others = np.delete(images, i, axis=0).mean(axis=0)
        assert cc[i] == pytest.approx(np.corrcoef(images[i][mask], others[mask])[0, 1], abs=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.1, 10.0), offset=st.floats(-5.0, 5.0))
def test_a_members_correlation_ignores_its_own_scale_and_offset(seed, scale, offset):
    images, _, _ = _class_with_noise(n_real=8, n_noise=2, seed=seed)
    mask = _ops.circle(28, 10) > 0.5
    changed = images.copy()
    changed[0] = scale * changed[0] + offset
    assert correlations_with_others(changed, mask)[0] == pytest.approx(
        correlations_with_others(images, mask)[0], abs=1e-6)


def test_real_members_correlate_as_their_snr_predicts():
    """Member = s + e (noise variance sigma^2), mean of the other n - 1 members = s + e' (sigma^2 / (n - 1)):
    the expected correlation is var(s) / sqrt((var(s) + sigma^2) (var(s) + sigma^2 / (n - 1)))."""
    n_real = 80
    images, proto, sigma = _class_with_noise(n_real=n_real, n_noise=0, seed=2)
    mask = _ops.circle(28, 10) > 0.5
    v = proto[mask].var()
    expected = v / np.sqrt((v + sigma ** 2) * (v + sigma ** 2 / (n_real - 1)))
    cc = correlations_with_others(images, mask)
    # each correlation has a standard error of about 1 / sqrt(pixels in the disc) ~ 0.06; the mean of 80 ~ 0.007
    assert cc.mean() == pytest.approx(expected, abs=0.03)


def test_member_check_drops_the_planted_noise_members_only():
    images, _, _ = _class_with_noise(n_real=60, n_noise=6, snr=0.1, seed=3)
    mask = _ops.circle(28, 10) > 0.5
    keep = member_check(images, mask, 0.5)
    assert keep[:60].all()
    assert not keep[60:].any()
    assert member_check(images, mask, 0.0).all()          # 0: no check


def test_member_check_keeps_a_class_without_common_signal():
    """Members of opposite contrast in equal numbers: every member anti-correlates with the mean of the others,
    the median is negative and there is nothing to judge members by, so all are kept."""
    rng = np.random.default_rng(4)
    proto = prototypes(28)[1]
    signs = np.repeat([1.0, -1.0], 20)
    images = (signs[:, None, None] * proto[None] + rng.normal(0, 0.05, (40, 28, 28))).astype(np.float32)
    mask = _ops.circle(28, 10) > 0.5
    assert np.median(correlations_with_others(images, mask)) < 0
    assert member_check(images, mask, 0.5).all()


def test_stability_task_sends_the_checked_out_members_back_and_rebuilds_the_average(monkeypatch):
    """Pure-noise members that the stability test passed (here forced) leave the stable set, and the class
    average is the average of the real members only."""
    rng = np.random.default_rng(5)
    proto = prototypes(28)[0]
    n, n_noise = 50, 5
    truth = np.column_stack([rng.uniform(-180, 180, n), rng.normal(0, 0.7, n), rng.normal(0, 0.7, n),
                             rng.integers(0, 2, n)])
    real = _ops.transform(np.repeat(proto[None], n, 0), _ops.inverse(truth))
    real += rng.normal(0, 0.15, real.shape).astype(np.float32)
    noise = rng.normal(0, real.std(), (n_noise, 28, 28)).astype(np.float32)
    imgs = normalise_for_alignment(np.concatenate([real, noise]), _ops.circle(28, 10))
    real_test = stability.multi_align_stability

    def every_noise_image_stable(ali, thld_err, diameter):
        res = real_test(ali, thld_err, diameter)
        extra = np.arange(n, n + n_noise)
        stable = np.concatenate([res.stable, extra])
        params = np.concatenate([res.params, ali[-1, extra]])
        return stability.StabilityResult(stable, np.concatenate([res.errors, np.zeros(n_noise)]), params,
                                         res.mirror_rate, res.pixel_error)

    monkeypatch.setattr(stability, "multi_align_stability", every_noise_image_stable)
    outs = {}
    for frac in (0.0, 0.5):
        p = small_params(member_check=frac)
        outs[frac] = class_stability_task((imgs, np.zeros((n + n_noise, 4)), p, make_grid(p),
                                           np.random.default_rng(6), True))
    assert set(range(n, n + n_noise)) <= set(outs[0.0]["stable"].tolist())
    stable = outs[0.5]["stable"]
    assert not set(range(n, n + n_noise)) & set(stable.tolist())
    assert len(stable) >= 0.9 * n
    assert outs[0.0]["checked_out"] == 0
    assert outs[0.5]["checked_out"] == len(outs[0.0]["stable"]) - len(stable) >= n_noise
    p = small_params(member_check=0.5)
    expect = _ops.tanh_lowpass(_ops.transform_sum(imgs[stable], outs[0.5]["params"][stable])
                               / np.float32(len(stable)), p.FH, p.FF)
    np.testing.assert_allclose(outs[0.5]["average"], expect, rtol=0, atol=1e-6)
