"""ISAC2 pre-processing against planted truth: VPP whitening flattens a planted noise spectrum; filament masks
follow each segment's planted angle."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from isavar.isac.params import Isac2Params
from isavar.isac.preprocess import correct_and_shrink, radial_amplitude_sum, vpp_table


def _radial_power(images):
    n = images.shape[-1]
    spec = np.abs(np.fft.fft2(images)) ** 2
    k = np.rint(np.hypot(*np.meshgrid(np.fft.fftfreq(n) * n, np.fft.fftfreq(n) * n, indexing="ij"))).astype(int)
    sel = k < n // 2
    prof = np.bincount(k[sel], weights=spec.mean(axis=0)[sel]) / np.bincount(k[sel])
    return prof


def test_vpp_whitening_flattens_a_planted_coloured_spectrum(rng):
    """Images of noise with a planted radial amplitude A(k) (falling 30-fold to Nyquist): after SPHIRE's VPP
    table rpw(k) = N / sum_i sqrt(P_i(k)), the power spectrum is flat to within sampling error."""
    n, box = 200, 48
    k = np.hypot(*np.meshgrid(np.fft.fftfreq(box), np.fft.fftfreq(box), indexing="ij"))
    amplitude = 1.0 / (1.0 + (k / 0.06) ** 2)                           # planted: 1 at k=0, 1/30 at Nyquist
    white = rng.normal(size=(n, box, box))
    coloured = np.fft.ifft2(np.fft.fft2(white) * amplitude).real.astype(np.float32)
    before = _radial_power(coloured)
    assert before[2] / before[box // 2 - 2] > 100                      # the planted colour is there
    rpw = vpp_table(radial_amplitude_sum(coloured), n)
    from isavar.core.filters import apply_radial_filter

    after = _radial_power(apply_radial_filter(coloured, rpw))
    shells = after[2: box // 2 - 1]
    assert shells.max() / shells.min() < 1.25                          # flat (sampling spread ~ +-10 %)


def _bar_images(rng, angles, box=48, half_width=3, level=4.0, noise=0.3):
    """Planted filament segments: a bar of ``level`` along the unit vector (cos a, -sin a) in (x, row)
    coordinates through the centre (the segment-angle convention of the filament masks), on noise."""
    c = box // 2
    rows, cols = np.mgrid[:box, :box] - c
    out = []
    for a in np.deg2rad(angles):
        # distance across the filament axis (the axis direction is (cos a, -sin a) in (x, row))
        across = np.abs(cols * np.sin(a) + rows * np.cos(a))
        out.append(np.where(across <= half_width, level, 0.0) + rng.normal(0, noise, (box, box)))
    return np.asarray(out, dtype=np.float32)


def test_filament_masks_follow_each_planted_segment_angle(rng):
    """In filament mode the normalisation mean is taken outside a rectangle along each image's own segment
    angle: with the planted angles the background comes out at 0; with the angles turned by 90 degrees the
    bar leaks into the 'outside' region and the background is pulled negative."""
    angles = rng.uniform(0, 180, 12)
    images = _bar_images(rng, angles)
    p = Isac2Params(radius=20, filament_width=10, target_radius=20, target_nx=48)
    c = images.shape[-1] // 2
    rows, cols = np.mgrid[:48, :48] - c

    def background_means(segment_angles):
        out, _ = correct_and_shrink(images, pd.DataFrame({"segment_angle_deg": segment_angles}), p, None)
        means = []
        for img, a in zip(out, np.deg2rad(angles)):                 # the planted background: far from the bar
            far = np.abs(cols * np.sin(a) + rows * np.cos(a)) > 8
            means.append(img[far].mean())
        return np.array(means), out

    right, out = background_means(angles)
    assert out.shape == images.shape
    assert np.abs(right).max() < 0.05                                  # noise sd 0.3 over ~1500 pixels
    wrong, _ = background_means(angles + 90.0)
    assert (wrong < -0.3).all()                                        # the bar's level leaked into the mean
