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

import math
import mmap
import os
import zlib
from array import array
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from .. import dtypes
from ..errors import (ChecksumError, EncryptedCheckpointError, FormatError, OutputError,
                      UnsupportedError)
from . import crc32, sniff
from . import protowire as pw
from .untrusted_json import brief
from .tensor import (MAX_DIMS, Segment, TensorInfo, TensorReader, TensorWriter,
                     shape_problem)

#: MindSpore cuts tensors into records of this many bytes (SLICE_SIZE, 512 MiB).
CHUNK_SIZE = 512 * 1024 * 1024
CRC_MAGIC = b"crc_num"
CRC_TRAILER_SIZE = len(CRC_MAGIC) + 10
#: Chunks up to this size are written together with their record header, in one write.
_JOIN_CHUNK = 64 * 1024


class _Group(NamedTuple):
    """Consecutive records with one tag: one tensor."""

    name: str
    type_name: str
    dims: List[int]
    offset: int
    first: Segment
    more: List[Segment]


def _canonical_record(mm: mmap.mmap, pos: int, end: int):
    """The record at `pos` if it is laid out exactly as MindSpore writes it, else None.

    Checkpoint.value (0x0a) holding tag (0x0a) then tensor (0x12), which holds
    dims (0x08 each, non-negative), tensor_type (0x12) and tensor_content
    (0x1a), each length ending exactly where its message does. Checked byte
    by byte here, a record costs a fraction of the general field-by-field
    walk (`CkptReader._parse_value`), which handles everything else and
    reports what is wrong. Returns (tag bytes, dims, dtype name bytes,
    content segment, position after the record).
    """
    try:
        if mm[pos] != 0x0A:
            return None
        length, p = pw.decode_varint(mm, pos + 1, end)
        stop = p + length
        if stop > end or p >= stop or mm[p] != 0x0A:
            return None
        length, p = pw.decode_varint(mm, p + 1, stop)
        tag_end = p + length
        if tag_end >= stop or mm[tag_end] != 0x12:
            return None
        tag = mm[p:tag_end]
        length, p = pw.decode_varint(mm, tag_end + 1, stop)
        if p + length != stop:
            return None
        dims = []
        while p < stop and mm[p] == 0x08:
            dim, p = pw.decode_varint(mm, p + 1, stop)
            if dim >= 1 << 63:  # negative: left to the general walk to report
                return None
            dims.append(dim)
        if p >= stop or mm[p] != 0x12:
            return None
        length, p = pw.decode_varint(mm, p + 1, stop)
        type_end = p + length
        if type_end >= stop or mm[type_end] != 0x1A:
            return None
        type_name = mm[p:type_end]
        length, p = pw.decode_varint(mm, type_end + 1, stop)
        if p + length != stop:
            return None
        return tag, dims, type_name, Segment(p, length), stop
    except pw.WireError:
        return None


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
        self._dtypes: Dict[str, dtypes.DType] = {}  # by tensor_type, as met
        #: (pos, crc): the running CRC of the file's first `pos` bytes, while deferred.
        self._crc_state: Optional[Tuple[int, int]] = None
        try:
            with self.reading():
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

    @property
    def any_order(self) -> bool:
        """False while a deferred CRC is being taken: it runs in file order, and a tensor read
        before one it has passed makes finish() read the whole file again."""
        return self._crc_state is None

    def finish(self) -> None:
        """Check a deferred CRC: the bytes not read yet are read now."""
        if self._crc_state is None:
            return
        pos, crc = self._crc_state
        self._crc_state = None
        with self.reading():
            self._check_crc(self._crc_range(pos, self._end, crc))

    def _crc_through(self, info: TensorInfo, data: memoryview) -> Tuple[int, int]:
        """Extend the running CRC over a tensor just read (and the headers before it)."""
        pos, crc = self._crc_state  # type: ignore[misc]
        segments = self.segments(info)
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
        head = os.pread(self._fd, sniff.HEAD_SIZE, 0)
        if sniff.kind(head, size) == "safetensors":
            raise FormatError(self.path, "not a MindSpore checkpoint"
                              + sniff.hint(head, size, "ckpt"), 0)
        with mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ) as mm:
            end = size
            if size >= CRC_TRAILER_SIZE and mm[size - CRC_TRAILER_SIZE:size - 10] == CRC_MAGIC:
                end = size - CRC_TRAILER_SIZE
                self.crc = int.from_bytes(mm[end + len(CRC_MAGIC):size], "big")
            if end and mm[0] != 0x0A:
                self._refuse_first_bytes(mm[:4])
            try:
                self._walk(mm, end)
            except pw.WireError as exc:
                raise FormatError(self.path, f"corrupt or truncated checkpoint: {exc}",
                                  exc.offset) from None
        self._end = end
        if verify_crc and self.crc is not None:
            self._check_crc(self._crc_range(0, end, 0))

    def _refuse_first_bytes(self, head: bytes) -> None:
        magic = int.from_bytes(head, "little") if len(head) == 4 else None
        if magic in sniff.ENCRYPTION_MAGICS:
            raise EncryptedCheckpointError(
                self.path, f"encrypted checkpoint ({sniff.ENCRYPTION_MAGICS[magic]}): decrypt it "
                "with MindSpore (load_checkpoint with dec_key) and save it without enc_key first")
        raise FormatError(self.path, "not a MindSpore checkpoint: first byte is "
                          f"0x{head[0]:02x}, expected 0x0a", 0)

    def _walk(self, mm: mmap.mmap, end: int) -> None:
        """Index every record; consecutive records with one tag are chunks of one tensor."""
        group: Optional[_Group] = None
        pos = 0
        while pos < end:
            record = pos
            canonical = _canonical_record(mm, pos, end)
            if canonical is not None:
                raw_tag, dims, raw_type, content, pos = canonical
                tag = self._text(raw_tag, "tensor name", record)
                type_name = self._text(raw_type, "dtype name", record)
            else:
                fnum, wire, pos = pw.read_key(mm, pos, end)
                if fnum != 1 or wire != pw.LEN:
                    pos = pw.skip_field(mm, wire, pos, end)  # unknown Checkpoint field
                    continue
                start, pos = pw.read_len(mm, pos, end)
                tag, dims, type_name, content = self._parse_value(mm, start, pos, record)
            if group is not None and group.name == tag:
                if dims != group.dims or type_name != group.type_name:
                    raise FormatError(self.path, f"chunk of tensor {brief(tag)} disagrees with the "
                                      "first chunk on shape or dtype", record)
                group.more.append(content)
                continue
            if group is not None:
                self._add(group)
            group = _Group(tag, type_name, dims, record, content, [])
        if group is not None:
            self._add(group)

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
                    raise UnsupportedError(self.path, f"record {brief(tag or '?')} is a "
                                           "MapParameter (embedding hash map), which ckpt-rtn "
                                           "does not convert", record)
            else:
                pos = pw.skip_field(mm, wire, pos, end)
        if tag is None:
            raise FormatError(self.path, "record without a tensor name", record)
        if tensor is None:
            raise FormatError(self.path, f"record {brief(tag)} holds no tensor", record)
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
            raise FormatError(self.path, f"tensor {brief(tag)} has no {missing}", record)
        if dims and min(dims) < 0:
            raise FormatError(self.path, f"tensor {brief(tag)} has a negative dimension "
                              f"{brief(dims)}", record)
        return dims, type_name, content

    def _text(self, raw: bytes, what: str, offset: int) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(self.path, f"{what} is not valid UTF-8", offset) from None

    def _add(self, group: _Group) -> None:
        name = group.name
        if name in self._position:
            raise FormatError(self.path, f"tensor {brief(name)} appears twice", group.offset)
        dtype = self._dtypes.get(group.type_name)
        if dtype is None:
            dtype = self._dtypes[group.type_name] = dtypes.from_mindspore_name(group.type_name)
        total = group.first.length
        if group.more:
            total += sum(s.length for s in group.more)
        shape = tuple(group.dims)
        if dtype is dtypes.STRING or (shape == (0,) and total > 0):
            shape = ()  # str values and legacy scalars are written with dims [0]
        if dtype is dtypes.STRING and total % 4:
            raise FormatError(self.path, f"str value {brief(name)} holds {total} bytes, not a "
                              "whole number of UTF-32 code units (4 bytes each)", group.offset)
        itemsize = dtype.itemsize
        expected = None if itemsize is None else math.prod(shape) * itemsize
        if len(shape) > MAX_DIMS or not expected:  # rare: checked in full only here
            problem = shape_problem(shape, itemsize)
            if problem is not None:
                raise FormatError(self.path, f"tensor {brief(name)} {problem}", group.offset)
        if expected is not None and expected != total:
            raise FormatError(self.path, f"tensor {brief(name)}: {dtype} {list(shape)} needs "
                              f"{expected} bytes, its records hold {total}", group.offset)
        if group.more:
            self._more[len(self.tensors)] = group.more
        self._add_tensor(TensorInfo(name, dtype, shape, total), *group.first)

    def _check_crc(self, crc: int) -> None:
        if crc != self.crc:
            raise ChecksumError(self.path, f"CRC mismatch: trailer says {self.crc:#010x}, content "
                                f"gives {crc:#010x} (corrupt file; --no-verify-crc reads it anyway)")


