"""BufferPool: code arrays are reused, and what it keeps stays within its limit."""
from __future__ import annotations

import numpy as np

from ckpt_rtn.buffers import MIN_POOLED, BufferPool


def test_a_given_back_array_is_lent_again_for_the_same_or_a_smaller_shape() -> None:
    pool = BufferPool(limit=8 * MIN_POOLED)
    first = pool.empty((1024, 2048), np.int8)
    address = first.__array_interface__["data"][0]
    pool.give([first.T])  # a view gives back its base
    again = pool.empty((1024, 1024), np.int8)
    assert again.__array_interface__["data"][0] == address
    assert again.shape == (1024, 1024) and again.dtype == np.int8
    other = pool.empty((1024, 2048), np.int8)  # the free one is lent: a new one
    assert other.__array_interface__["data"][0] != address


def test_small_foreign_and_repeated_arrays_are_ignored() -> None:
    pool = BufferPool(limit=8 * MIN_POOLED)
    small = pool.empty((16,), np.float32)
    foreign = np.zeros(4 * MIN_POOLED, dtype=np.uint8)
    lent = pool.empty((2 * MIN_POOLED,), np.uint8)
    pool.give([small, foreign, lent, lent])
    assert pool._kept == 2 * MIN_POOLED  # only the lent one, once
    assert pool.empty((4 * MIN_POOLED,), np.uint8).__array_interface__["data"][0] != \
        foreign.__array_interface__["data"][0]


def test_what_it_keeps_stays_within_the_limit() -> None:
    pool = BufferPool(limit=3 * MIN_POOLED)
    arrays = [pool.empty((n * MIN_POOLED,), np.uint8) for n in (1, 2, 3)]
    pool.give(arrays)
    assert pool._kept <= 3 * MIN_POOLED
    assert [b.nbytes for b in pool._free] == [MIN_POOLED, 2 * MIN_POOLED]  # largest dropped
