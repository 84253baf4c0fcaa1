"""Compiled RTN kernels: the same bits as rtn.py's numpy steps, one pass per row, one call
per span of rows.

The numpy path in rtn.py makes about a dozen passes over every block of a
weight (widen, min, max, divide, round the bits, add the zero point, round
again, rint, two clamps, cast), each a separate loop over memory; a core
then moves a few hundred MB/s. The kernel here does the same arithmetic
row by row: it reads a row once for its bounds, computes the row's scale
and zero point, and reads it again, still in L1, for its codes (and packs
int4 codes as each block of rows is done). A thread's whole span of rows
is one call that releases the GIL, so threads share a weight with no
Python between its rows. Before, each block of rows went back to Python
and numpy for its scales: 9% of a W8 weight's time and 20% of a W4 one's
(cProfile, one thread), time in which other threads may wait for the GIL;
now 1% and 5%.

Why numba: it ships wheels for every platform CPython does (pip needs no
compiler), compiles on first use to native code that releases the GIL, and
is kept up to date with numpy. Its compiled code is cached on disk (see
CACHED), so only a machine's first conversion pays for compiling.

Exactness: every float operation here is one IEEE operation of the same
type, in the same order, as the numpy path's (no fastmath: a divide must not
become a multiply by a reciprocal), and every rounding that numpy does with
integer operations on the bit patterns is done with the same integer
operations. The scale and zero point, which numpy rounds to float16 with its
own conversion (numba has no float16), are rounded by `_fp16_bits`, the
same round-half-to-even from float64. tests/test_kernels.py compares both
paths bit for bit.
"""
from __future__ import annotations

import functools
import threading
from typing import Callable

import numpy as np
from numba import config, njit

#: How a row's stored values become work values: fp16 or bf16 bit patterns, or a float dtype.
FP16, BF16, FLOAT = 0, 1, 2
#: How int4 codes are stored (packing.Int4Layout): not packed, [in, out/2], [out/2, in].
UNPACKED, TRANSPOSED, ROWS = 0, 1, 2
#: fp16 bits moved into a float32's place are off by 2^112 in exponent (as rtn._load).
_FP16_EXPONENT_FIX = np.float32(2.0 ** 112)
#: fastmath flags for report figures only (_row_errors): no 'arcp', no 'afn' on the codes.
_REPORT_MATH = {"reassoc", "nsz", "nnan", "ninf", "contract"}
#: Magnitude bits from which a 16-bit pattern is inf or NaN (exponent all ones).
_FP16_INF = 0x7C00
_BF16_INF = 0x7F80
#: What span() returns for a row holding inf or NaN.
NON_FINITE = -1


#: False under NUMBA_DISABLE_JIT=1, a debugging switch that leaves every @njit function plain
#: Python, looping over each element: 10.8 s for a 1024 x 1024 weight (0.02 s compiled), so
#: about a day for a 7B model. rtn then runs numpy's steps instead (the same bits).
COMPILED = not config.DISABLE_JIT


def _probe() -> None:  # pragma: no cover - never called
    """Decorated once, to ask numba whether it can cache this module's code."""


def _cache_found() -> bool:
    try:
        njit(cache=True)(_probe)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available"
        return False
    return True


#: Whether numba caches the compiled kernels on disk: beside this module (its __pycache__),
#: in the user's cache directory, or in NUMBA_CACHE_DIR, whichever it can write first. Where
#: it can write none (a read-only install run without a writable home, as containers often
#: are), `cache=True` makes numba raise as the module is imported, and no weight could be
#: quantized; the kernels are then compiled again in every process instead (seconds each).
CACHED = _cache_found()


@njit(nogil=True, cache=CACHED, inline="always")
def _fp16_value(h):  # pragma: no cover - compiled
    """An fp16 bit pattern as float32, exactly (subnormals included)."""
    h = np.uint32(h)
    return np.uint32(((h & 0x8000) << 16) | ((h & 0x7FFF) << 13)).view(
        np.float32) * _FP16_EXPONENT_FIX


