"""safetensors files, read and written one tensor at a time.

A safetensors file is a u64 header length, a JSON header giving each
tensor's dtype, shape and byte range, then the data. The writer therefore
needs every name, dtype and shape before the first byte of data: it takes
the planned tensor list, writes the header at once, and then places each
tensor at its planned offset as it arrives, so no model-sized dict is ever
held. Data is laid out largest alignment first, as the safetensors library
does, so every tensor stays aligned for zero-copy readers.

MindSpore's flavour adds `{"format": "ms"}` to `__metadata__`, marks
qint4x2 tensors (stored as I8) with `"<name>": "Int4"`, and with crc_check
stores `"crc_num": "<decimal>"`: CRC-32 chained, over the tensors in sorted
name order, over each name's UTF-8 bytes then the tensor's bytes. All three
are honoured; the CRC is verified like a `.ckpt` trailer and written on request.

The header is untrusted input of up to 100 MB: it is refused by its length
prefix before being read when longer, and parsed one top-level member at a
time (never as one dict of dicts), with bounded integers and depth.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import zlib
from array import array
from dataclasses import dataclass
from json.decoder import scanstring
from json.encoder import encode_basestring_ascii
from typing import (Callable, Dict, Iterator, List, Mapping, NamedTuple, NoReturn, Optional,
                    Sequence, Tuple)

import numpy as np

from .. import dtypes
from ..errors import ChecksumError, FormatError, OutputError, UnsupportedError
from . import crc32, sniff, untrusted_json
from .untrusted_json import brief
from .tensor import MAX_DIMS, TensorInfo, TensorReader, TensorWriter, shape_problem

#: The safetensors library refuses headers longer than this (its MAX_HEADER_SIZE).
MAX_HEADER_SIZE = 100_000_000
INT4_MARK = "Int4"
METADATA_KEY = "__metadata__"
CRC_KEY = "crc_num"
#: crc_num's decimal value is at most 2**32 - 1: ten digits.
_CRC_WIDTH = 10
_CRC_VALUE = re.compile(r"[0-9]{1,%d}" % _CRC_WIDTH)
_WS = re.compile(r"[ \t\n\r]*").match
_SPACE = " \t\n\r"
_INT = r"(?:0|[1-9][0-9]{0,19})"  # a JSON integer (no leading zeros) of at most 20 digits
#: A tensor entry's value exactly as the safetensors library writes it (compact, its key
#: order, at most MAX_DIMS dims): dtype, shape, begin, end.
_CANONICAL_ENTRY = re.compile(
    r'\{"dtype":"([A-Z0-9_]{1,16})","shape":\[((?:%s(?:,%s){0,%d})?)\],'
    r'"data_offsets":\[(%s),(%s)\]\}' % (_INT, _INT, MAX_DIMS - 1, _INT, _INT)).match
#: Any JSON scalar, array of scalars, or object of those: what a tensor entry can be.
_SCALAR = (r'(?:"(?:[^"\\\x00-\x1f]|\\.)*"|-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?'
           r"|true|false|null|NaN|-?Infinity)")
_FLAT = r"(?:%s|\[[ \t\n\r]*(?:%s[ \t\n\r]*(?:,[ \t\n\r]*%s[ \t\n\r]*)*)?\])" % (
    _SCALAR, _SCALAR, _SCALAR)
_MEMBER = r'"(?:[^"\\\x00-\x1f]|\\.)*"[ \t\n\r]*:[ \t\n\r]*%s[ \t\n\r]*' % _FLAT
_FLAT_VALUE = re.compile(r"%s|\{[ \t\n\r]*(?:%s(?:,[ \t\n\r]*%s)*)?\}" % (
    _FLAT, _MEMBER, _MEMBER)).match
#: The JSON text a tensor entry may take beyond the library's compact form. The cap bounds
#: what a hostile entry (a 100 MB array of arrays) can cost before it is refused.
_MAX_ENTRY_TEXT = 64 * 1024
#: __metadata__ holds a few keys plus at most one Int4 mark per tensor.
_METADATA_SPARE = 1000


class _Fields(NamedTuple):
    """A header entry's dtype, shape and data_offsets, as taken from the JSON text."""

    dtype: str
    shape: List[int]
    data_offsets: List[int]


