"""What a checkpoint file holds, independent of its format."""
from __future__ import annotations

import contextlib
import errno
import math
import mmap
import os
import threading
import zlib
from array import array
from dataclasses import dataclass
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ..dtypes import DType, STRING
from ..errors import FormatError, OutputError
from ..paths import open_input
from .atomic import AtomicFile
from .direct import BlockWriter
from .untrusted_json import brief


@dataclass(frozen=True)
class TensorInfo:
    """A tensor's name, element type, shape and size in bytes: no data.

    Readers build these from headers alone, so a whole checkpoint can be
    listed, planned and validated without touching tensor bytes.
    """

    name: str
    dtype: DType
    shape: Tuple[int, ...]
    nbytes: int

    @classmethod
    def of(cls, name: str, dtype: DType, shape: Sequence[int]) -> "TensorInfo":
        """A spec whose byte size follows from dtype and shape."""
        if dtype.itemsize is None:
            raise ValueError(f"{name}: the size of a {dtype} tensor is not implied by its shape")
        shape = tuple(int(d) for d in shape)
        return cls(name, dtype, shape, math.prod(shape) * dtype.itemsize)


class Segment(NamedTuple):
    """A run of a tensor's bytes at a file offset (a ckpt chunk record)."""

    offset: int
    length: int


def as_array(info: TensorInfo, raw: np.ndarray) -> np.ndarray:
    """View a tensor's raw bytes (uint8) as the array it stands for.

    Opaque dtypes stay flat bytes; a str value becomes a 0-d numpy string
    (readers refuse str values whose length is not a whole number of UTF-32
    code units; numpy has no empty string type, so "" is '<U1').
    """
    if info.dtype is STRING:
        return raw.view(f"<U{raw.size // 4}").reshape(()) if raw.size else np.array("", "<U1")
    if info.dtype.numpy is None:
        return raw
    return raw.view(info.dtype.numpy).reshape(info.shape)


#: Writes of at most this size are gathered into runs of adjacent bytes...
_SMALL_WRITE = 64 * 1024
#: ...written once they reach this size, or when more than _MAX_RUNS runs are open.
_RUN_SIZE = 1024 * 1024
_MAX_RUNS = 16
#: Tensors from this size on are mapped rather than read (see TensorReader._read_raw).
_MAP_MIN = 1 << 20
#: Reads up to this size go through the read-ahead block (see TensorReader._small).
_SMALL_READ = 64 * 1024
_READ_AHEAD = 1024 * 1024
_CRC_BLOCK = 16 * 1024 * 1024
#: numpy's limit on dimensions (NPY_MAXDIMS in numpy 1.x); a tensor with more cannot be viewed.
MAX_DIMS = 32
#: numpy refuses arrays whose nonzero dimensions multiply (times the itemsize) past this.
_MAX_ARRAY_BYTES = 2 ** 63 - 1


def shape_problem(shape: Sequence[int], itemsize: Optional[int]) -> Optional[str]:
    """Why numpy could not hold a tensor of this shape (None if it can), from a header's dims.

    A dimension of 0 makes the byte count 0 whatever the others are, so the
    others are bounded here: numpy still refuses to shape an array past 2**63 bytes.
    """
    if len(shape) > MAX_DIMS:
        return f"has {len(shape)} dimensions (at most {MAX_DIMS} are supported)"
    if any(d < 0 for d in shape):
        return f"has a negative dimension {brief(list(shape))}"
    if math.prod(d for d in shape if d) * (itemsize or 1) > _MAX_ARRAY_BYTES:
        return f"shape {brief(list(shape))} is too large for any file"
    return None


