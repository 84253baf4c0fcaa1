"""MindSpore `.ckpt` files, read and written one tensor at a time.

A `.ckpt` is a protobuf `Checkpoint` message written as a plain sequence of
one-entry records, one per tensor or per 512 MiB chunk of a tensor, with an
optional 17-byte CRC trailer. There is no index, so the reader builds one by
walking record headers through a memory map and noting where each tensor's
bytes lie; the bytes themselves are read only when asked for. The writer
emits the same records MindSpore does, so `mindspore.load_checkpoint` reads
them. See shared/specs/mindspore-ckpt-format.md for the layout.
"""
from __future__ import annotations

import mmap
import os
import zlib
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

from .. import dtypes
from ..errors import ChecksumError, EncryptedCheckpointError, FormatError, UnsupportedError
from . import protowire as pw
from .tensor import Segment, TensorInfo, TensorReader, TensorWriter, expected_nbytes

#: MindSpore cuts tensors into records of this many bytes (SLICE_SIZE, 512 MiB).
CHUNK_SIZE = 512 * 1024 * 1024
CRC_MAGIC = b"crc_num"
CRC_TRAILER_SIZE = len(CRC_MAGIC) + 10
#: First four bytes (little-endian) of files saved with enc_key.
ENCRYPTION_MAGICS = {0x7F3A5ED8: "AES-GCM", 0x7F3A5ED9: "AES-CBC", 0x7F3A5EDA: "SM4-CBC"}
_CRC_BLOCK = 16 * 1024 * 1024


@dataclass
class _Group:
    """Consecutive records with one tag: one tensor."""

    name: str
    type_name: str
    dims: List[int]
    offset: int
    segments: List[Segment] = field(default_factory=list)