class _JSONObject:
    """The members of the JSON object at `pos` in `text`, walked one name at a time.

    Iterating yields (name, position of the name) with `pos` at the member's
    value; the caller decodes the value and moves `pos` past it. After the
    closing brace `end` is the position after it.
    """

    def __init__(self, text: str, pos: int, syntax: Callable[[str, int, str], NoReturn],
                 what: str) -> None:
        if text[pos:pos + 1] != "{":
            syntax(text, pos, f"{what} is not a JSON object")
        self.text, self.pos, self.end = text, pos + 1, -1
        self._syntax = syntax

    def __iter__(self) -> Iterator[Tuple[str, int]]:
        text = self.text
        pos = _WS(text, self.pos).end()
        if text[pos:pos + 1] == "}":
            self.end = pos + 1
            return
        while True:
            if text[pos:pos + 1] != '"':
                self._syntax(text, pos, "expected a name in double quotes")
            name, after = scanstring(text, pos + 1)
            if text[after:after + 1] != ":":  # (compact JSON skips the regex calls)
                after = _WS(text, after).end()
                if text[after:after + 1] != ":":
                    self._syntax(text, after, "expected ':'")
            self.pos = after + 1
            if text[self.pos:self.pos + 1] in _SPACE:
                self.pos = _WS(text, self.pos).end()
            yield name, pos
            pos = self.pos
            if text[pos:pos + 1] in _SPACE:
                pos = _WS(text, pos).end()
            separator = text[pos:pos + 1]
            if separator == "}":
                self.end = pos + 1
                return
            if separator != ",":
                self._syntax(text, pos, "expected ',' or '}'")
            pos += 1
            if text[pos:pos + 1] in _SPACE:
                pos = _WS(text, pos).end()


