"""Compiled RTN kernels: the same bits as rtn.py's numpy steps, in one pass per row.

The numpy path in rtn.py makes about a dozen passes over every block of a
weight (widen, min, max, divide, round the bits, add the zero point, round
again, rint, two clamps, cast), each a separate loop over memory; a core
then moves a few hundred MB/s. These kernels do the same arithmetic element
by element, inside one loop over a row that lives in L1, so each element is
read from memory once for its row's bounds and once for its codes (the
block of rows in between stays in cache), and written once.

Why numba: it ships wheels for every platform CPython does (pip needs no
compiler), compiles on first use to native code that releases the GIL (so
the converter's threads share a weight's rows with no process hop), and is
kept up to date with numpy. Its compiled code is cached on disk
(`cache=True`), so only a machine's first conversion pays for compiling.

Exactness: every float operation here is one IEEE operation of the same
type, in the same order, as the numpy path's (no fastmath: a divide must not
become a multiply by a reciprocal), and every rounding that numpy does with
integer operations on the bit patterns is done with the same integer
operations; tests/test_kernels.py compares both paths bit for bit.
Computing each row's scale and zero point stays in numpy (rtn._Params), a
vector per block of rows, where its float64 roundings are numpy's own.
"""
from __future__ import annotations

import functools
from typing import Callable

import numpy as np
from numba import njit

#: How a row's stored values become work values: fp16 or bf16 bit patterns, or a float dtype.
FP16, BF16, FLOAT = 0, 1, 2
#: fp16 bits moved into a float32's place are off by 2^112 in exponent (as rtn._load).
_FP16_EXPONENT_FIX = np.float32(2.0 ** 112)
#: fastmath flags for report figures only (_row_errors): no 'arcp', no 'afn' on the codes.
_REPORT_MATH = {"reassoc", "nsz", "nnan", "ninf", "contract"}
#: Magnitude bits from which a 16-bit pattern is inf or NaN (exponent all ones).
FP16_INF = 0x7C00
BF16_INF = 0x7F80


@njit(nogil=True, cache=True)
def bounds16(raw, low, high):  # pragma: no cover - compiled
    """Each row's min and max of fp16 or bf16 bit patterns, as ordered integer keys
    (+magnitude, or -magnitude for a negative sign), and the largest magnitude seen
    (inf/NaN when at least FP16_INF/BF16_INF). Integer min/max: no widening needed."""
    rows, cols = raw.shape
    largest = 0
    for i in range(rows):
        lo = np.int32(0x7FFF)
        hi = np.int32(-0x7FFF)
        top = np.int32(0)
        for j in range(cols):
            h = np.int32(raw[i, j])
            magnitude = h & np.int32(0x7FFF)
            key = magnitude if h < np.int32(0x8000) else -magnitude
            lo = min(lo, key)
            hi = max(hi, key)
            top = max(top, magnitude)
        low[i] = lo
        high[i] = hi
        largest = max(largest, top)
    return largest


@njit(nogil=True, cache=True)
def bounds_float(raw, low, high):  # pragma: no cover - compiled
    """Each row's (min, max) of float32/float64 values; False if any is inf or NaN."""
    rows, cols = raw.shape
    finite = True
    for i in range(rows):
        lo = raw[i, 0]
        hi = raw[i, 0]
        for j in range(cols):
            x = raw[i, j]
            finite &= np.isfinite(x)
            lo = min(lo, x)
            hi = max(hi, x)
        low[i] = lo
        high[i] = hi
    return finite


@njit(nogil=True, cache=True, inline="always")
def _round_bits(x, drop):  # pragma: no cover - compiled
    """x (float32) rounded to 23 - `drop` mantissa bits, half to even (rtn._round_bits)."""
    b = np.float32(x).view(np.uint32)
    b = np.uint32((b + ((b >> drop) & 1) + ((1 << (drop - 1)) - 1)) & ~((1 << drop) - 1))
    return b.view(np.float32)


@njit(nogil=True, cache=True, fastmath=_REPORT_MATH)
def _row_errors(exact, codes, point):  # pragma: no cover - compiled
    """max |err|, sum |err|, sum err^2 and sum w^2 of one row, in units of its scale, where
    err = exact quotient - code + zero point, in the work dtype (as rtn._record_errors).

    Report figures, not output bytes: fastmath lets the sums be vectorised
    in any order, which the kernels' own arithmetic must never be. The max
    is taken on the bit patterns of |err| (ordered like the values, since
    they are not negative): a float max reduction does not vectorise.
    """
    work = exact.dtype.type
    worst = np.uint64(0)
    total, squares, weight = 0.0, 0.0, 0.0
    for j in range(exact.shape[0]):
        e = exact[j]
        err = np.float64(e - work(codes[j]) + point)  # exact: float32 fits in float64
        worst = max(worst, err.view(np.uint64) & np.uint64(0x7FFFFFFFFFFFFFFF))
        e64 = np.float64(e)
        total += abs(err)
        squares += err * err
        weight += e64 * e64
    return np.uint64(worst).view(np.float64), total, squares, weight


