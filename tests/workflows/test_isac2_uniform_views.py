"""Small version of the ISAC2 benchmark's quality test with uniformly random views.

The benchmark (bench/isac2_bench.py) simulates an asymmetric particle in uniformly random views with CTF and
noise and compares ISAC2's purity15 with an oracle that clusters the same accounted particles by their true
views. This is the same measurement at test-suite size (1,200 particles, box 48, SNR 0.3, 38 classes of 30).

What the thresholds rest on (bench/isac2.md, "Uniform views at test-suite size"): on this data ISAC2 reaches
purity15 = 0.61-0.67 of the oracle's over three data/seed pairs, while an equal-size partition drawn at
random scores about 0.09 (a class covers a patch of about 13° radius, so only near members count). Even
nearly noise-free images (SNR 2) classified once against the averages of the oracle's own classes reach only
0.88-0.93 of the oracle, because at this size neighbouring views look alike. The test therefore requires a
purity well above chance and at least half of the oracle's, not the benchmark's 0.9 (which is not met: see
bench/isac2.md).
"""

import numpy as np
import pytest

from isavar.conventions import viewing_direction
from isavar.io import read_particles, write_particles
from isavar.isac.params import Isac2Params
from isavar.report.validation import oracle_view_classes, view_purity
from isavar.workflows.isac2 import run_isac2

BOX, APIX, N = 48, 3.0, 1200


@pytest.fixture(scope="module")
def uniform_run(tmp_path_factory):
    from isavar.synthetic import phantom_volume, simulate_particles

    folder = tmp_path_factory.mktemp("isac2_uniform")
    vol = phantom_volume("blob", BOX, APIX)
    imgs, table = simulate_particles(vol, N, pixel_size_A=APIX, snr=0.3, orientations="random",
                                     shift_sd_A=3.0, noise_fraction=0.1, rng=11)
    stack = folder / "particles.star"
    write_particles(stack, imgs, table)
    params = Isac2Params(radius=18, target_radius=18, target_nx=44, img_per_grp=30, minimum_grp_size=12,
                         maxit=8, init_iter=2, stab_ali=4, thld_err=0.7, CTF=True, rand_seed=7)
    out = folder / "run"
    result = run_isac2(stack, out, params)
    inputs = read_particles(stack).table
    accounted = read_particles(out / "particles.star").table
    return inputs, accounted, result


def _true_directions(table):
    return viewing_direction(table["true_angle_rot_deg"], table["true_angle_tilt_deg"])


def test_uniform_views_purity_beats_chance_and_reaches_half_the_oracle(uniform_run):
    inputs, accounted, result = uniform_run
    is_noise = accounted["true_is_noise"].to_numpy() == 1
    real = accounted[~is_noise]
    dirs = _true_directions(real)
    labels = real["class_number"].to_numpy()
    # noise images among the accounted count as impure
    isac = view_purity(dirs, labels) * len(real) / len(accounted)
    oracle = view_purity(dirs, oracle_view_classes(dirs, result.n_classes))
    rng = np.random.default_rng(0)
    chance = np.mean([view_purity(dirs, rng.permutation(labels)) for _ in range(5)])
    assert result.n_classes >= 30
    assert oracle > 0.9
    assert isac >= 0.5 * oracle
    assert isac >= 4 * chance


def test_uniform_views_most_particles_accounted_and_noise_left_out(uniform_run):
    inputs, accounted, _ = uniform_run
    n_noise = int((inputs["true_is_noise"] == 1).sum())
    noise_kept = int((accounted["true_is_noise"] == 1).sum())
    assert len(accounted) >= 0.5 * len(inputs)
    assert noise_kept <= 0.2 * n_noise