class SafetensorsReader(TensorReader):
    """Index of a safetensors file; tensors are listed in data order.

    A `crc_num` is verified on opening unless `verify_crc=False`. With
    `defer_crc=True` each tensor's CRC is instead taken as it is read, and
    `finish()` reads what was not read and checks the combination.
    """

    format = "safetensors"

    def __init__(self, path: "os.PathLike[str] | str", *, verify_crc: bool = True,
                 defer_crc: bool = False) -> None:
        super().__init__(path)
        #: crc_num from the metadata, if any.
        self.crc: Optional[int] = None
        #: CRC-32 of each tensor's name and bytes, by index, while verification is pending.
        self._crc_parts: Optional["array[int]"] = None
        self._crc_known = bytearray()
        try:
            with self.reading():
                self._index(verify_crc)
            if verify_crc and self.crc is not None:
                self._crc_parts = array("L", [0]) * len(self.tensors)
                self._crc_known = bytearray(len(self.tensors))
                if not defer_crc:
                    self.finish()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ index

    def _index(self, verify_crc: bool) -> None:
        size = os.fstat(self._fd).st_size
        if size < 8:
            raise FormatError(self.path, f"{size} bytes is too short for a safetensors file")
        head = os.pread(self._fd, sniff.HEAD_SIZE, 0)
        (header_len,) = struct.unpack("<Q", head[:8])
        if header_len > MAX_HEADER_SIZE:
            raise FormatError(self.path, f"header length {header_len} is over the safetensors "
                              f"limit of {MAX_HEADER_SIZE} bytes: not a safetensors file, or "
                              f"corrupt{sniff.hint(head, size, 'safetensors')}", 0)
        if header_len > size - 8:
            raise FormatError(self.path, f"header length {header_len} does not fit in a file "
                              f"of {size} bytes: not a safetensors file, or truncated"
                              f"{sniff.hint(head, size, 'safetensors')}", 0)
        raw = os.pread(self._fd, header_len, 8)
        if len(raw) < header_len:
            raise FormatError(self.path, "file shrank while its header was read", 8 + len(raw))
        with untrusted_json.refusing(self.path, "header", 8):
            text = raw.decode("utf-8")
        del raw
        entries, metadata = self._header(text)
        del text
        self.metadata = metadata or {}
        data_start = 8 + header_len
        entries.sort(key=lambda e: (e[0], e[1]))
        self._check_coverage(entries, size - data_start, data_start)
        for begin, end, info in entries:
            self._add_tensor(info, data_start + begin, end - begin)
        self._mark_int4()
        self._read_crc(verify_crc)

    def _header(self, text: str) -> Tuple[List[Tuple[int, int, TensorInfo]],
                                          Optional[Dict[str, str]]]:
        """The tensor entries (begin, end, info) and __metadata__ of the header's JSON object.

        Read one member at a time, so that the header is never held as one dict
        of dicts (a 100 MB header would take gigabytes), a name seen twice is
        caught instead of silently replaced, and no member can cost more than
        its share: an entry as the safetensors library writes it is matched by
        one regular expression, any other is decoded from at most
        _MAX_ENTRY_TEXT characters of JSON.
        """
        entries: List[Tuple[int, int, TensorInfo]] = []
        metadata: Optional[Dict[str, str]] = None
        seen = set()
        with untrusted_json.refusing(self.path, "header", 8):
            start = _WS(text).end()
            if text[start:start + 1] != "{":
                raise FormatError(self.path, "header is not a JSON object", self._at(text, start))
            members = _JSONObject(text, start, self._syntax, "header")
            for name, at in members:
                if name in seen:
                    raise FormatError(self.path, f"{brief(name)} appears twice in the header",
                                      self._at(text, at))
                seen.add(name)
                if name == METADATA_KEY:
                    metadata, members.pos = self._metadata(text, members.pos, at)
                    continue
                canonical = _CANONICAL_ENTRY(text, members.pos)
                if canonical is not None:
                    code, shape, begin, end = canonical.groups()
                    members.pos = canonical.end()
                    fields = _Fields(code, [int(d) for d in shape.split(",")] if shape else [],
                                     [int(begin), int(end)])
                else:
                    value, members.pos = self._bounded_value(text, members.pos, name)
                    fields = self._fields(name, value, text, at)
                entries.append(self._entry(name, fields, text, at))
            if _WS(text, members.end).end() != len(text):
                self._syntax(text, members.end, "text after the header's closing brace")
        return entries, metadata

    def _bounded_value(self, text: str, pos: int, name: str) -> Tuple[object, int]:
        """The JSON value at `pos` and the position after it, decoded from at most
        _MAX_ENTRY_TEXT characters (a flat value is recognised without copying)."""
        if _FLAT_VALUE(text, pos, pos + _MAX_ENTRY_TEXT) is None:
            window = text[pos:pos + _MAX_ENTRY_TEXT]
            try:
                value, end = untrusted_json.DECODER.scan_once(window, 0)
            except (StopIteration, json.JSONDecodeError) as exc:
                failed = exc.value if isinstance(exc, StopIteration) else exc.pos
                if len(window) == _MAX_ENTRY_TEXT and failed >= len(window) - 1:
                    raise FormatError(self.path, f"header entry {brief(name)} takes more than "
                                      f"{_MAX_ENTRY_TEXT} characters: not a tensor entry",
                                      self._at(text, pos)) from None
                self._syntax(text, pos + failed, "expected a value" if isinstance(
                    exc, StopIteration) else exc.msg)
            return value, pos + end
        try:
            return untrusted_json.DECODER.scan_once(text, pos)
        except StopIteration:
            self._syntax(text, pos, "expected a value")

    def _syntax(self, text: str, pos: int, what: str) -> NoReturn:
        raise FormatError(self.path, f"header is not valid JSON ({what})", self._at(text, pos))

    @staticmethod
    def _at(text: str, pos: int) -> int:
        """File offset of character `pos` of the header (computed on the error path only)."""
        return 8 + len(text[:pos].encode("utf-8"))

    def _metadata(self, text: str, pos: int, at: int) -> Tuple[Dict[str, str], int]:
        """__metadata__ (null, or an object of strings) at `pos`, and the position after it.

        It may hold a few keys plus one Int4 mark per tensor (counted from the
        header's data_offsets), which bounds what a hostile one can cost.
        """
        if text.startswith("null", pos):
            return {}, pos + 4
        if text[pos:pos + 1] != "{":
            raise FormatError(self.path, "__metadata__ must map strings to strings",
                              self._at(text, at))
        limit = text.count('"data_offsets"') + _METADATA_SPARE
        metadata: Dict[str, str] = {}
        members = _JSONObject(text, pos, self._syntax, METADATA_KEY)
        for key, key_at in members:
            if text[members.pos:members.pos + 1] != '"':
                raise FormatError(self.path, "__metadata__ must map strings to strings",
                                  self._at(text, key_at))
            metadata[key], members.pos = scanstring(text, members.pos + 1)
            if len(metadata) > limit:
                raise FormatError(self.path, f"__metadata__ holds more than {limit} entries "
                                  f"(a few, and at most one per tensor)", self._at(text, key_at))
        return metadata, members.end

    def _fields(self, name: str, value: object, text: str, at: int) -> _Fields:
        """A header entry decoded as JSON, checked for the types _Fields holds."""
        if type(value) is not dict:
            raise FormatError(self.path, f"header entry {brief(name)} is not an object",
                              self._at(text, at))
        code, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
        if type(code) is not str:
            raise UnsupportedError(self.path, f"tensor {brief(name)} has unknown dtype "
                                   f"{brief(code)}")
        if type(shape) is not list or not all(type(d) is int for d in shape):
            raise FormatError(self.path, f"tensor {brief(name)} has an invalid shape "
                              f"{brief(shape)}", self._at(text, at))
        if any(d < 0 for d in shape):  # the canonical entries' digits have no sign
            raise FormatError(self.path, f"tensor {brief(name)} has an invalid shape: "
                              f"{shape_problem(shape, None)}", self._at(text, at))
        if type(offsets) is not list or len(offsets) != 2 \
                or not all(type(d) is int for d in offsets):
            raise FormatError(self.path, f"tensor {brief(name)} has invalid data_offsets "
                              f"{brief(offsets)}", self._at(text, at))
        return _Fields(code, shape, offsets)

    def _entry(self, name: str, fields: _Fields, text: str,
               at: int) -> Tuple[int, int, TensorInfo]:
        """(begin, end, info) of one tensor's header entry, checked."""
        if not name.isascii():
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise FormatError(self.path, f"tensor name {brief(name)} is not valid Unicode "
                                  "(a lone surrogate)", self._at(text, at)) from None
        code, shape, (begin, end) = fields
        dtype = dtypes.from_safetensors_code(code)
        if dtype is None:
            if code.startswith("F8_"):
                raise UnsupportedError(self.path, f"tensor {brief(name)} is {brief(code)}, an "
                                       "FP8 format ckpt-rtn does not read (it reads F8_E4M3 "
                                       "with DeepSeek-V3-style weight_scale_inv block scales)")
            raise UnsupportedError(self.path, f"tensor {brief(name)} has unknown dtype "
                                   f"{brief(code)}")
        if len(shape) > MAX_DIMS:
            raise FormatError(self.path, f"tensor {brief(name)} has an invalid shape: "
                              f"{shape_problem(shape, None)}", self._at(text, at))
        nbytes = math.prod(shape) * dtype.itemsize  # type: ignore[operator]
        if nbytes == 0:  # a zero dimension: rare, so the others are checked only here
            problem = shape_problem(shape, dtype.itemsize)
            if problem is not None:
                raise FormatError(self.path, f"tensor {brief(name)} has an invalid shape: "
                                  f"{problem}", self._at(text, at))
        if not 0 <= begin <= end:
            raise FormatError(self.path, f"tensor {brief(name)} has invalid data_offsets "
                              f"{[begin, end]}", self._at(text, at))
        if end - begin != nbytes:
            raise FormatError(self.path, f"tensor {brief(name)}: data_offsets [{begin}, {end}] "
                              f"span {end - begin} bytes, but {dtype} {shape} needs {nbytes}",
                              8 + len(text.encode("utf-8")) + begin)
        return begin, end, TensorInfo(name, dtype, tuple(shape), nbytes)

    def _check_coverage(self, entries: List[Tuple[int, int, TensorInfo]],
                        data_len: int, data_start: int) -> None:
        """Tensors must tile the data region exactly: no overlap, hole or overrun."""
        pos = 0
        for begin, end, info in entries:
            if begin != pos:
                what = "overlaps the tensor before it" if begin < pos else "leaves a gap before it"
                raise FormatError(self.path, f"tensor {brief(info.name)}: data_offsets start "
                                  f"{begin} {what} (previous data ends at {pos})",
                                  data_start + min(begin, data_len))
            if end > data_len:
                raise FormatError(self.path, f"tensor {brief(info.name)}: data_offsets end "
                                  f"{end} is past the end of the data ({data_len} bytes): "
                                  "truncated file or wrong header", data_start + begin)
            pos = end
        if pos != data_len:
            raise FormatError(self.path, f"{data_len - pos} bytes after the last tensor are not "
                              "described by the header", data_start + pos)

    def _mark_int4(self) -> None:
        """I8 tensors that __metadata__ marks "Int4" are MindSpore qint4x2."""
        for name, mark in self.metadata.items():
            i = self._position.get(name)
            if mark == INT4_MARK and i is not None and self.tensors[i].dtype is dtypes.INT8:
                info = self.tensors[i]
                self.tensors[i] = TensorInfo(name, dtypes.INT4, info.shape, info.nbytes)

    def _read_crc(self, verify_crc: bool) -> None:
        text = self.metadata.get(CRC_KEY)
        if text is None:
            return
        if _CRC_VALUE.fullmatch(text) and int(text) < 2 ** 32:
            self.crc = int(text)
        elif verify_crc:
            raise FormatError(self.path, f"__metadata__ {CRC_KEY} {brief(text)} is not a CRC-32 "
                              "(a decimal number below 2**32); --no-verify-crc reads the file "
                              "anyway", 8)

    # ------------------------------------------------------------------ CRC

    def _read_raw(self, info: TensorInfo) -> np.ndarray:
        raw = super()._read_raw(info)
        parts = self._crc_parts
        if parts is not None:
            i = self._position[info.name]
            parts[i] = zlib.crc32(raw, zlib.crc32(info.name.encode("utf-8")))
            self._crc_known[i] = 1
        return raw

    def finish(self) -> None:
        """Check crc_num: tensors not read yet are read now, in data order."""
        parts = self._crc_parts
        if parts is None:
            return
        self._crc_parts = None
        known = self._crc_known
        i = known.find(0)
        while i >= 0:
            start = self._offsets[i]
            with self.reading():
                parts[i] = self._crc_range(start, start + self._lengths[i],
                                           zlib.crc32(self.tensors[i].name.encode("utf-8")))
            i = known.find(0, i + 1)
        names = [t.name for t in self.tensors]
        order = sorted(range(len(names)), key=names.__getitem__)
        crc = crc32.chain((parts[i], len(names[i].encode("utf-8")) + self._lengths[i])
                          for i in order)
        if crc != self.crc:
            raise ChecksumError(self.path, f"CRC mismatch: {CRC_KEY} says {self.crc}, content "
                                f"gives {crc} (corrupt file; --no-verify-crc reads it anyway)")


