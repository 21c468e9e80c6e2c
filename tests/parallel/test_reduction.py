"""Exact, order-independent sums (:mod:`isavar.parallel.reduction`) and the executors' ``map_sum``."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from isavar.parallel.pool import PoolExecutor
from isavar.parallel.reduction import ExactSum, layout_of
from isavar.parallel.serial import SerialExecutor

finite = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False, allow_infinity=False)


def _exact(values) -> Fraction:
    return sum((Fraction(v) for v in values), Fraction(0))


@settings(max_examples=200, deadline=None)
@given(st.lists(finite, min_size=1, max_size=30), st.randoms(use_true_random=False))
def test_any_order_and_grouping_gives_the_same_bits(values, rnd):
    """Summing in any order, or as partial sums merged later, gives identical limbs and values."""
    arrays = [np.array([v]) for v in values]
    first = ExactSum(layout_of(arrays[0:1]))
    for a in arrays:
        first.add((a,))
    shuffled = list(arrays)
    rnd.shuffle(shuffled)
    cut = rnd.randint(0, len(shuffled))
    part_a, part_b = ExactSum(first.layout), ExactSum(first.layout)
    for a in shuffled[:cut]:
        part_a.add((a,))
    for a in shuffled[cut:]:
        part_b.add((a,))
    part_a.merge_limbs(part_b.limbs)
    np.testing.assert_array_equal(first.limbs, part_a.limbs)
    assert first.values()[0].tobytes() == part_a.values()[0].tobytes()


@settings(max_examples=300, deadline=None)
@given(st.lists(finite, min_size=1, max_size=30))
@example([-0.05])
@example([-1.0, 0.25])
@example([-3.0])
def test_the_total_is_the_correctly_rounded_exact_sum(values):
    """The total equals the exact rational sum within the 2**-80 rounding of each term plus one float64 rounding."""
    total = ExactSum(layout_of([np.zeros(1)]))
    for v in values:
        total.add((np.array([v]),))
    exact = _exact(values)
    got = total.values()[0][0]
    bound = abs(float(exact)) * 2.0 ** -51 + len(values) * 2.0 ** -80 + 2.0 ** -70
    assert abs(Fraction(got) - exact) <= Fraction(bound)


def test_plain_float_sums_depend_on_order_but_exact_sums_do_not():
    """The reason for the module: float64 addition in two orders differs; the exact sum does not."""
    values = np.array([1e15, 0.1, -1e15, 0.1, 1e-3])
    assert sum(values) != sum(values[::-1])
    a, b = ExactSum(layout_of([values[:1]])), ExactSum(layout_of([values[:1]]))
    for v in values:
        a.add((np.array([v]),))
    for v in values[::-1]:
        b.add((np.array([v]),))
    assert a.values()[0][0] == b.values()[0][0] == pytest.approx(0.201, abs=1e-12)


def test_complex_and_real_arrays_of_several_shapes():
    rng = np.random.default_rng(0)
    parts = [(rng.normal(size=(4, 3)).astype(np.float32),
              (rng.normal(size=5) + 1j * rng.normal(size=5)).astype(np.complex64)) for _ in range(7)]
    total = ExactSum(layout_of(parts[0]))
    for p in parts:
        total.add(p)
    real, cplx = total.values()
    assert real.dtype == np.float64 and real.shape == (4, 3)
    assert cplx.dtype == np.complex128 and cplx.shape == (5,)
    np.testing.assert_allclose(real, sum(p[0].astype(np.float64) for p in parts), rtol=0, atol=1e-12)
    np.testing.assert_allclose(cplx, sum(p[1].astype(np.complex128) for p in parts), rtol=0, atol=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf, 2.0 ** 53])
def test_unsummable_values_are_refused(bad):
    total = ExactSum(layout_of([np.zeros(2)]))
    with pytest.raises(ValueError, match="element 1"):
        total.add((np.array([0.0, bad]),))


def test_a_wrong_shape_is_refused():
    total = ExactSum(layout_of([np.zeros(2)]))
    with pytest.raises(ValueError, match="shape"):
        total.add((np.zeros(3),))


def _task(seed):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(6, 6)) * 10.0 ** rng.integers(-6, 6), rng.normal(size=3) + 1j), seed


def test_serial_and_pool_map_sum_are_bit_identical():
    seen = []
    serial = SerialExecutor().map_sum(_task, range(11), on_result=seen.append)
    assert seen == list(range(11))
    pool = PoolExecutor(2)
    try:
        pooled = pool.map_sum(_task, range(11))
        assert pool.map_sum(_task, []) is None
    finally:
        pool.close()
    for a, b in zip(serial, pooled, strict=True):
        assert a.tobytes() == b.tobytes()


def test_exact_sums_merge_and_survive_a_save_exactly(tmp_path):
    """Two halves merged = one sum; saved with np.savez and loaded, the sum continues to the same bits."""
    serial = SerialExecutor()
    whole = serial.map_sum(_task, range(10), exact=True)
    first, second = serial.map_sum(_task, range(4), exact=True), serial.map_sum(_task, range(4, 10), exact=True)
    np.savez(tmp_path / "sum.npz", **first.to_arrays("total"))
    with np.load(tmp_path / "sum.npz") as saved:
        resumed = ExactSum.from_arrays(saved, "total")
    merged = resumed.merge(second)
    assert merged.count == whole.count == 10
    assert np.array_equal(merged.limbs, whole.limbs)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(merged.values(), serial.map_sum(_task, range(10))))
    with pytest.raises(ValueError, match="layout"):
        merged.merge(ExactSum(layout_of((np.zeros(2),))))