class CkptReader(TensorReader):
    """Index of a `.ckpt` file; `read(info)` loads one tensor.

    The CRC trailer, when present, is verified on opening unless
    `verify_crc=False`. With `defer_crc=True` it is verified instead while
    the tensors are read, in file order, and `finish()` checks the result:
    a converter then reads the file once, not twice, and still refuses a bad
    checkpoint before its output is committed.
    """

    format = "ckpt"

    def __init__(self, path: "os.PathLike[str] | str", *, verify_crc: bool = True,
                 defer_crc: bool = False) -> None:
        super().__init__(path)
        self.crc: Optional[int] = None
        self._end = 0
        #: (pos, crc): the running CRC of the file's first `pos` bytes, while deferred.
        self._crc_state: Optional[Tuple[int, int]] = None
        try:
            self._index(verify_crc and not defer_crc)
        except BaseException:
            self.close()
            raise
        if verify_crc and defer_crc and self.crc is not None:
            self._crc_state = (0, 0)

    def _read_raw(self, info: TensorInfo) -> np.ndarray:
        raw = super()._read_raw(info)
        if self._crc_state is not None:
            self._crc_state = self._crc_through(info, memoryview(raw))
        return raw

    def finish(self) -> None:
        """Check a deferred CRC: the bytes not read yet are read now."""
        if self._crc_state is None:
            return
        pos, crc = self._crc_state
        self._crc_state = None
        self._check_crc(self._crc_range(pos, self._end, crc))

    def _crc_through(self, info: TensorInfo, data: memoryview) -> Tuple[int, int]:
        """Extend the running CRC over a tensor just read (and the headers before it)."""
        pos, crc = self._crc_state  # type: ignore[misc]
        segments = self._segments[info.name]
        if segments[0].offset < pos:  # read out of file order: start over at finish()
            return 0, 0
        done = 0
        for seg in segments:
            crc = self._crc_range(pos, seg.offset, crc)  # record headers
            crc = zlib.crc32(data[done:done + seg.length], crc)
            done += seg.length
            pos = seg.offset + seg.length
        return pos, crc

    def _index(self, verify_crc: bool) -> None:
        size = os.fstat(self._fd).st_size
        if size == 0:
            raise FormatError(self.path, "empty file: not a MindSpore checkpoint")
        with mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ) as mm:
            end = size
            if size >= CRC_TRAILER_SIZE and mm[size - CRC_TRAILER_SIZE:size - 10] == CRC_MAGIC:
                end = size - CRC_TRAILER_SIZE
                self.crc = int.from_bytes(mm[end + len(CRC_MAGIC):size], "big")
            if end and mm[0] != 0x0A:
                self._refuse_first_bytes(mm[:4])
            try:
                groups = self._walk(mm, end)
            except pw.WireError as exc:
                raise FormatError(self.path, f"corrupt or truncated checkpoint: {exc}",
                                  exc.offset) from None
        for group in groups:
            self._add(group)
        self._end = end
        if verify_crc and self.crc is not None:
            self._check_crc(self._crc_range(0, end, 0))

    def _refuse_first_bytes(self, head: bytes) -> None:
        magic = int.from_bytes(head, "little") if len(head) == 4 else None
        if magic in ENCRYPTION_MAGICS:
            raise EncryptedCheckpointError(
                self.path, f"encrypted checkpoint ({ENCRYPTION_MAGICS[magic]}): decrypt it with "
                "MindSpore (load_checkpoint with dec_key) and save it without enc_key first")
        raise FormatError(self.path, "not a MindSpore checkpoint: first byte is "
                          f"0x{head[0]:02x}, expected 0x0a", 0)

    def _walk(self, mm: mmap.mmap, end: int) -> List[_Group]:
        groups: List[_Group] = []
        pos = 0
        while pos < end:
            record = pos
            fnum, wire, pos = pw.read_key(mm, pos, end)
            if fnum != 1 or wire != pw.LEN:
                pos = pw.skip_field(mm, wire, pos, end)  # unknown Checkpoint field
                continue
            start, pos = pw.read_len(mm, pos, end)
            tag, dims, type_name, content = self._parse_value(mm, start, pos, record)
            last = groups[-1] if groups else None
            if last is not None and last.name == tag:
                if dims != last.dims or type_name != last.type_name:
                    raise FormatError(self.path, f"chunk of tensor {tag!r} disagrees with the "
                                      "first chunk on shape or dtype", record)
            else:
                last = _Group(tag, type_name, dims, record)
                groups.append(last)
            last.segments.append(content)
        return groups

    def _parse_value(self, mm: mmap.mmap, pos: int, end: int, record: int):
        """Checkpoint.Value: tag (1) and TensorProto (2), in any order."""
        tag: Optional[str] = None
        tensor = None
        while pos < end:
            fnum, wire, pos = pw.read_key(mm, pos, end)
            if wire == pw.LEN and fnum in (1, 2, 3):
                start, pos = pw.read_len(mm, pos, end)
                if fnum == 1:
                    tag = self._text(mm[start:pos], "tensor name", start)
                elif fnum == 2:
                    tensor = (start, pos)
                else:
                    raise UnsupportedError(self.path, f"record {tag or '?'!r} is a MapParameter "
                                           "(embedding hash map), which ckpt-rtn does not convert",
                                           record)
            else:
                pos = pw.skip_field(mm, wire, pos, end)
        if tag is None:
            raise FormatError(self.path, "record without a tensor name", record)
        if tensor is None:
            raise FormatError(self.path, f"record {tag!r} holds no tensor", record)
        dims, type_name, content = self._parse_tensor(mm, *tensor, tag, record)
        return tag, dims, type_name, content

    def _parse_tensor(self, mm: mmap.mmap, pos: int, end: int, tag: str, record: int):
        """TensorProto: dims (1, plain or packed), tensor_type (2), tensor_content (3)."""
        dims: List[int] = []
        type_name: Optional[str] = None
        content: Optional[Segment] = None
        while pos < end:
            fnum, wire, pos = pw.read_key(mm, pos, end)
            if fnum == 1 and wire in (pw.VARINT, pw.LEN):
                values, pos = pw.read_ints(mm, wire, pos, end)
                dims.extend(values)
            elif fnum in (2, 3) and wire == pw.LEN:
                start, pos = pw.read_len(mm, pos, end)
                if fnum == 2:
                    type_name = self._text(mm[start:pos], "dtype name", start)
                else:
                    content = Segment(start, pos - start)
            else:
                pos = pw.skip_field(mm, wire, pos, end)
        if type_name is None or content is None:
            missing = "dtype" if type_name is None else "data"
            raise FormatError(self.path, f"tensor {tag!r} has no {missing}", record)
        if any(d < 0 for d in dims):
            raise FormatError(self.path, f"tensor {tag!r} has a negative dimension {dims}", record)
        return dims, type_name, content

    def _text(self, raw: bytes, what: str, offset: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(self.path, f"{what} is not valid UTF-8", offset) from None

    def _add(self, group: _Group) -> None:
        if group.name in self._segments:
            raise FormatError(self.path, f"tensor {group.name!r} appears twice", group.offset)
        dtype = dtypes.from_mindspore_name(group.type_name)
        total = sum(s.length for s in group.segments)
        shape = tuple(group.dims)
        if dtype is dtypes.STRING or (shape == (0,) and total > 0):
            shape = ()  # str values and legacy scalars are written with dims [0]
        expected = expected_nbytes(dtype, shape)
        if expected is not None and expected != total:
            raise FormatError(self.path, f"tensor {group.name!r}: {dtype} {list(shape)} needs "
                              f"{expected} bytes, its records hold {total}", group.offset)
        self.tensors.append(TensorInfo(group.name, dtype, shape, total))
        self._segments[group.name] = group.segments

    def _crc_range(self, pos: int, end: int, crc: int) -> int:
        """`crc` extended over the file's bytes [pos, end), read in blocks."""
        buf = bytearray(min(_CRC_BLOCK, max(end - pos, 1)))
        view = memoryview(buf)
        while pos < end:
            got = os.preadv(self._fd, [view[:min(len(buf), end - pos)]], pos)
            if got == 0:
                raise FormatError(self.path, "file shrank while its CRC was checked", pos)
            crc = zlib.crc32(view[:got], crc)
            pos += got
        return crc

    def _check_crc(self, crc: int) -> None:
        if crc != self.crc:
            raise ChecksumError(self.path, f"CRC mismatch: trailer says {self.crc:#010x}, content "
                                f"gives {crc:#010x} (corrupt file; --no-verify-crc reads it anyway)")


def _dims_for(info: TensorInfo) -> Sequence[int]:
    # MindSpore writes str values with dims [0] and scalars with no dims.
    return (0,) if info.dtype is dtypes.STRING else info.shape


def _record_header(name: bytes, dims: Sequence[int], type_name: bytes, chunk_len: int) -> bytes:
    """Everything of one record that precedes its chunk of tensor bytes."""
    tensor_head = b"".join(pw.key(1, pw.VARINT) + pw.encode_varint(d) for d in dims)
    tensor_head += pw.key(2, pw.LEN) + pw.encode_varint(len(type_name)) + type_name
    tensor_head += pw.key(3, pw.LEN) + pw.encode_varint(chunk_len)
    tensor_len = len(tensor_head) + chunk_len
    value_head = (pw.key(1, pw.LEN) + pw.encode_varint(len(name)) + name
                  + pw.key(2, pw.LEN) + pw.encode_varint(tensor_len))
    value_len = len(value_head) + tensor_len
    return pw.key(1, pw.LEN) + pw.encode_varint(value_len) + value_head + tensor_head


def records(info: TensorInfo, chunk_size: int = CHUNK_SIZE) -> List[Tuple[bytes, int, int]]:
    """The records `CkptWriter` writes for a tensor: (header, data start, data length) each.

    MindSpore's cuts: byte-aligned chunks, one empty record for 0 bytes.
    """
    name, type_name = info.name.encode(), info.dtype.name.encode()
    out = []
    for start in range(0, info.nbytes, chunk_size) if info.nbytes else [0]:
        length = min(chunk_size, info.nbytes - start)
        out.append((_record_header(name, _dims_for(info), type_name, length), start, length))
    return out


def crc_trailer(crc: int) -> bytes:
    """The trailer for a file whose bytes before it have this CRC-32."""
    return CRC_MAGIC + crc.to_bytes(10, "big")


def planned_size(tensors: Sequence[TensorInfo], *, crc: bool = False,
                 chunk_size: int = CHUNK_SIZE) -> int:
    """Exact size of the file `CkptWriter` will write for these tensors."""
    return (CRC_TRAILER_SIZE if crc else 0) + sum(
        len(header) + length for info in tensors for header, _, length in records(info, chunk_size))


class CkptWriter(TensorWriter):
    """Streams tensors into a `.ckpt`, in the order they are written."""

    def __init__(self, path: "os.PathLike[str] | str", tensors: Sequence[TensorInfo], *,
                 crc: bool = False, chunk_size: int = CHUNK_SIZE) -> None:
        super().__init__(path, tensors)
        self._chunk_size = chunk_size
        self._crc: Optional[int] = 0 if crc else None

    def _store(self, info: TensorInfo, data: memoryview) -> None:
        for header, start, length in records(info, self._chunk_size):
            self._emit(header)
            self._emit(data[start:start + length])

    def _emit(self, data: "bytes | memoryview") -> None:
        assert self._out.file is not None
        self._out.file.write(data)
        if self._crc is not None:
            self._crc = zlib.crc32(data, self._crc)

    def _finish(self) -> None:
        if self._crc is not None:
            self._emit(crc_trailer(self._crc))
