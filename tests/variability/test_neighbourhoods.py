"""Angular groups: exact folded-angle k-NN over symmetry copies (spec §3.4)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from isavar.conventions import euler_to_matrix
from isavar.core.geometry import random_rotations, symmetry_matrices
from isavar.variability.neighbourhoods import NeighbourSearch, brute_force_groups, centre_order


def _rotations_with_poles_and_antipodes(rng, n=300):
    a = random_rotations(n, rng)
    # exact poles (tilt 0 and 180), and exact antipodal partners of the first 20 particles
    poles = euler_to_matrix([0.0, 30.0, 0.0, 77.0], [0.0, 0.0, 180.0, 180.0], [10.0, 50.0, 0.0, 200.0])
    rot, tilt = rng.uniform(0, 360, 20), rng.uniform(0, 180, 20)
    direct = euler_to_matrix(rot, tilt, rng.uniform(0, 360, 20))
    anti = euler_to_matrix(rot + 180.0, 180.0 - tilt, rng.uniform(0, 360, 20))
    return np.concatenate([a, poles, direct, anti])


@pytest.mark.parametrize("sym", ["c1", "c4", "d2"])
def test_exact_groups_match_brute_force(rng, sym):
    rots = _rotations_with_poles_and_antipodes(rng)
    s = symmetry_matrices(sym)
    centres = np.arange(0, len(rots), 3)
    fast = NeighbourSearch(rots, s).groups(centres, 25)
    slow = brute_force_groups(rots, s, centres, 25)
    np.testing.assert_allclose(fast.angle_deg, slow.angle_deg, atol=1e-5)
    # identical member sets wherever the G-th and (G+1)-th distances are not tied
    wider = brute_force_groups(rots, s, centres, 26)
    clear = (wider.angle_deg[:, 25] - wider.angle_deg[:, 24]) > 1e-4
    assert clear.mean() > 0.8
    key_fast = np.sort(fast.members * 100 + fast.sym_ops, axis=1)[clear]
    key_slow = np.sort(slow.members * 100 + slow.sym_ops, axis=1)[clear]
    np.testing.assert_array_equal(key_fast, key_slow)
    assert np.array_equal(fast.members[:, 0], centres)
    assert not fast.mirror[:, 0].any() and (fast.sym_ops[:, 0] == 0).all()
    assert np.all(np.diff(fast.angle_deg, axis=1) >= -1e-9)
    assert fast.angle_deg.max() <= 90.0 + 1e-9  # folded distance never exceeds 90 degrees


def test_antipodal_partner_is_mirrored_neighbour(rng):
    rots = _rotations_with_poles_and_antipodes(rng)
    n0 = len(rots) - 40
    g = NeighbourSearch(rots, symmetry_matrices("c1")).groups(np.arange(n0, n0 + 20), 2)
    # the nearest neighbour of each "direct" view is its exact antipode, used mirrored at distance 0
    np.testing.assert_array_equal(g.members[:, 1], np.arange(n0 + 20, n0 + 40))
    assert g.mirror[:, 1].all()
    np.testing.assert_allclose(g.angle_deg[:, 1], 0.0, atol=1e-6)


def test_group_larger_than_data_is_rejected(rng):
    with pytest.raises(ValueError):
        NeighbourSearch(random_rotations(5, rng), symmetry_matrices("c1")).groups([0], 6)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_groups_invariant_under_global_rotation(seed):
    """Rotating every particle by the same rotation (A -> A R) leaves the groups unchanged (c1)."""
    rng = np.random.default_rng(seed)
    rots = random_rotations(80, rng)
    r = random_rotations(1, rng)[0]
    s = symmetry_matrices("c1")
    a = NeighbourSearch(rots, s).groups(np.arange(0, 80, 7), 8)
    b = NeighbourSearch(rots @ r, s).groups(np.arange(0, 80, 7), 8)
    np.testing.assert_allclose(a.angle_deg, b.angle_deg, atol=1e-7)
    np.testing.assert_array_equal(np.sort(a.members, 1), np.sort(b.members, 1))


def test_centre_order_is_a_compact_permutation(rng):
    rots = random_rotations(2000, rng)
    order = centre_order(rots, 200)
    assert np.array_equal(np.sort(order), np.arange(2000))
    d = rots[order, 2, :] * np.sign(rots[order, 2, 2])[:, None]
    # consecutive chunks span far less than the hemisphere: mean pairwise angle within chunks is small
    spans = []
    for s in range(0, 2000, 200):
        u = d[s:s + 200]
        spans.append(np.degrees(np.arccos(np.clip(np.abs(u @ u.T), -1, 1))).mean())
    assert np.mean(spans) < 35.0  # random chunks of the hemisphere give about 57 degrees