# ---------------------------------------------------------------------- writing

@dataclass
class _Layout:
    """Where everything goes: the header bytes and each tensor's data range."""

    header: bytes  # the length prefix included
    slots: Dict[str, int]  # name -> position in data order
    begins: "array[int]"  # data offset of each slot, from the start of the data
    sizes: "array[int]"
    crc_at: Optional[int]  # offset in `header` of crc_num's value (its opening quote)


def _layout(tensors: Sequence[TensorInfo], metadata: Mapping[str, str], crc: bool,
            path: "os.PathLike[str] | str | None" = None) -> _Layout:
    """The header for `tensors` and each one's data range.

    With `crc`, __metadata__ comes last and crc_num last in it, holding ten
    digits' worth of room: the writer fills the value in at the end and pads
    after the closing brace with spaces (which JSON and every reader allow),
    so the header's length, and the file's size, are known before any data.
    """
    meta = {k: v for k, v in metadata.items() if k != CRC_KEY}
    for info in tensors:
        if info.dtype.safetensors is None:
            raise UnsupportedError(path, f"tensor {info.name!r}: safetensors cannot store "
                                   f"{info.dtype} values")
        if info.name == METADATA_KEY:
            raise UnsupportedError(path, f"a tensor named {METADATA_KEY!r}: safetensors keeps its "
                                   "metadata under that name; write a .ckpt instead")
        if info.dtype is dtypes.INT4 and (info.name in meta or info.name == CRC_KEY):
            raise UnsupportedError(path, f"Int4 tensor {info.name!r}: its Int4 mark would take "
                                   f"the {METADATA_KEY} key of that name; write a .ckpt instead")
    meta.update({t.name: INT4_MARK for t in tensors if t.dtype is dtypes.INT4})
    if crc:
        meta[CRC_KEY] = "0" * _CRC_WIDTH
    by_alignment: Dict[int, List[TensorInfo]] = {}
    for info in tensors:
        by_alignment.setdefault(_alignment(info.dtype), []).append(info)
    body = bytearray(b"{")
    if meta and not crc:
        body += b'"__metadata__":' + _json(meta) + b","
    slots: Dict[str, int] = {}
    begins, sizes = array("q"), array("q")
    pos = 0
    pieces: List[str] = []
    for alignment in sorted(by_alignment, reverse=True):
        for info in by_alignment[alignment]:  # MindSpore's reader needs entries in data order
            end = pos + info.nbytes
            pieces.append(f'{encode_basestring_ascii(info.name)}:{{"dtype":"'
                          f'{info.dtype.safetensors}","shape":[{",".join(map(str, info.shape))}],'
                          f'"data_offsets":[{pos},{end}]}}')
            slots[info.name] = len(slots)
            begins.append(pos)
            sizes.append(info.nbytes)
            pos = end
            if len(pieces) == 4096:
                body += ",".join(pieces).encode() + b","
                pieces.clear()
    body += ",".join(pieces).encode()
    if len(slots) != len(tensors):
        raise ValueError("two planned tensors have the same name")
    if body.endswith(b","):
        body.pop()
    crc_at = None
    if crc:
        body += (b"," if len(body) > 1 else b"") + b'"__metadata__":' + _json(meta)
        crc_at = 8 + len(body) - len(b'"' + b"0" * _CRC_WIDTH + b'"}')
    body += b"}"
    body += b" " * (-len(body) % 8)
    if len(body) > MAX_HEADER_SIZE:
        raise UnsupportedError(path, f"the safetensors header for these {len(tensors)} tensors "
                               f"would take {len(body)} bytes, over the format's limit of "
                               f"{MAX_HEADER_SIZE}: write a .ckpt, or shard the checkpoint")
    return _Layout(struct.pack("<Q", len(body)) + bytes(body), slots, begins, sizes, crc_at)