@functools.lru_cache(maxsize=None)
def quantize_kernel(kind: int, symmetric: bool, measure: bool) -> Callable[..., None]:
    """The codes kernel for rows of `kind` (FP16 or BF16 bit patterns, or FLOAT: float32 or
    float64 values), compiled for these flags.

    kernel(raw, divisor, zp, qmin, qmax, q, stats) writes the codes of each
    row into q. A 16-bit value is widened to float32, divided by its row's
    divisor (the scale, or inf for a zero scale), rounded to the format's
    precision, the zero point added and rounded again (asymmetric), then
    rint and clamp: rtn._quantize_rows' steps, element by element; float32
    and float64 values divide, and add the zero point, in their own
    precision. With `measure`, stats[i] gets row i's error sums (see
    _row_errors).

    The flags are constants of the compiled code, not arguments: a branch
    in the inner loop would keep it from being vectorised (8x slower).
    """
    drop = 16 if kind == BF16 else 13

    @njit(nogil=True, cache=True)
    def kernel(raw, divisor, zp, qmin, qmax, q, stats):  # pragma: no cover - compiled
        rows, cols = raw.shape
        exact_row = np.empty(cols if measure else 0, dtype=divisor.dtype)
        for i in range(rows):
            d = divisor[i]
            point = zp[i]
            row = q[i]
            for j in range(cols):
                if kind == FLOAT:
                    exact = raw[i, j] / d
                    x = exact if symmetric else exact + point
                else:
                    h = np.uint32(raw[i, j])
                    if kind == BF16:
                        w = np.uint32(h << 16).view(np.float32)
                    else:  # exact, subnormals included
                        w = np.uint32(((h & 0x8000) << 16) | ((h & 0x7FFF) << 13)).view(
                            np.float32) * _FP16_EXPONENT_FIX
                    exact = w / d
                    x = _round_bits(exact, drop)
                    if not symmetric:  # the zero point is added in the weight's format too
                        x = _round_bits(x + point, drop)
                row[j] = np.int8(min(max(np.rint(x), qmin), qmax))
                if measure:
                    exact_row[j] = exact
            if measure:
                stats[i, 0], stats[i, 1], stats[i, 2], stats[i, 3] = _row_errors(
                    exact_row, row, point)

    return kernel


#: Edge of the tiles pack_int4_transposed turns: 64 row pairs by 64 columns, 4 KiB in L1.
#: Each of `out`'s rows then gets a whole cache line (64 bytes) at once, and the tile's rows
#: are 64 bytes apart, where whole rows of a wide matrix would all fall in one cache set.
_PACK_TILE = 64


@njit(nogil=True, cache=True)
def pack_int4_transposed(codes, out):  # pragma: no cover - compiled
    """int4 codes [out, in] into qint4x2 [in, out/2] (packing.Int4Layout.TRANSPOSED): out[i, j]
    holds codes[2j, i] in its low nibble and codes[2j+1, i] in its high one. `out` may be
    a column slice of a wider matrix: rtn packs each block of rows into its own columns."""
    rows, cols = codes.shape
    half = rows // 2
    tile = np.empty((_PACK_TILE, _PACK_TILE), dtype=np.int8)  # [pairs, columns]
    for p0 in range(0, half, _PACK_TILE):
        p1 = min(p0 + _PACK_TILE, half)
        for c0 in range(0, cols, _PACK_TILE):
            c1 = min(c0 + _PACK_TILE, cols)
            for p in range(p0, p1):
                _pack_pair(codes[2 * p, c0:c1], codes[2 * p + 1, c0:c1], tile[p - p0])
            for c in range(c0, c1):
                row = out[c]
                for p in range(p0, p1):
                    row[p] = tile[p - p0, c - c0]


@njit(nogil=True, cache=True)
def pack_int4_rows(codes, out):  # pragma: no cover - compiled
    """int4 codes [out, in] into [out/2, in] (packing.Int4Layout.ROWS): row j of `out` holds
    codes[2j] in its low nibbles and codes[2j+1] in its high ones."""
    for p in range(codes.shape[0] // 2):
        _pack_pair(codes[2 * p], codes[2 * p + 1], out[p])


@njit(nogil=True, cache=True, inline="always")
def _pack_pair(even, odd, packed):  # pragma: no cover - compiled
    for c in range(even.shape[0]):
        packed[c] = np.int8((np.uint8(even[c]) & np.uint8(0x0F))
                            | (np.uint8(odd[c]) << np.uint8(4)))