class TensorReader:
    """Common surface of the format readers.

    `tensors` is the index (headers only); `read` loads one tensor's bytes.
    Use as a context manager so the file descriptor is closed.

    Where each tensor lies is kept in flat arrays (one offset and length per
    tensor, extra pieces only for tensors stored in several), not in an
    object per tensor: a MoE checkpoint lists 100 000 and more.
    """

    format: str = ""

    def __init__(self, path: "os.PathLike[str] | str") -> None:
        self.path = os.fspath(path)
        self.tensors: List[TensorInfo] = []
        self.metadata: Dict[str, str] = {}
        self._position: Dict[str, int] = {}  # name -> index in self.tensors
        self._offsets = array("q")
        self._lengths = array("q")
        self._more: Dict[int, List[Segment]] = {}  # pieces after the first, by tensor index
        self._ahead: Tuple[int, bytes] = (0, b"")  # read-ahead block: (file offset, bytes)
        self._last_end = 0  # where the last small read ended: reads that follow it read ahead
        self._fd = open_input(self.path)  # a regular file, or our error (never blocks on a FIFO)

    def _add_tensor(self, info: TensorInfo, offset: int, length: int) -> None:
        """Index a tensor whose (first) piece of bytes is at [offset, offset + length)."""
        self._position[info.name] = len(self.tensors)
        self.tensors.append(info)
        self._offsets.append(offset)
        self._lengths.append(length)

    def segments(self, info: TensorInfo) -> List[Segment]:
        """Where the tensor's bytes lie, in order."""
        i = self._position[info.name]
        return [Segment(self._offsets[i], self._lengths[i])] + self._more.get(i, [])

    def read(self, info: TensorInfo) -> np.ndarray:
        """The tensor's data as a numpy array of its storage dtype and shape."""
        with self.reading():
            return as_array(info, self._read_raw(info))

    @contextlib.contextmanager
    def reading(self) -> Iterator[None]:
        """An I/O error of the file (EIO from a failing disk) as our error, naming it; a map
        that finds no memory (ENOMEM) as what it is. An error of a mapped tensor's pages
        comes later, as SIGBUS, where no handler can turn it into a line."""
        try:
            yield
        except OSError as exc:
            if exc.errno == errno.ENOMEM:
                raise MemoryError(f"mapping {self.path}: {exc.strerror}") from None
            raise FormatError(self.path, f"cannot read: {exc.strerror}") from None

    def _read_raw(self, info: TensorInfo) -> np.ndarray:
        """A tensor's bytes as one uint8 array: mapped from the file if large and in one
        piece (read-only), else read with pread into a fresh buffer.

        A map costs no copy and no fresh memory: the quantizer reads the page
        cache itself, and a copied tensor goes from the page cache straight
        to the writer. Converting one 70B-shaped layer (2.76 GB, 2 cores)
        took 2.5-3.0 s with maps against 3.3-5.5 s with pread, most of the
        difference system time spent copying and zeroing fresh pages, with a
        lower peak RSS (1.08 against 1.4-1.5 GB): the mapped pages count
        towards RSS only while their array lives (a tensor in flight).
        MADV_WILLNEED starts the disk reads of a cold file at once; faulting
        the pages in here (MADV_POPULATE_READ) measured slower, with more
        system time and RSS, than letting the quantizer fault them. Smaller
        tensors and those in several pieces (a ckpt's 512 MiB chunks) are
        read with pread, which leaves no file position behind (safe from
        several threads).
        """
        i = self._position[info.name]
        offset = self._offsets[i]
        if (i not in self._more and info.nbytes >= _MAP_MIN
                and offset + info.nbytes <= os.fstat(self._fd).st_size):
            return self._mapped(offset, info.nbytes)
        raw = np.empty(info.nbytes, dtype=np.uint8)
        view = memoryview(raw)
        length = self._lengths[i]
        self._read_into(view[:length], offset, info.name)
        for seg in self._more.get(i, ()):
            self._read_into(view[length:length + seg.length], seg.offset, info.name)
            length += seg.length
        return raw

    def _mapped(self, offset: int, nbytes: int) -> np.ndarray:
        """`nbytes` at `offset` as a read-only array over a map of the file."""
        start = offset - offset % mmap.ALLOCATIONGRANULARITY
        mapping = mmap.mmap(self._fd, offset - start + nbytes, offset=start,
                            access=mmap.ACCESS_READ)
        mapping.madvise(mmap.MADV_WILLNEED)
        return np.frombuffer(mapping, dtype=np.uint8, count=nbytes, offset=offset - start)

    def _read_into(self, view: memoryview, offset: int, name: str) -> None:
        """Fill `view` from the file at `offset`."""
        if not view:
            return
        if len(view) <= _SMALL_READ:
            view[:] = self._small(offset, len(view), name)
            return
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], offset + done)
            if got == 0:
                raise FormatError(self.path, f"file ends inside tensor {brief(name)}",
                                  offset + done)
            done += got

    def _small(self, offset: int, length: int, name: Optional[str]) -> memoryview:
        """Up to _SMALL_READ bytes at `offset`, through the read-ahead block.

        Tiny tensors read in file order then cost one pread per block rather
        than one each; a read that does not follow the last one reads only
        what it needs, so random access never pays for a whole block.
        """
        start, block = self._ahead
        if not start <= offset <= offset + length <= start + len(block):
            sequential = self._last_end <= offset < self._last_end + _SMALL_READ
            start, block = offset, os.pread(self._fd, _READ_AHEAD if sequential else length,
                                            offset)
            if sequential:
                self._ahead = (start, block)
            if len(block) < length:
                reason = ("file shrank while its CRC was checked" if name is None
                          else f"file ends inside tensor {brief(name)}")
                raise FormatError(self.path, reason, offset + len(block))
        self._last_end = offset + length
        return memoryview(block)[offset - start:offset - start + length]

    def _crc_range(self, pos: int, end: int, crc: int) -> int:
        """`crc` extended over the file's bytes [pos, end), read in blocks."""
        if end - pos <= _SMALL_READ:
            return zlib.crc32(self._small(pos, end - pos, None), crc) if end > pos else crc
        buf = bytearray(min(_CRC_BLOCK, end - pos))
        view = memoryview(buf)
        while pos < end:
            got = os.preadv(self._fd, [view[:min(len(buf), end - pos)]], pos)
            if got == 0:
                raise FormatError(self.path, "file shrank while its CRC was checked", pos)
            crc = zlib.crc32(view[:got], crc)
            pos += got
        return crc

    def finish(self) -> None:
        """Checks that need the whole file read (a deferred CRC); none by default."""

    @property
    def any_order(self) -> bool:
        """Whether tensors may be read out of file order at no extra cost."""
        return True

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def nbytes(self) -> int:
        """Total tensor bytes (the payload, without format overhead)."""
        return sum(t.nbytes for t in self.tensors)


