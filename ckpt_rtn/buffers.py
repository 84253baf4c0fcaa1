"""Code arrays reused from tensor to tensor, so a conversion zeroes fresh pages once.

A new numpy array of hundreds of MB is fresh anonymous memory: the kernel
zeroes every page on its first touch and takes it back when the array is
freed. Converting one 70B-shaped layer on 2 cores, a third of all CPU
samples (`perf record`) were the kernel zeroing the pages of new code
arrays. An LLM's Linear weights repeat a few shapes layer after layer, so
the arrays handed back once their tensor is written fit the next tensors of
that shape, and each is zeroed once.

The pool keeps at most `limit` bytes of arrays not in use (the smallest
first); what is in use is bounded by the pipeline, which gives every array
back once its tensor is written. An array can be lent at a chosen address
modulo a disk block (`placed`), so that writing it around the page cache
needs no copy.
"""
from __future__ import annotations

import copy
import threading
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

#: Smaller arrays come from numpy directly: malloc reuses small blocks by itself.
MIN_POOLED = 1 << 20
#: Lent arrays can start at any address modulo this (formats/direct.py's BLOCK, a multiple
#: of any device's logical block): each buffer holds this many bytes more than it lends.
ALIGN = 4096


def _root(array: np.ndarray) -> np.ndarray:
    """The array that owns the memory of `array` (itself, or the base of its views)."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


class BufferPool:
    """Lends uninitialised arrays (`empty`) and takes them back (`give`), thread-safe."""

    def __init__(self, limit: int) -> None:
        self._shelf = _Shelf(limit)
        self._at = 0

    def placed(self, at: int) -> "BufferPool":
        """This pool (the same arrays), lending arrays whose address is congruent to `at`
        modulo ALIGN.

        `at` is the file offset an array will be written at: formats/direct.py
        writes memory placed so around the page cache as it is, and any other
        through a staging buffer, a copy (writing 1.9 GB on the 2-core test
        machine: 0.74 s from placed memory, 1.0-1.4 s staged).
        """
        pool = copy.copy(self)  # the shelf is shared
        pool._at = at
        return pool

    def empty(self, shape: Tuple[int, ...], dtype: "np.dtype | type") -> np.ndarray:
        """An uninitialised array, in the smallest free buffer that holds it, else new."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if nbytes < MIN_POOLED:
            return np.empty(shape, dtype=dtype)
        buffer = self._shelf.take(nbytes + ALIGN)
        address = buffer.ctypes.data
        start = (self._at - address) % ALIGN
        if start % dtype.alignment:  # placed there, its elements would be misaligned
            start = -address % ALIGN
        return buffer[start:start + nbytes].view(dtype).reshape(shape)

    def give(self, arrays: Sequence[np.ndarray]) -> None:
        """Take back the buffers behind `arrays` (views included; others are ignored).
        Nothing may use them afterwards."""
        self._shelf.give(arrays)


class _Shelf:
    """The buffers of a pool: lent, or free (at most `limit` bytes of those)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self.free: List[np.ndarray] = []  # uint8 buffers, smallest first
        self._lent: Dict[int, np.ndarray] = {}  # id -> buffer
        self.kept = 0  # bytes in self.free

    def take(self, nbytes: int) -> np.ndarray:
        """The smallest free buffer of at least `nbytes`, else a new one; now lent."""
        with self._lock:
            index = next((i for i, b in enumerate(self.free) if b.nbytes >= nbytes), None)
            if index is None:
                buffer = np.empty(nbytes, dtype=np.uint8)
            else:
                buffer = self.free.pop(index)
                self.kept -= buffer.nbytes
            self._lent[id(buffer)] = buffer
        return buffer

    def give(self, arrays: Sequence[np.ndarray]) -> None:
        with self._lock:
            for array in arrays:
                buffer = self._lent.pop(id(_root(array)), None)
                if buffer is None:
                    continue
                self.free.append(buffer)
                self.free.sort(key=lambda b: b.nbytes)
                self.kept += buffer.nbytes
                while self.kept > self.limit:  # drop the largest
                    self.kept -= self.free.pop().nbytes


def empty(shape: Tuple[int, ...], dtype: "np.dtype | type",
          pool: Optional[BufferPool]) -> np.ndarray:
    """An uninitialised array: from `pool` if there is one, else new."""
    return np.empty(shape, dtype=dtype) if pool is None else pool.empty(shape, dtype)
