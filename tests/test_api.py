"""The public API (isavar.read_particles, isavar.isac2, isavar.variability) on tiny planted data."""

from __future__ import annotations

import numpy as np
import pytest

import isavar
from isavar.io import write_particles
from isavar.synthetic import phantom_volume, simulate_particles

APIX = 3.0
ISAC = dict(radius=15, target_radius=10, target_nx=28, img_per_grp=40, minimum_grp_size=15, maxit=4,
            init_iter=1, stab_ali=2, rand_seed=5, thld_err=0.7)


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    """150 noisy projections of a blob from 3 planted views."""
    d = tmp_path_factory.mktemp("api_views")
    imgs, table = simulate_particles(phantom_volume("blob", 40, APIX), 150, pixel_size_A=APIX, snr=0.5,
                                     orientations="views:3", rng=4)
    write_particles(d / "p.star", imgs, table, pixel_size_A=APIX)
    return d / "p.star", imgs, table


@pytest.fixture(scope="module")
def two_states(tmp_path_factory):
    d = tmp_path_factory.mktemp("api_states")
    a, b = phantom_volume("two_state", 24, APIX)
    imgs, table = simulate_particles([a, b], 120, pixel_size_A=APIX, snr=2.0, ctf=True, weights=[0.3, 0.7], rng=5)
    write_particles(d / "v.star", imgs, table, pixel_size_A=APIX)
    return d / "v.star", a, b


def test_read_particles_gives_back_the_planted_particles(views):
    path, imgs, table = views
    with isavar.read_particles(path) as stack:
        assert stack.pixel_size_A == APIX
        np.testing.assert_array_equal(stack.images[np.arange(len(imgs))], imgs)
        np.testing.assert_allclose(stack.table["angle_tilt_deg"], table["angle_tilt_deg"], atol=1e-4)
        np.testing.assert_array_equal(stack.table["true_view"], table["true_view"])


def test_isac2_classes_follow_the_planted_views_in_memory_and_on_disk(views, tmp_path):
    path, imgs, table = views
    res = isavar.isac2(path, **ISAC)
    assert res.n_classes == 3 and sum(len(m) for m in res.members) >= 120
    truth = table["true_view"].to_numpy()
    for m in res.members:                                   # each class holds one planted view
        assert np.bincount(truth[m]).max() >= 0.9 * len(m)
    assert len({np.bincount(truth[m]).argmax() for m in res.members}) == 3
    with isavar.read_particles(path) as stack:              # a ParticleStack gives the same classes
        again = isavar.isac2(stack, **ISAC)
    on_disk = isavar.isac2(path, tmp_path / "run", workers=2, **ISAC)
    assert (tmp_path / "run" / "particles.star").exists() and (tmp_path / "run" / "log.txt").exists()
    for other in (again, on_disk):
        assert len(other.members) == len(res.members)
        assert all(np.array_equal(a, b) for a, b in zip(res.members, other.members))
    with pytest.raises(TypeError, match="file name"):
        isavar.isac2(imgs, tmp_path / "other", **ISAC)


def test_variability_is_high_where_the_planted_states_differ(two_states, tmp_path):
    path, a, b = two_states
    var = isavar.variability(path, img_per_grp=10, ctf=True)
    diff, mean = np.abs(a - b), (a + b) / 2
    differs = diff > 0.5 * diff.max()
    common = (diff < 0.05 * diff.max()) & (mean > 0.3 * mean.max())
    assert var.var3d[differs].mean() > 3 * var.var3d[common].mean()
    on_disk = isavar.variability(path, tmp_path / "run", params=isavar.variability.VariabilityParams(
        img_per_grp=10, ctf=True))
    np.testing.assert_array_equal(on_disk.var3d, var.var3d)
    assert (tmp_path / "run" / "var3D.mrc").exists()
    with pytest.raises(TypeError, match="either params or keyword"):
        isavar.variability(path, params=on_disk, img_per_grp=10)
