"""BufferPool: code arrays are reused, and what it keeps stays within its limit."""
from __future__ import annotations

import numpy as np

from ckpt_rtn.buffers import ALIGN, MIN_POOLED, BufferPool


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
    assert pool._shelf.kept == 2 * MIN_POOLED + ALIGN  # only the lent one, once
    assert pool.empty((4 * MIN_POOLED,), np.uint8).__array_interface__["data"][0] != \
        foreign.__array_interface__["data"][0]


def test_what_it_keeps_stays_within_the_limit() -> None:
    limit = 3 * MIN_POOLED + 2 * ALIGN  # each buffer holds ALIGN more than it lends
    pool = BufferPool(limit=limit)
    arrays = [pool.empty((n * MIN_POOLED,), np.uint8) for n in (1, 2, 3)]
    pool.give(arrays)
    assert pool._shelf.kept <= limit
    # the largest dropped
    assert [b.nbytes for b in pool._shelf.free] == [MIN_POOLED + ALIGN, 2 * MIN_POOLED + ALIGN]


def test_a_placed_array_starts_at_its_file_offset_modulo_a_block() -> None:
    """So that formats/direct.py writes it around the page cache without staging it."""
    pool = BufferPool(limit=8 * MIN_POOLED)
    for at in (0, 1, 4095, 123_456_789):
        codes = pool.placed(at).empty((1024, 2048), np.int8)
        assert codes.__array_interface__["data"][0] % ALIGN == at % ALIGN
        assert codes.flags.c_contiguous and codes.shape == (1024, 2048)
        pool.give([codes])  # the placed pool lends from the same buffers
    assert len(pool._shelf.free) == 1
    # An offset its elements cannot start at (an odd one for float32): page-aligned instead.
    scales = pool.placed(3).empty((MIN_POOLED,), np.float32)
    assert scales.__array_interface__["data"][0] % ALIGN == 0 and scales.flags.aligned