@njit(nogil=True, cache=CACHED, inline="always")
def _bf16_value(h):  # pragma: no cover - compiled
    return np.uint32(np.uint32(h) << 16).view(np.float32)


@njit(nogil=True, cache=CACHED, inline="always")
def _fp16_bits(x):  # pragma: no cover - compiled
    """float64 to the nearest fp16, ties to even, as a bit pattern: what numpy's
    astype(float16) gives (overflow to inf, NaN kept NaN)."""
    b = np.float64(x).view(np.uint64)
    sign = np.uint32((b >> np.uint64(48)) & np.uint64(0x8000))
    biased = np.int64((b >> np.uint64(52)) & np.uint64(0x7FF))
    exponent = biased - 1023 + 15
    if 0 < exponent < 31:  # a normal fp16 (or inf, rounding up from the largest)
        # Round the pattern's low 42 bits away, half to even: a carry out of the mantissa
        # moves into the exponent by itself. No branch on the dropped bits: whether to
        # round up is as random as the data, and a branch on it was mispredicted half the
        # time. W4 g128 rounds a scale for every 128 values: the branchy rounding took
        # 6 ms of an 8192 x 8192 weight's 33 (one thread), this one about 3.
        magnitude = b & np.uint64(0x7FFFFFFFFFFFFFFF)
        rounded = (magnitude + ((magnitude >> np.uint64(42)) & np.uint64(1))
                   + np.uint64((1 << 41) - 1)) >> np.uint64(42)
        return np.uint16(sign | np.uint32(rounded - np.uint64((1023 - 15) << 10)))
    if biased == 0x7FF:
        mantissa = b & np.uint64(0xFFFFFFFFFFFFF)
        return np.uint16(sign | 0x7C00 | (0x200 if mantissa else 0))
    if exponent > 30:
        return np.uint16(sign | 0x7C00)
    if exponent < -10:  # below half the smallest subnormal (2^-25): 0
        return np.uint16(sign)
    # A subnormal, or the smallest normal rounded up from one: 43 - exponent bits dropped.
    full = (b & np.uint64(0xFFFFFFFFFFFFF)) | np.uint64(1 << 52)
    shift = 43 - exponent
    kept = full >> np.uint64(shift)
    rest = full & ((np.uint64(1) << np.uint64(shift)) - np.uint64(1))
    half = np.uint64(1) << np.uint64(shift - 1)
    if rest > half or (rest == half and (kept & np.uint64(1))):
        kept += np.uint64(1)
    return np.uint16(sign | np.uint32(kept))


@njit(nogil=True, cache=CACHED, inline="always")
def _round_bits(x, drop):  # pragma: no cover - compiled
    """x (float32) rounded to 23 - `drop` mantissa bits, half to even (rtn._round_bits)."""
    b = np.float32(x).view(np.uint32)
    b = np.uint32((b + ((b >> drop) & 1) + ((1 << (drop - 1)) - 1)) & ~((1 << drop) - 1))
    return b.view(np.float32)


@njit(nogil=True, cache=CACHED, inline="always")
def _bf16_rounded(x):  # pragma: no cover - compiled
    """float32 rounded to the nearest bf16, ties to even, NaN kept (numerics.float32_to_bf16)."""
    if np.isnan(x):
        return x
    return _round_bits(x, 16)


@njit(nogil=True, cache=CACHED, fastmath=_REPORT_MATH)
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


@njit(nogil=True, cache=CACHED, inline="always")
def _stored(x, kind):  # pragma: no cover - compiled
    """A float64 scale or zero point rounded to a 16-bit `kind`, as a work value
    (numerics.to_work(to_storage(x))); float32 and float64 weights round by the store into
    their work array instead."""
    if kind == FP16:
        return _fp16_value(_fp16_bits(x))
    return _bf16_rounded(np.float32(x))


