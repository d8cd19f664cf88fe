"""The per-document shuffle (data/order.py): a bijection of range(n) for every n, set by the
seed alone, that looks random (checked against plain statistics computed here) and costs no
memory per element."""

import tracemalloc

import numpy as np
import pytest

from megatron_ext.data.order import FeistelOrder


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 255, 256, 257, 1000, 4097, 65537])
def test_every_position_maps_to_a_distinct_element(n):
    values = FeistelOrder(n, seed=11).many(range(n))
    assert sorted(values.tolist()) == list(range(n))


def test_the_order_is_a_function_of_the_seed_and_the_position_alone():
    a, b = FeistelOrder(10_000, seed=3), FeistelOrder(10_000, seed=3)
    positions = [9_999, 0, 5_000, 17, 5_000]  # any order of asking, repeats included
    assert [a(i) for i in positions] == [b(i) for i in reversed(positions)][::-1]
    other = FeistelOrder(10_000, seed=4).many(range(10_000))
    same = FeistelOrder(10_000, seed=3).many(range(10_000))
    assert (other != same).mean() > 0.99


def test_the_order_looks_random():
    """Against a uniform shuffle: the rank correlation of position and element near 0 (its
    standard deviation is 1/sqrt(n)), fixed points ~1, and neighbours scattered as far apart as
    two random elements are (mean |difference| ~ n/3)."""
    n = 20_000
    order = FeistelOrder(n, seed=42).many(range(n)).astype(np.float64)
    positions = np.arange(n, dtype=np.float64)
    correlation = np.corrcoef(positions, order)[0, 1]
    assert abs(correlation) < 4 / np.sqrt(n)
    assert (order == positions).sum() <= 6
    gaps = np.abs(np.diff(order)).mean()
    assert abs(gaps / n - 1 / 3) < 0.02


def test_the_shuffle_holds_no_memory_per_element():
    tracemalloc.start()
    order = FeistelOrder(365_000_000, seed=1)  # C4 en's document count
    values = [order(i) for i in (0, 1, 364_999_999, 123_456_789)]
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64 * 1024, peak  # an order array would be 2.9 GB
    assert len(set(values)) == 4 and all(0 <= v < 365_000_000 for v in values)
    with pytest.raises(IndexError):
        order(365_000_000)
