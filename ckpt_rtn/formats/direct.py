"""Writing an output file around the page cache (O_DIRECT), in whole aligned blocks.

A conversion writes its output once and does not read it back, so passing
it through the page cache only costs: the kernel copies every byte into
cache pages it allocates, charges and tracks, writes them back later, and
the closing fsync waits for that. On the 2-core test machine, writing 2 GB
from memory and fsyncing it took 2.0-5.6 s and 1.4-4.8 s of system CPU
that way, and 0.6-0.8 s and 0.05 s with O_DIRECT (docs/benchmarks.md). The
cached output also pushes the input, which is read through the cache, out
of it.

O_DIRECT takes only writes whose file offset, length and memory address are
multiples of the device's block, while a format puts a tensor's bytes
wherever its headers end. So each write is cut in three: the whole blocks
in its middle go to the file straight from memory when the memory is
aligned the same way, else through an aligned staging buffer (a copy, but
no page cache); the partial blocks at either end are gathered in memory
until their neighbours fill them. At the end, a block still partial (the
file's last) is written padded and the file cut back to its size.

Where the filesystem refuses O_DIRECT (EINVAL, at open or at the first
write), the file is written through the page cache as before, the same bytes.
So is a file in memory (tmpfs, /dev/shm): its pages are the page cache, so
O_DIRECT bypasses nothing there and only adds the staging copy (16 cores,
7.9 GB into /dev/shm: 3.27 s direct, 3.09 s buffered).
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import sys
import threading
from typing import Dict, List, Tuple

import numpy as np

#: Alignment of offsets, lengths and addresses: a multiple of any device's logical block.
BLOCK = 4096
#: Bytes copied into the aligned staging buffer per write, when the memory is not aligned.
STAGING = 8 * 1024 * 1024
#: statfs f_type of the filesystems whose files live in memory (linux/magic.h): tmpfs, ramfs.
IN_MEMORY = frozenset({0x01021994, 0x858458F6})


def _address(view: memoryview) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data if len(view) else 0


def pwrite_all(fd: int, data: "bytes | bytearray | memoryview", pos: int) -> None:
    """os.pwrite until every byte of `data` is at `pos`."""
    view = memoryview(data).cast("B")
    while len(view):
        written = os.pwrite(fd, view, pos)
        view, pos = view[written:], pos + written


class BlockWriter:
    """pwrite for one file, by O_DIRECT where the filesystem allows it (and `direct`, else
    through the page cache); thread-safe.

    Each byte of the file must be written once, no more: a partial block is
    complete when its pieces add up to a block. `finish` must be called once
    every byte is written (before the fsync).
    """

    def __init__(self, fd: int, direct: bool = True) -> None:
        self.fd = fd
        self.direct = direct and not in_memory(fd) and _set_direct(fd, True)
        self._lock = threading.Lock()
        #: Blocks written in part: block index -> (its bytes so far, the (start, length) of
        #: each piece filled).
        self._partial: Dict[int, Tuple[bytearray, List[Tuple[int, int]]]] = {}
        self._local = threading.local()  # each thread's staging buffer

    def pwrite(self, data: "bytes | bytearray | memoryview", pos: int) -> None:
        view = memoryview(data).cast("B")
        if not len(view):
            return
        if not self.direct:
            pwrite_all(self.fd, view, pos)
            return
        end = pos + len(view)
        first, last = -(-pos // BLOCK) * BLOCK, end // BLOCK * BLOCK
        if first >= last:  # no whole block: all of it is gathered
            self._gather(view, pos)
            return
        self._gather(view[:first - pos], pos)
        self._gather(view[last - pos:], last)
        try:
            self._whole_blocks(view[first - pos:last - pos], first)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._fall_back()
            pwrite_all(self.fd, view[first - pos:last - pos], first)

    def finish(self) -> None:
        """Write the blocks still partial (padded; the file's size is kept)."""
        if not self.direct or not self._partial:
            return
        size = os.fstat(self.fd).st_size
        with self._lock:
            partial, self._partial = self._partial, {}
        for index in sorted(partial):
            self._write_block(index, partial[index][0])
        os.ftruncate(self.fd, size)

    def _gather(self, view: memoryview, pos: int) -> None:
        """Copy `view` (within one or two blocks) into its blocks; write those now full."""
        while len(view):
            index, start = divmod(pos, BLOCK)
            length = min(len(view), BLOCK - start)
            full = None
            with self._lock:
                gathered = self.direct  # else fell back meanwhile
                if gathered:
                    block, filled = self._partial.setdefault(index, (bytearray(BLOCK), []))
                    block[start:start + length] = view[:length]
                    filled.append((start, length))
                    if sum(n for _, n in filled) == BLOCK:
                        full = self._partial.pop(index)[0]
            if not gathered:
                pwrite_all(self.fd, view[:length], pos)
            elif full is not None:
                self._write_block(index, full)
            view, pos = view[length:], pos + length

    def _write_block(self, index: int, block: bytearray) -> None:
        try:
            self._whole_blocks(memoryview(block), index * BLOCK)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            self._fall_back()
            pwrite_all(self.fd, block, index * BLOCK)

    def _whole_blocks(self, view: memoryview, pos: int) -> None:
        """Write whole blocks at an aligned `pos`, from aligned memory or through staging."""
        if _address(view) % BLOCK == 0:
            pwrite_all(self.fd, view, pos)
            return
        staging = getattr(self._local, "staging", None)
        if staging is None:
            staging = self._local.staging = mmap.mmap(-1, STAGING)  # page-aligned
        for start in range(0, len(view), STAGING):
            piece = view[start:start + STAGING]
            staging[:len(piece)] = piece
            pwrite_all(self.fd, memoryview(staging)[:len(piece)], pos + start)

    def _fall_back(self) -> None:
        """The filesystem refused a direct write: the page cache from now on, and the
        pieces gathered so far written as they are (the rest of their blocks, which
        other threads may be writing now, is left alone)."""
        with self._lock:
            if not self.direct:
                return
            # O_DIRECT off before the flag: a thread that reads the flag without the lock and
            # finds it off then writes unaligned pieces as they are, which O_DIRECT refuses.
            _set_direct(self.fd, False)
            self.direct = False
            partial, self._partial = self._partial, {}
        for index, (block, filled) in partial.items():
            for start, length in filled:
                pwrite_all(self.fd, memoryview(block)[start:start + length],
                           index * BLOCK + start)


def in_memory(fd: int) -> bool:
    """Whether `fd`'s file lives in memory (tmpfs, ramfs); False where that cannot be told."""
    if not sys.platform.startswith("linux"):  # the magic numbers and the layout are Linux's
        return False
    buffer = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit Linux
    if ctypes.CDLL(None).fstatfs(fd, buffer) != 0:  # the process's own libc
        return False
    # f_type opens struct statfs: a long on most ABIs, an unsigned int on s390x. The magic
    # numbers fit in 32 bits, so one of the two readings finds them on either byte order.
    return (ctypes.c_ulong.from_buffer(buffer).value in IN_MEMORY
            or ctypes.c_uint.from_buffer(buffer).value in IN_MEMORY)


def _set_direct(fd: int, on: bool) -> bool:
    """Turn O_DIRECT on or off for `fd`; False where the filesystem does not have it."""
    if not hasattr(os, "O_DIRECT"):
        return False
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_DIRECT if on else flags & ~os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    return on