@njit(nogil=True, cache=CACHED, inline="always")
def _symmetric_scale(absmax, half_range, kind, float32_scale, scale, i):  # pragma: no cover
    """scale[i] = 2*absmax/(qmax - qmin) in the weight's format (rtn._symmetric_scale)."""
    if float32_scale:  # the legacy class: float32 arithmetic, then fp16
        scale[i] = _fp16_value(_fp16_bits(np.float64(np.float32(absmax) / np.float32(half_range))))
    elif kind == FLOAT:
        scale[i] = np.float64(absmax) / half_range
    else:
        scale[i] = _stored(np.float64(absmax) / half_range, kind)


_BUILDING = threading.Lock()


def span_kernel(kind: int, symmetric: bool, measure: bool, fixed: bool, float32_scale: bool,
                pack: int) -> Callable[..., int]:
    """The kernel that quantizes a span of rows of `kind` (FP16 or BF16 bit patterns, or
    FLOAT: float32 or float64 values), compiled for these flags (see _span_kernel).

    One per flags: the pool's threads ask for a weight's kernel at once, and each
    kernel built loads (or compiles) its code on its first call, holding numba's
    compiler lock; lru_cache alone would let several threads build one each.
    """
    with _BUILDING:
        return _span_kernel(kind, symmetric, measure, fixed, float32_scale, pack)


