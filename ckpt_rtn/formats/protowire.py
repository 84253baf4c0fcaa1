"""The few pieces of the protobuf wire format a `.ckpt` needs.

MindSpore checkpoints are protobuf messages, but decoding them with the
protobuf library would read whole (multi-GB) messages into memory. These
helpers let the reader walk field headers and skip payloads by length.
"""
from __future__ import annotations

from typing import List, Tuple

VARINT = 0
I64 = 1
LEN = 2
I32 = 5


class WireError(ValueError):
    """Malformed wire data; `offset` is where decoding failed."""

    def __init__(self, reason: str, offset: int) -> None:
        super().__init__(reason)
        self.offset = offset


#: The one-byte varints, prebuilt: most lengths and dims in a record are below 128.
_SMALL = tuple(bytes((v,)) for v in range(0x80))


def encode_varint(value: int) -> bytes:
    """Base-128 varint; negative numbers as 10-byte two's complement."""
    if 0 <= value < 0x80:
        return _SMALL[value]
    if value < 0:
        if value < -(1 << 63):
            raise ValueError(f"{value} is below int64's range")
        value += 1 << 64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def varint_size(value: int) -> int:
    """Bytes `encode_varint(value)` takes."""
    return 10 if value < 0 else max(1, (value.bit_length() + 6) // 7)


def decode_varint(buf: "bytes | memoryview", pos: int, end: int) -> Tuple[int, int]:
    """Decode the varint at `pos`; returns (value, position after it)."""
    if pos < end:
        byte = buf[pos]
        if byte < 0x80:  # one byte: the common case, without the loop
            return byte, pos + 1
    start = pos
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise WireError("varint runs past the end of its message", start)
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise WireError("varint longer than 10 bytes", start)


def signed64(value: int) -> int:
    """Interpret a decoded varint as int64 (proto int64 fields)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def read_key(buf: "bytes | memoryview", pos: int, end: int) -> Tuple[int, int, int]:
    """Decode a field key; returns (field number, wire type, position after)."""
    key, after = decode_varint(buf, pos, end)
    field, wire = key >> 3, key & 7
    if field == 0 or wire not in (VARINT, I64, LEN, I32):
        raise WireError(f"invalid field key 0x{key:x}", pos)
    return field, wire, after


def read_len(buf: "bytes | memoryview", pos: int, end: int) -> Tuple[int, int]:
    """Decode a LEN prefix; returns (payload start, payload end)."""
    length, start = decode_varint(buf, pos, end)
    if start + length > end:
        raise WireError(f"field of {length} bytes runs past the end of its message "
                        f"({end - start} bytes left)", pos)
    return start, start + length


def read_ints(buf: "bytes | memoryview", wire: int, pos: int, end: int) -> Tuple[List[int], int]:
    """The values of a repeated int field after its key: one varint, or a packed run.

    Negative int32/int64 values are 10-byte two's-complement varints.
    """
    if wire == VARINT:
        value, pos = decode_varint(buf, pos, end)
        return [signed64(value)], pos
    start, pos = read_len(buf, pos, end)
    values = []
    while start < pos:
        value, start = decode_varint(buf, start, pos)
        values.append(signed64(value))
    return values, pos


def skip_field(buf: "bytes | memoryview", wire: int, pos: int, end: int) -> int:
    """Position after a field's payload, whatever its wire type."""
    if wire == VARINT:
        return decode_varint(buf, pos, end)[1]
    if wire == LEN:
        return read_len(buf, pos, end)[1]
    size = 8 if wire == I64 else 4
    if pos + size > end:
        raise WireError("fixed-size field runs past the end of its message", pos)
    return pos + size


def key(field: int, wire: int) -> bytes:
    return encode_varint(field << 3 | wire)