def raw_bytes(info: TensorInfo, array: np.ndarray) -> memoryview:
    """The bytes to store for `array`, checked against its planned size."""
    if info.dtype is STRING:
        text = np.asarray(array, dtype=np.str_)
        encoded = text.astype(text.dtype.newbyteorder("<")).tobytes()
        if len(encoded) > info.nbytes and not encoded[info.nbytes:].strip(b"\0"):
            encoded = encoded[:info.nbytes]  # numpy pads "" to one NUL code unit
        data = memoryview(encoded)
    else:
        data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
    if len(data) != info.nbytes:
        raise ValueError(f"tensor {info.name!r}: got {len(data)} bytes, planned {info.nbytes}")
    return data


class TensorWriter:
    """Common surface of the format writers.

    A writer is built with the full list of tensors to come and takes each by
    name, once. The file appears under its final name only when the context
    exits cleanly with every planned tensor written; otherwise the temporary
    file is deleted and the final path is never touched. With `direct`, the file is
    written around the page cache where the filesystem allows it (direct.py).
    """

    def __init__(self, path: "os.PathLike[str] | str", tensors: Sequence[TensorInfo], *,
                 direct: bool = True) -> None:
        self.path = os.fspath(path)
        self._planned: Dict[str, TensorInfo] = {t.name: t for t in tensors}
        #: Gathered small writes, by the file offset where each run ends: (start, bytes).
        self._runs: Dict[int, Tuple[int, bytearray]] = {}
        self._runs_lock = threading.RLock()  # _write_at may flush the runs while holding it
        self._out = AtomicFile(self.path)
        assert self._out.file is not None
        self._blocks = BlockWriter(self._out.file.fileno(), direct)

    def write(self, name: str, array: np.ndarray) -> None:
        info = self._planned.pop(name, None)
        if info is None:
            raise ValueError(f"tensor {name!r} is not planned or was already written")
        try:
            self._store(info, raw_bytes(info, array))
        except OSError as exc:
            raise OutputError(self.path, f"cannot write: {exc.strerror}") from None

    def data_offset(self, name: str) -> int:
        """Where the planned tensor `name`'s first byte of data goes in the file. Memory
        whose address is congruent to it modulo direct.BLOCK is written around the page
        cache as it is; other memory is copied through a staging buffer first."""
        raise NotImplementedError

    def _store(self, info: TensorInfo, data: memoryview) -> None:
        raise NotImplementedError

    def _write_at(self, data: "bytes | bytearray | memoryview", pos: int) -> None:
        """Put `data` at file offset `pos`, from any thread; each byte of the file is
        written once (direct.BlockWriter relies on it).

        Writes use pwrite (no shared file position), so threads may write
        disjoint places at once. Small ones that land next to each other are
        gathered into runs and written together, so a run of tiny tensors
        costs one write, not one each; the runs left are written before the
        file is committed.
        """
        if len(data) > _SMALL_WRITE:
            self._pwrite(data, pos)
            return
        with self._runs_lock:
            run = self._runs.pop(pos, None)
            if run is None:
                if len(self._runs) >= _MAX_RUNS:
                    self._flush_runs()
                run = (pos, bytearray())
            run[1].extend(data)
            if len(run[1]) >= _RUN_SIZE:
                self._pwrite(run[1], run[0])
            else:
                self._runs[pos + len(data)] = run

    def _flush_runs(self) -> None:
        with self._runs_lock:
            runs, self._runs = self._runs, {}
            for start, data in runs.values():
                self._pwrite(data, start)

    def _pwrite(self, data: "bytes | bytearray | memoryview", pos: int) -> None:
        self._blocks.pwrite(data, pos)

    def _finish(self) -> None:
        """Hook run after the last tensor, before the file is committed (and before the
        gathered small writes are written)."""

    def __enter__(self) -> "TensorWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._out.discard()
            return
        if self._planned:
            self._out.discard()
            raise ValueError(f"{len(self._planned)} planned tensors were never written, "
                             f"e.g. {next(iter(self._planned))!r}")
        try:
            self._finish()
            self._flush_runs()
            self._blocks.finish()
            self._out.commit()
        except OSError as exc:
            self._out.discard()
            raise OutputError(self.path, f"cannot write: {exc.strerror}") from None
