"""Rotational averages, power spectra, FRC/FSC and streaming mean/variance."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from isavar.core.stats import (
    RunningMeanVariance,
    frc,
    fsc,
    group_sums,
    power_spectrum_1d,
    ring_index,
    rotational_average,
    shell_counts,
)


def test_rotational_average_of_radial_function():
    n = 33
    r = ring_index(n)
    img = (r.astype(np.float32) ** 2)[None]
    out = rotational_average(img)
    assert out.shape == (1, n // 2 + 1)
    np.testing.assert_allclose(out[0], np.arange(n // 2 + 1) ** 2)


def test_rotational_average_centre_is_n_over_2():
    img = np.zeros((8, 8), np.float32)
    img[4, 4] = 5.0
    out = rotational_average(img)
    assert out[0] == 5.0 and (out[1:] == 0).all()


def test_power_spectrum_white_noise_is_flat(rng):
    v = 4.0
    img = rng.normal(0, np.sqrt(v), size=(40, 64, 64)).astype(np.float32)
    ps = power_spectrum_1d(img).mean(axis=0)
    counts = shell_counts((64, 64))
    # Each shell averages 40 * count exponential-ish variables: relative sd ~ 1/sqrt(40 count).
    tol = 5.0 / np.sqrt(40 * counts[1:])
    assert (np.abs(ps[1:] / v - 1) < tol).all()


def test_power_spectrum_of_plane_wave():
    n = 32
    y, x = np.mgrid[:n, :n]
    wave = np.cos(2 * np.pi * 5 * x / n).astype(np.float32)
    ps = power_spectrum_1d(wave)
    peak = np.argmax(ps)
    assert peak == 5
    # |F|^2 / N^2 = N^2 / 4 at each of the two samples; shell 5 holds shell_counts[5] samples.
    assert ps[5] == pytest.approx(2 * (n * n / 4) / shell_counts((n, n))[5], rel=1e-5)


def test_frc_identical_is_one_and_scale_invariant(rng):
    a = rng.normal(size=(2, 32, 32))
    np.testing.assert_allclose(frc(a, a), 1.0)
    np.testing.assert_allclose(frc(a, 3.0 * a), 1.0)
    np.testing.assert_allclose(frc(a, -a), -1.0)


def test_frc_independent_noise_is_small(rng):
    n = 64
    a = rng.normal(size=(n, n))
    b = rng.normal(size=(n, n))
    c, counts = frc(a, b, return_counts=True)
    # Each Fourier sample appears with its Hermitian twin: about counts / 2 independent terms.
    assert (np.abs(c[2:]) < 3.0 * np.sqrt(2.0 / counts[2:])).all()


def test_frc_planted_signal_plus_noise(rng):
    """FRC of two noisy copies of one signal at per-shell SNR s: expected s / (1 + s)."""
    n = 64
    sig = rng.normal(size=(n, n))
    noise_sd = 1.0
    a = sig + rng.normal(0, noise_sd, size=(n, n))
    b = sig + rng.normal(0, noise_sd, size=(n, n))
    c, counts = frc(a, b, return_counts=True)
    assert np.abs(c[4:] - 0.5).max() < 4 * np.sqrt(2.0 / counts[4:]).max()


def test_fsc_volumes(rng):
    v = rng.normal(size=(16, 16, 16))
    w = rng.normal(size=(16, 16, 16))
    np.testing.assert_allclose(fsc(v, v), 1.0)
    c, counts = fsc(v, w, return_counts=True)
    assert c.shape == (9,)
    assert (np.abs(c[2:]) < 3.0 * np.sqrt(2.0 / counts[2:])).all()


def test_running_mean_variance_matches_numpy(rng):
    data = rng.normal(5.0, 2.0, size=(103, 4, 4))
    acc = RunningMeanVariance((4, 4))
    for start in range(0, 103, 17):
        acc.update(data[start : start + 17])
    np.testing.assert_allclose(acc.mean, data.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(acc.variance(), data.var(axis=0, ddof=1), rtol=1e-10)
    np.testing.assert_allclose(acc.std(ddof=0), data.std(axis=0), rtol=1e-10)
    assert acc.count == 103


def test_running_mean_variance_merge(rng):
    data = rng.normal(size=(50, 3))
    parts = [RunningMeanVariance((3,)) for _ in range(3)]
    parts[0].update(data[:10])
    parts[1].update(data[10:35])
    parts[2].update(data[35:])
    total = RunningMeanVariance((3,))
    for p in parts:
        total.merge(RunningMeanVariance.from_state(*p.state()))
    np.testing.assert_allclose(total.variance(), data.var(axis=0, ddof=1), rtol=1e-10)
    empty = RunningMeanVariance((3,))
    assert np.isnan(empty.variance()).all()
    with pytest.raises(ValueError):
        total.update(np.zeros((2, 4)))


@given(labels=st.lists(st.integers(-2, 6), min_size=0, max_size=40), seed=st.integers(0, 2**31 - 1))
def test_group_sums_equal_a_loop_over_items(labels, seed):
    rng = np.random.default_rng(seed)
    labels = np.array(labels, dtype=np.int64)
    values = rng.normal(size=(labels.size, 3, 2)).astype(np.float32)
    expected = np.zeros((5, 3, 2))
    for lab, v in zip(labels, values):
        if 0 <= lab < 5:                      # labels outside 0..n_groups-1 are ignored
            expected[lab] += v
    assert np.allclose(group_sums(values, labels, 5), expected, atol=1e-6)