@functools.lru_cache(maxsize=None)
def _span_kernel(kind: int, symmetric: bool, measure: bool, fixed: bool, float32_scale: bool,
                 pack: int) -> Callable[..., int]:
    """The kernel that quantizes a span of rows of `kind`, compiled for these flags.

    span(raw, qmin, qmax, scale, zp, codes, packed, first, in_channels, block_rows, stats)
    quantizes rows raw[i] (global row first + i):

    - unless `fixed`, finds each row's bounds, then its scale and zero point
      (rtn._Params.fill): symmetric 2*max|w|/(qmax - qmin), in float32 for the
      legacy fp16 class (`float32_scale`), else float64; asymmetric
      (max - min)/(qmax - qmin) and round(qmin - min/scale) in float64, falling
      back to symmetric where either does not fit the format. Both are rounded
      to the weight's format and written, as work values, to scale[i] and zp[i].
      With `fixed`, scale and zp are given.
    - writes the codes: a 16-bit value is widened to float32, divided by its
      row's scale (inf for a zero scale), rounded to the format's precision,
      the zero point added and rounded again (asymmetric), then rint and clamp
      (rtn._quantize_rows' steps, element by element); float32 and float64
      values divide, and add the zero point, in their own precision. Codes go
      to codes[i], or with `pack` (TRANSPOSED, ROWS) to a block of
      `block_rows` rows (whole output rows of `in_channels`, a multiple of
      16, so that its packed columns start at a multiple of 8; the weight's
      last block may hold fewer pairs) that is packed into `packed` once done.
    - with `measure`, stats[i] gets the row's error sums (see _row_errors).

    Returns how many rows were constant (max == min), or NON_FINITE as soon as
    a row holds inf or NaN.

    The flags are constants of the compiled code, not arguments: a branch in
    the inner loop would keep it from being vectorised (8x slower). They are
    plain ints and bools, which numba's disk cache keys the code by; a
    compiled function among them would make every process compile again.
    """
    drop = 16 if kind == BF16 else 13
    limit = _FP16_INF if kind == FP16 else _BF16_INF

    @njit(nogil=True, cache=CACHED, error_model="numpy")
    def span(raw, qmin, qmax, scale, zp, codes, packed, first, in_channels, block_rows,
             stats):  # pragma: no cover - compiled
        rows, cols = raw.shape
        half_range = (np.float64(qmax) - np.float64(qmin)) / 2
        exact_row = np.empty(cols if measure else 0, dtype=scale.dtype)
        infinity = np.empty(1, dtype=scale.dtype)  # inf in the work dtype, not float64's
        infinity[0] = np.inf
        block = np.empty((block_rows if pack else 0, cols), dtype=np.int8)
        pairs = np.empty((block_rows * cols // in_channels // 2 if pack == TRANSPOSED else 0,
                          in_channels), dtype=np.int8)
        constant = 0
        for i in range(rows):
            if not fixed:
                if kind == FLOAT:
                    lo = raw[i, 0]
                    hi = raw[i, 0]
                    finite = True
                    for j in range(cols):
                        x = raw[i, j]
                        finite &= np.isfinite(x)
                        lo = min(lo, x)
                        hi = max(hi, x)
                    if not finite:
                        return NON_FINITE
                    absmax = max(abs(lo), abs(hi))
                else:  # integer min/max of ordered keys: +magnitude, or -magnitude if negative,
                    # in 16 bits, so that a vector holds twice the lanes it would in 32
                    lo_key = np.int16(0x7FFF)
                    hi_key = np.int16(-0x7FFF)
                    top = np.int16(0)
                    for j in range(cols):
                        h = raw[i, j]
                        magnitude = np.int16(h & np.uint16(0x7FFF))
                        key = magnitude if h < np.uint16(0x8000) else np.int16(-magnitude)
                        lo_key = min(lo_key, key)
                        hi_key = max(hi_key, key)
                        top = max(top, magnitude)
                    if top >= limit:
                        return NON_FINITE
                    lo_bits = lo_key if lo_key >= 0 else (-lo_key) | 0x8000
                    hi_bits = hi_key if hi_key >= 0 else (-hi_key) | 0x8000
                    big = max(abs(lo_key), abs(hi_key))
                    value = _fp16_value if kind == FP16 else _bf16_value
                    lo, hi, absmax = value(lo_bits), value(hi_bits), value(big)
                if hi == lo:
                    constant += 1
                if symmetric:
                    _symmetric_scale(absmax, half_range, kind, float32_scale, scale, i)
                else:
                    low64 = np.float64(lo)
                    step = (np.float64(hi) - low64) / (np.float64(qmax) - np.float64(qmin))
                    offset = np.rint(np.float64(qmin) - low64 / step)
                    if kind == FLOAT:
                        scale[i] = step
                        zp[i] = offset
                    else:
                        scale[i] = _stored(step, kind)
                        zp[i] = _stored(offset, kind)
                    s, z = scale[i], zp[i]
                    if s == 0 or not np.isfinite(s) or not np.isfinite(z):
                        _symmetric_scale(absmax, half_range, kind, float32_scale, scale, i)
                        zp[i] = 0
            d = scale[i] if scale[i] != 0 else infinity[0]  # w / inf = 0: zero scale, q = 0
            point = zp[i]
            row = block[i % block_rows] if pack else codes[i]
            for j in range(cols):
                if kind == FLOAT:
                    exact = raw[i, j] / d
                    x = exact if symmetric else exact + point
                else:
                    if kind == BF16:
                        w = _bf16_value(raw[i, j])
                    else:
                        w = _fp16_value(raw[i, j])
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
            if pack and (i % block_rows == block_rows - 1 or i == rows - 1):
                start = i - i % block_rows
                done = block[:i + 1 - start].reshape(-1, in_channels)
                pair = (first + start) * cols // in_channels // 2
                if pack == TRANSPOSED:
                    pack_int4_transposed(done, packed, pair, pairs)
                else:
                    pack_int4_rows(done, packed[pair:pair + done.shape[0] // 2])
        return constant

    return span


_BYTE_LANES = np.uint64(0x00FF00FF00FF00FF), np.uint64(8)
_SHORT_LANES = np.uint64(0x0000FFFF0000FFFF), np.uint64(16)
_WORD_LANES = np.uint64(0x00000000FFFFFFFF), np.uint64(32)


@njit(nogil=True, cache=CACHED)
def pack_int4_transposed(codes, out, first, pairs):  # pragma: no cover - compiled
    """int4 codes [rows, in] into columns first.. of qint4x2 [in, out/2]
    (packing.Int4Layout.TRANSPOSED): out[i, first + j] holds codes[2j, i] in its low nibble
    and codes[2j+1, i] in its high one. `pairs` is scratch of at least [rows/2, in].

    The row pairs are packed along the rows first (long vectorised loops),
    then turned 8 x 8 bytes at a time: eight 64-bit loads, three rounds of
    shifts and masks, eight 64-bit stores (where the widths allow; byte by
    byte for the rest). A byte-by-byte turn, even by cache-sized tiles, was
    half of the packing's time. The eight words are locals, which stay in
    registers: kept in an array, the turn took 15-20% longer. Eight rows of
    `out` are finished before the next eight, so each is written in adjacent
    words while its lines are in cache: with the pairs' rows in the outer
    loop, each line of `out` was written in eight visits, twice as long.
    """
    rows, cols = codes.shape
    half = rows // 2
    for p in range(half):
        _pack_pair(codes[2 * p], codes[2 * p + 1], pairs[p])
    done = 0
    if cols % 8 == 0 and out.shape[1] % 8 == 0 and first % 8 == 0:
        wide, turned = pairs[:half].view(np.uint64), out.view(np.uint64)
        done = half - half % 8
        for c in range(cols // 8):  # eight rows of `out` at a time, each in adjacent words
            for p in range(0, done, 8):
                w0, w1, w2, w3 = wide[p, c], wide[p + 1, c], wide[p + 2, c], wide[p + 3, c]
                w4, w5, w6, w7 = wide[p + 4, c], wide[p + 5, c], wide[p + 6, c], wide[p + 7, c]
                w0, w1, w2, w3, w4, w5, w6, w7 = _swapped_pairs(
                    w0, w1, w2, w3, w4, w5, w6, w7, _BYTE_LANES)
                w0, w2, w1, w3, w4, w6, w5, w7 = _swapped_pairs(
                    w0, w2, w1, w3, w4, w6, w5, w7, _SHORT_LANES)
                w0, w4, w1, w5, w2, w6, w3, w7 = _swapped_pairs(
                    w0, w4, w1, w5, w2, w6, w3, w7, _WORD_LANES)
                r, column = 8 * c, (first + p) // 8
                turned[r, column], turned[r + 1, column] = w0, w1
                turned[r + 2, column], turned[r + 3, column] = w2, w3
                turned[r + 4, column], turned[r + 5, column] = w4, w5
                turned[r + 6, column], turned[r + 7, column] = w6, w7
    for c in range(cols):
        row = out[c]
        for p in range(done, half):
            row[first + p] = pairs[p, c]


@njit(nogil=True, cache=CACHED, inline="always")
def _swapped(a, b, lane):  # pragma: no cover - compiled
    """a and b with a's odd lanes and b's even lanes swapped (lanes of lane[1] bits)."""
    mask, shift = lane
    t = ((a >> shift) ^ b) & mask
    return a ^ (t << shift), b ^ t


@njit(nogil=True, cache=CACHED, inline="always")
def _swapped_pairs(a, b, c, d, e, f, g, h, lane):  # pragma: no cover - compiled
    """One round of the 8 x 8 turn: _swapped on (a, b), (c, d), (e, f) and (g, h)."""
    return (_swapped(a, b, lane) + _swapped(c, d, lane) + _swapped(e, f, lane)
            + _swapped(g, h, lane))


@njit(nogil=True, cache=CACHED)
def pack_int4_rows(codes, out):  # pragma: no cover - compiled
    """int4 codes [out, in] into [out/2, in] (packing.Int4Layout.ROWS): row j of `out` holds
    codes[2j] in its low nibbles and codes[2j+1] in its high ones."""
    for p in range(codes.shape[0] // 2):
        _pack_pair(codes[2 * p], codes[2 * p + 1], out[p])


@njit(nogil=True, cache=CACHED, inline="always")
def _pack_pair(even, odd, packed):  # pragma: no cover - compiled
    for c in range(even.shape[0]):
        packed[c] = np.int8((np.uint8(even[c]) & np.uint8(0x0F))
                            | (np.uint8(odd[c]) << np.uint8(4)))
