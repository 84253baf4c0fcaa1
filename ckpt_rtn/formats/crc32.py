"""crc32_combine, which Python's zlib lacks: the CRC-32 of A+B from crc(A), crc(B) and len(B).

MindSpore's safetensors `crc_num` chains the CRC over tensors in sorted-name
order, but tensors are read and written in data order. Each tensor's CRC is
therefore taken on its own, when its bytes pass anyway, and the pieces are
combined in sorted order at the end, without reading anything twice.

crc(A+B) = crc(A) * x^(8 len B) + crc(B) over GF(2) modulo the CRC
polynomial (zlib's crc32_combine; the pre- and post-inversions cancel). The
shift by x^(8n) is zlib.crc32 over n zero bytes without those inversions
for short B, and square-and-multiply by a table of x^(2^k) for long B.
"""
from __future__ import annotations

import zlib
from typing import Iterable, List, Tuple

_POLY = 0xEDB88320  # the CRC-32 polynomial, bit-reversed as zlib computes
_ONE = 1 << 31  # the polynomial 1 in that bit order
_MASK = 0xFFFFFFFF
#: Shifts over at most this many bytes run zlib over zeros (C speed, no Python loop).
_ZEROS = memoryview(bytes(64 * 1024))


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC polynomial (a nonzero)."""
    product = 0
    m = _ONE
    while True:
        if a & m:
            product ^= b
            if not a & (m - 1):
                return product
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _powers() -> List[int]:
    """x^(2^k) modulo the polynomial, k = 0..31 (x^(2^32) = x again: the table cycles)."""
    table = [_ONE >> 1]  # x^1
    for _ in range(31):
        table.append(_multmodp(table[-1], table[-1]))
    return table


_X2N = _powers()


def _shift(crc: int, nbytes: int) -> int:
    """crc * x^(8 nbytes) modulo the polynomial: `crc` carried over `nbytes` zero bytes."""
    if nbytes <= len(_ZEROS):
        return zlib.crc32(_ZEROS[:nbytes], crc ^ _MASK) ^ _MASK
    power, k = _ONE, 3  # x^(8n) = x^(n * 2^3)
    while nbytes:
        if nbytes & 1:
            power = _multmodp(_X2N[k & 31], power)
        nbytes >>= 1
        k += 1
    return _multmodp(power, crc)


def combine(crc1: int, crc2: int, len2: int) -> int:
    """The CRC-32 of A+B, given crc1 = crc32(A), crc2 = crc32(B) and len2 = len(B)."""
    return _shift(crc1, len2) ^ crc2


def chain(pieces: Iterable[Tuple[int, int]]) -> int:
    """The CRC-32 of consecutive pieces given as (crc32 of the piece, its length), in order."""
    crc = 0
    for piece_crc, length in pieces:
        crc = _shift(crc, length) ^ piece_crc
    return crc