def _json(value: Mapping[str, str]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _alignment(dtype: dtypes.DType) -> int:
    assert dtype.itemsize is not None
    return dtype.itemsize


def header(tensors: Sequence[TensorInfo], metadata: Mapping[str, str],
           crc: Optional[int] = None) -> bytes:
    """The bytes `SafetensorsWriter` writes before the data (length prefix and JSON header),
    holding `crc` as crc_num if given."""
    layout = _layout(tensors, metadata, crc is not None)
    if crc is None:
        return layout.header
    assert layout.crc_at is not None
    return layout.header[:layout.crc_at] + _crc_tail(layout, crc)


def _crc_tail(layout: _Layout, crc: int) -> bytes:
    """The header from crc_num's value on, holding `crc`: the value, the closing braces and
    the spaces that keep the header's planned length."""
    assert layout.crc_at is not None
    tail = f'"{crc}"}}}}'.encode()
    return tail + b" " * (len(layout.header) - layout.crc_at - len(tail))


def planned_size(tensors: Sequence[TensorInfo], metadata: Mapping[str, str],
                 crc: bool = False, path: "os.PathLike[str] | str | None" = None) -> int:
    """Exact size of the file `SafetensorsWriter` will write."""
    layout = _layout(tensors, metadata, crc, path)
    return len(layout.header) + sum(layout.sizes)


class SafetensorsWriter(TensorWriter):
    """Writes the header for the planned tensors, then each tensor in place.

    Tensors may be written in any order, from several threads at once: each
    lands at its planned offset (small ones gathered, see TensorWriter). With
    `crc`, crc_num is computed from each tensor as it passes (see crc32.py)
    and filled into the header last.
    """

    def __init__(self, path: "os.PathLike[str] | str", tensors: Sequence[TensorInfo],
                 metadata: Mapping[str, str], *, crc: bool = False,
                 direct: bool = True) -> None:
        layout = _layout(tensors, metadata, crc, path)
        super().__init__(path, tensors, direct=direct)
        self._layout = layout
        self._data_start = len(layout.header)
        self._crc_parts = array("L", [0]) * len(tensors) if crc else None
        assert self._out.file is not None
        try:
            self._out.file.truncate(self._data_start + sum(layout.sizes))
            # Every byte is written once (direct.py gathers partial blocks by that): with
            # crc_num, the header from its value on is written last, by _finish.
            self._write_at(layout.header[:layout.crc_at], 0)
        except OSError as exc:
            self._out.discard()
            raise OutputError(self.path, f"cannot write: {exc.strerror}") from None

    def data_offset(self, name: str) -> int:
        return self._data_start + self._layout.begins[self._layout.slots[name]]

    def _store(self, info: TensorInfo, data: memoryview) -> None:
        slot = self._layout.slots[info.name]
        if self._crc_parts is not None:
            self._crc_parts[slot] = zlib.crc32(data, zlib.crc32(info.name.encode("utf-8")))
        self._write_at(data, self._data_start + self._layout.begins[slot])

    def _finish(self) -> None:
        if self._crc_parts is None or self._layout.crc_at is None:
            return
        names = list(self._layout.slots)  # in slot order
        order = sorted(range(len(names)), key=names.__getitem__)
        sizes, parts = self._layout.sizes, self._crc_parts
        crc = crc32.chain((parts[s], len(names[s].encode("utf-8")) + sizes[s]) for s in order)
        self._write_at(_crc_tail(self._layout, crc), self._layout.crc_at)
