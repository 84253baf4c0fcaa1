"""safetensors files, read and written one tensor at a time.

A safetensors file is a u64 header length, a JSON header giving each
tensor's dtype, shape and byte range, then the data. The writer therefore
needs every name, dtype and shape before the first byte of data: it takes
the planned tensor list, writes the header at once, and then places each
tensor at its planned offset as it arrives, so no model-sized dict is ever
held. Data is laid out largest alignment first, as the safetensors library
does, so every tensor stays aligned for zero-copy readers.

MindSpore's flavour adds `{"format": "ms"}` to `__metadata__` and marks
qint4x2 tensors (stored as I8) with `"<name>": "Int4"`; both are honoured.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Dict, List, Mapping, Sequence, Tuple

from .. import dtypes
from ..dtypes import DType
from ..errors import FormatError, OutputError, UnsupportedError
from .tensor import Segment, TensorInfo, TensorReader, TensorWriter

#: The safetensors library refuses headers larger than this.
MAX_HEADER_SIZE = 100 * 1024 * 1024
INT4_MARK = "Int4"


class SafetensorsReader(TensorReader):
    """Index of a safetensors file; tensors are listed in data order."""

    format = "safetensors"

    def __init__(self, path: "os.PathLike[str] | str") -> None:
        super().__init__(path)
        try:
            self._index()
        except BaseException:
            self.close()
            raise

    def _index(self) -> None:
        size = os.fstat(self._fd).st_size
        if size < 8:
            raise FormatError(self.path, f"{size} bytes is too short for a safetensors file")
        (header_len,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        if header_len > min(size - 8, MAX_HEADER_SIZE):
            raise FormatError(self.path, f"header length {header_len} does not fit in a file "
                              f"of {size} bytes: not a safetensors file, or truncated", 0)
        try:
            header = json.loads(os.pread(self._fd, header_len, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(self.path, f"header is not valid JSON ({exc})", 8) from None
        if not isinstance(header, dict):
            raise FormatError(self.path, "header is not a JSON object", 8)
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise FormatError(self.path, "__metadata__ must map strings to strings", 8)
        self.metadata = metadata
        data_start = 8 + header_len
        entries = [self._entry(name, spec, metadata, data_start)
                   for name, spec in header.items()]
        entries.sort(key=lambda e: e[1])
        self._check_coverage(entries, size - data_start, data_start)
        for info, (begin, end) in entries:
            self.tensors.append(info)
            self._segments[info.name] = [Segment(data_start + begin, end - begin)]

    def _entry(self, name: str, spec: object, metadata: Mapping[str, str],
               data_start: int) -> Tuple[TensorInfo, Tuple[int, int]]:
        if not isinstance(spec, dict):
            raise FormatError(self.path, f"header entry {name!r} is not an object", 8)
        code = spec.get("dtype")
        dtype = dtypes.from_safetensors_code(code) if isinstance(code, str) else None
        if dtype is None:
            raise UnsupportedError(self.path, f"tensor {name!r} has unknown dtype "
                                   f"{spec.get('dtype')!r}")
        if dtype is dtypes.INT8 and metadata.get(name) == INT4_MARK:
            dtype = dtypes.INT4
        shape, offsets = spec.get("shape"), spec.get("data_offsets")
        if not _ints(shape) or any(d < 0 for d in shape):
            raise FormatError(self.path, f"tensor {name!r} has an invalid shape {shape!r}", 8)
        if not _ints(offsets) or len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1]:
            raise FormatError(self.path, f"tensor {name!r} has invalid data_offsets {offsets!r}", 8)
        info = TensorInfo.of(name, dtype, shape)
        begin, end = offsets
        if end - begin != info.nbytes:
            raise FormatError(self.path, f"tensor {name!r}: data_offsets [{begin}, {end}] span "
                              f"{end - begin} bytes, but {dtype} {list(shape)} needs "
                              f"{info.nbytes}", data_start + begin)
        return info, (begin, end)

    def _check_coverage(self, entries: List[Tuple[TensorInfo, Tuple[int, int]]],
                        data_len: int, data_start: int) -> None:
        """Tensors must tile the data region exactly: no overlap, hole or overrun."""
        pos = 0
        for info, (begin, end) in entries:
            if begin != pos:
                what = "overlaps the tensor before it" if begin < pos else "leaves a gap before it"
                raise FormatError(self.path, f"tensor {info.name!r}: data_offsets start {begin} "
                                  f"{what} (previous data ends at {pos})", data_start + begin)
            if end > data_len:
                raise FormatError(self.path, f"tensor {info.name!r}: data_offsets end {end} is past "
                                  f"the end of the data ({data_len} bytes): truncated file or "
                                  "wrong header", data_start + begin)
            pos = end
        if pos != data_len:
            raise FormatError(self.path, f"{data_len - pos} bytes after the last tensor are not "
                              "described by the header", data_start + pos)


def _ints(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                           for v in value)


def _layout(tensors: Sequence[TensorInfo],
            metadata: Mapping[str, str]) -> Tuple[bytes, Dict[str, Tuple[int, int]]]:
    """The header bytes (length prefix included) and each tensor's data range."""
    for info in tensors:
        if info.dtype.safetensors is None:
            raise UnsupportedError(None, f"tensor {info.name!r}: safetensors cannot store "
                                   f"{info.dtype} values")
    meta = dict(metadata)
    meta.update({t.name: INT4_MARK for t in tensors if t.dtype is dtypes.INT4})
    order = sorted(range(len(tensors)), key=lambda i: -_alignment(tensors[i].dtype))
    offsets: Dict[str, Tuple[int, int]] = {}
    pos = 0
    for i in order:
        info = tensors[i]
        offsets[info.name] = (pos, pos + info.nbytes)
        pos += info.nbytes
    header: Dict[str, object] = {"__metadata__": meta} if meta else {}
    for i in order:  # MindSpore's reader needs header entries in data order
        info = tensors[i]
        header[info.name] = {"dtype": info.dtype.safetensors, "shape": list(info.shape),
                             "data_offsets": list(offsets[info.name])}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, offsets