def _dims_for(info: TensorInfo) -> Sequence[int]:
    # MindSpore writes str values with dims [0] and scalars with no dims.
    return (0,) if info.dtype is dtypes.STRING else info.shape


def _tensor_head(info: TensorInfo, chunk_len: int) -> bytes:
    """TensorProto up to its content: dims (1), tensor_type (2), the content's key and length."""
    type_name = info.dtype.name.encode()
    return (b"".join(b"\x08" + pw.encode_varint(d) for d in _dims_for(info))
            + b"\x12" + pw.encode_varint(len(type_name)) + type_name
            + b"\x1a" + pw.encode_varint(chunk_len))


def _record_header(name: bytes, tensor_head: bytes, chunk_len: int) -> bytes:
    """Everything of one record that precedes its chunk of tensor bytes: Checkpoint.value
    (1) holding tag (1) and tensor (2), then the tensor's head."""
    tensor_len = len(tensor_head) + chunk_len
    value_head = (b"\x0a" + pw.encode_varint(len(name)) + name
                  + b"\x12" + pw.encode_varint(tensor_len))
    return b"\x0a" + pw.encode_varint(len(value_head) + tensor_len) + value_head + tensor_head


def _record_size(name_len: int, tensor_head_len: int, chunk_len: int) -> int:
    """len(_record_header(...)) + chunk_len, without building the header."""
    tensor_len = tensor_head_len + chunk_len
    value_len = 2 + pw.varint_size(name_len) + name_len + pw.varint_size(tensor_len) + tensor_len
    return 1 + pw.varint_size(value_len) + value_len


