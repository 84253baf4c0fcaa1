"""What a checkpoint file holds, independent of its format."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..dtypes import DType, STRING
from ..errors import FormatError, OutputError
from ..paths import open_input
from .atomic import AtomicFile


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


@dataclass(frozen=True)
class Segment:
    """A run of a tensor's bytes at a file offset (a ckpt chunk record)."""

    offset: int
    length: int


def expected_nbytes(dtype: DType, shape: Sequence[int]) -> Optional[int]:
    """Bytes a tensor of this dtype and shape must hold; None if not implied."""
    return None if dtype.itemsize is None else math.prod(shape) * dtype.itemsize


def as_array(info: TensorInfo, raw: np.ndarray) -> np.ndarray:
    """View a tensor's raw bytes (uint8) as the array it stands for.

    Opaque dtypes stay flat bytes; a str value becomes a 0-d numpy string.
    """
    if info.dtype is STRING:
        return raw.view(f"<U{raw.size // 4}").reshape(())
    if info.dtype.numpy is None:
        return raw
    return raw.view(info.dtype.numpy).reshape(info.shape)


def read_segments(fd: int, path: str, info: TensorInfo,
                  segments: Sequence[Segment]) -> np.ndarray:
    """Read a tensor's segments with pread into one fresh uint8 buffer.

    pread leaves no file position behind (safe from several threads) and keeps
    resident memory to the buffer itself, where a memory map would count every
    page touched towards RSS.
    """
    raw = np.empty(info.nbytes, dtype=np.uint8)
    view = memoryview(raw)
    pos = 0
    for seg in segments:
        done = 0
        while done < seg.length:
            got = os.preadv(fd, [view[pos + done:pos + seg.length]], seg.offset + done)
            if got == 0:
                raise FormatError(path, f"file ends inside tensor {info.name!r}",
                                  seg.offset + done)
            done += got
        pos += seg.length
    return raw


class TensorReader:
    """Common surface of the format readers.

    `tensors` is the index (headers only); `read` loads one tensor's bytes.
    Use as a context manager so the file descriptor is closed.
    """

    format: str = ""

    def __init__(self, path: "os.PathLike[str] | str") -> None:
        self.path = os.fspath(path)
        self.tensors: List[TensorInfo] = []
        self.metadata: Dict[str, str] = {}
        self._segments: Dict[str, List[Segment]] = {}
        self._fd = open_input(self.path)  # a regular file, or our error (never blocks on a FIFO)

    def read(self, info: TensorInfo) -> np.ndarray:
        """The tensor's data as a numpy array of its storage dtype and shape."""
        return as_array(info, self._read_raw(info))

    def _read_raw(self, info: TensorInfo) -> np.ndarray:
        return read_segments(self._fd, self.path, info, self._segments[info.name])

    def finish(self) -> None:
        """Checks that need the whole file read (a deferred CRC); none by default."""

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
        data = memoryview(text.astype(text.dtype.newbyteorder("<")).tobytes())
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
    file is deleted and the final path is never touched.
    """

    def __init__(self, path: "os.PathLike[str] | str", tensors: Sequence[TensorInfo]) -> None:
        self.path = os.fspath(path)
        self._planned: Dict[str, TensorInfo] = {t.name: t for t in tensors}
        self._out = AtomicFile(self.path)

    def write(self, name: str, array: np.ndarray) -> None:
        info = self._planned.pop(name, None)
        if info is None:
            raise ValueError(f"tensor {name!r} is not planned or was already written")
        try:
            self._store(info, raw_bytes(info, array))
        except OSError as exc:
            raise OutputError(self.path, f"cannot write: {exc.strerror}") from None

    def _store(self, info: TensorInfo, data: memoryview) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        """Hook run after the last tensor, before the file is committed."""

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
            self._out.commit()
        except OSError as exc:
            self._out.discard()
            raise OutputError(self.path, f"cannot write: {exc.strerror}") from None