def _alignment(dtype: DType) -> int:
    assert dtype.itemsize is not None
    return dtype.itemsize


def header(tensors: Sequence[TensorInfo], metadata: Mapping[str, str]) -> bytes:
    """The bytes `SafetensorsWriter` writes before the data: length prefix and JSON header."""
    return _layout(tensors, metadata)[0]


def planned_size(tensors: Sequence[TensorInfo], metadata: Mapping[str, str]) -> int:
    """Exact size of the file `SafetensorsWriter` will write."""
    header, _ = _layout(tensors, metadata)
    return len(header) + sum(t.nbytes for t in tensors)


class SafetensorsWriter(TensorWriter):
    """Writes the header for the planned tensors, then each tensor in place.

    Tensors may be written in any order: each lands at its planned offset.
    """

    def __init__(self, path: "os.PathLike[str] | str", tensors: Sequence[TensorInfo],
                 metadata: Mapping[str, str]) -> None:
        header, self._offsets = _layout(tensors, metadata)
        super().__init__(path, tensors)
        self._data_start = len(header)
        assert self._out.file is not None
        try:
            self._out.file.write(header)
            self._out.file.truncate(self._data_start + sum(t.nbytes for t in tensors))
        except OSError as exc:
            self._out.discard()
            raise OutputError(self.path, f"cannot write: {exc.strerror}") from None

    def _store(self, info: TensorInfo, data: memoryview) -> None:
        assert self._out.file is not None
        fd = self._out.file.fileno()
        pos = self._data_start + self._offsets[info.name][0]
        while len(data):
            written = os.pwrite(fd, data, pos)
            data, pos = data[written:], pos + written