def _chunks(nbytes: int, chunk_size: int) -> List[Tuple[int, int]]:
    """(start, length) of each record's piece: MindSpore's byte-aligned cuts, and one empty
    record for 0 bytes."""
    if nbytes == 0:
        return [(0, 0)]
    return [(start, min(chunk_size, nbytes - start)) for start in range(0, nbytes, chunk_size)]


class _TensorHeads:
    """_tensor_head, remembered: the tensors of a checkpoint share a few dtypes and shapes."""

    def __init__(self) -> None:
        self._known: Dict[Tuple[str, Tuple[int, ...], int], bytes] = {}

    def __call__(self, info: TensorInfo, chunk_len: int) -> bytes:
        key = (info.dtype.name, info.shape, chunk_len)
        head = self._known.get(key)
        if head is None:
            head = self._known[key] = _tensor_head(info, chunk_len)
        return head


def records(info: TensorInfo, chunk_size: int = CHUNK_SIZE,
            heads: Optional[_TensorHeads] = None) -> List[Tuple[bytes, int, int]]:
    """The records `CkptWriter` writes for a tensor: (header, data start, data length) each."""
    heads = heads or _TensorHeads()
    name = info.name.encode()
    return [(_record_header(name, heads(info, length), length), start, length)
            for start, length in _chunks(info.nbytes, chunk_size)]


def crc_trailer(crc: int) -> bytes:
    """The trailer for a file whose bytes before it have this CRC-32."""
    return CRC_MAGIC + crc.to_bytes(10, "big")


def _tensor_size(info: TensorInfo, chunk_size: int, heads: _TensorHeads) -> int:
    """Bytes of all the records `CkptWriter` writes for a tensor."""
    name_len = len(info.name.encode())
    return sum(_record_size(name_len, len(heads(info, length)), length)
               for _, length in _chunks(info.nbytes, chunk_size))


def planned_size(tensors: Sequence[TensorInfo], *, crc: bool = False,
                 chunk_size: int = CHUNK_SIZE) -> int:
    """Exact size of the file `CkptWriter` will write for these tensors."""
    heads = _TensorHeads()
    return sum(_tensor_size(info, chunk_size, heads) for info in tensors) + (
        CRC_TRAILER_SIZE if crc else 0)


class CkptWriter(TensorWriter):
    """Writes each tensor's records at their planned place in a `.ckpt`.

    The planned order fixes where every record goes, so tensors may be
    written in any order, from several threads at once, and the file is the
    same. With `crc`, each tensor's CRC-32 is taken as its bytes pass and the
    pieces are chained in file order at the end (see crc32.py), for the
    trailer.
    """

    def __init__(self, path: "os.PathLike[str] | str", tensors: Sequence[TensorInfo], *,
                 crc: bool = False, chunk_size: int = CHUNK_SIZE, direct: bool = True) -> None:
        super().__init__(path, tensors, direct=direct)
        self._chunk_size = chunk_size
        self._heads = _TensorHeads()
        self._tensors = list(tensors)
        #: Each tensor's slot (its place in the planned order) and its first record's offset.
        self._places: Dict[str, Tuple[int, int]] = {}
        self._sizes: List[int] = []
        offset = 0
        for slot, info in enumerate(tensors):
            self._places[info.name] = (slot, offset)
            self._sizes.append(_tensor_size(info, chunk_size, self._heads))
            offset += self._sizes[-1]
        self._end = offset
        self._crc_parts = array("L", [0]) * len(tensors) if crc else None
        assert self._out.file is not None
        try:
            self._out.file.truncate(self._end + (CRC_TRAILER_SIZE if crc else 0))
        except OSError as exc:
            self._out.discard()
            raise OutputError(self.path, f"cannot write: {exc.strerror}") from None

    def data_offset(self, name: str) -> int:
        """After its first record's header (a tensor of more than one chunk has more)."""
        slot, pos = self._places[name]
        header, _, _ = records(self._tensors[slot], self._chunk_size, self._heads)[0]
        return pos + len(header)

    def _store(self, info: TensorInfo, data: memoryview) -> None:
        slot, pos = self._places[info.name]
        crc = 0
        for header, start, length in records(info, self._chunk_size, self._heads):
            chunk = data[start:start + length]
            pieces = (header + chunk,) if length <= _JOIN_CHUNK else (header, chunk)
            for piece in pieces:  # small records in one write, large ones not copied
                self._write_at(piece, pos)
                pos += len(piece)
                if self._crc_parts is not None:
                    crc = zlib.crc32(piece, crc)
        if self._crc_parts is not None:
            self._crc_parts[slot] = crc

    def _finish(self) -> None:
        if self._crc_parts is not None:
            crc = crc32.chain(zip(self._crc_parts, self._sizes))
            self._write_at(crc_trailer(crc), self._end)
