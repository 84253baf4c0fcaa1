"""Round-to-nearest weight quantization (int8/int4, per channel or group), bit-compatible
with Golden Stick.

Golden Stick's RoundToNearest (v0.5.0 defaults: int8, per output channel,
symmetric, full range) computes for a weight W laid out [out, in]:

    a[o]      = max_i |W[o, i]|
    scale[o]  = fp16(2 * a[o] / 255)             (float32 arithmetic)
    q[o, i]   = clamp(round_half_even(fp16(W[o, i] / scale[o])), -128, 127)
    zp_neg[o] = 0

and dequantizes at run time as (q + zp_neg) * scale. Two degenerate cases
follow its code: if *every* row is constant (max == min) the scale is 1 for
all rows; a row whose scale is 0 (an all-zero row, or one so small its scale
underflows) gets q = 0, so it dequantizes to exactly 0 instead of NaN codes.

Golden Stick's PTQ framework (v1.0+) can also quantize asymmetrically
(`weight_symmetric=False`, which its AWQ W4 recipe sets), with the same
cal_quantization_params it uses for the symmetric case:

    scale[o]  = (max_i W[o, i] - min_i W[o, i]) / (qmax - qmin)     (float64)
    zp[o]     = round_half_even(qmin - min_i W[o, i] / scale[o])   (float64)
    q[o, i]   = clamp(round_half_even(fp16(fp16(W[o, i] / scale16[o]) + zp16[o])), qmin, qmax)
    zp_neg[o] = -zp16[o]

so that (q + zp_neg) * scale spans the row's own [min, max] (give or take a
code at either end, from rounding zp). Rows whose range is too small for a
scale in the weight's format (a constant row, say: Golden Stick divides by
zero there), rows whose range overflows it (a float64 row spanning more than
float64's range) and rows whose zero point overflows the format are
quantized symmetrically instead.

Float16 weights reproduce Golden Stick bit for bit. For bfloat16, float32
and float64 weights the scale is stored in the weight's own dtype (what
Golden Stick does for a bf16 network, whose compute dtype is bf16), and is
the correctly rounded value of a/127.5 computed in float64 (as Golden Stick
v1.0+ does), so huge float32 weights cannot overflow it.

Speed: numpy's float16 arithmetic and casts are scalar loops, so the kernel
never touches a float16 array. It widens fp16/bf16 bit patterns to float32
with integer shifts, divides in float32, and rounds the quotient to the
weight's precision with integer round-half-to-even on the bit pattern:
the same bits as dividing in fp16/bf16, because float32 has at least 2p+2
significand bits (24 >= 2*11+2: double rounding is innocuous for division). Rows are
independent, so the work runs in cache-sized blocks of rows, on several
threads when given a pool (numpy releases the GIL), with identical output.

Those steps are the reference; where numba is installed, kernels.py does the
same arithmetic in one compiled pass per row, several times faster, with the
same bits (`kernel_name()` says which runs; CKPT_RTN_KERNEL=numpy picks the
reference).
"""
from __future__ import annotations

import functools
import os
from concurrent.futures import Executor
from dataclasses import dataclass
from types import ModuleType
from typing import List, Optional, Tuple

import numpy as np

from .buffers import BufferPool, empty
from .numerics import FloatFormat, to_storage, to_work
from .packing import Int4Layout, pack_codes


@dataclass(frozen=True)
class RtnSpec:
    """Integer width, grouping and symmetry of one RTN variant.

    `group_size` 0 means one scale per output channel; otherwise one per
    `group_size` consecutive input channels of a row (Golden Stick PTQ's
    per-group mode). `float64_scale` computes the scale in float64, as the
    PTQ framework (v1.0+) does, instead of the legacy class's float32.
    `symmetric` False gives each row a zero point too; only the PTQ
    framework's arithmetic exists for that (the legacy class's asymmetric
    path is broken: it clamps to the unsigned range), so it needs
    `float64_scale`.
    """

    bits: int = 8
    group_size: int = 0
    float64_scale: bool = False
    symmetric: bool = True

    def __post_init__(self) -> None:
        if not self.symmetric and not self.float64_scale:
            raise ValueError("asymmetric RTN follows Golden Stick's PTQ framework: "
                             "it needs float64_scale")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    @property
    def half_range(self) -> float:
        """(qmax - qmin) / 2: 2*a/255 == a/127.5 exactly, and 127.5 (or 7.5) is exact
        in binary, so one division rounds the same without 2*a overflowing."""
        return (self.qmax - self.qmin) / 2


#: Golden Stick v0.5.0 RoundToNearest defaults: int8, per channel, float32 scale.
W8 = RtnSpec()
#: Elements per block of rows: a 4 MiB float32 buffer (128 rows of an 8192-wide
#: weight, 16384 groups of 64), small enough for a core's cache share.
BLOCK_ELEMENTS = 1 << 20
#: Row spans a weight is cut into for a thread pool (several per core).
_POOL_SPANS = 16
#: fp16 bits shifted into a float32's place are off by 2^112 in exponent.
_FP16_EXPONENT_FIX = np.float32(2.0 ** 112)
#: Every finite fp16 is below 2^16; inf/NaN bit patterns widen to >= 2^16.
_FP16_LIMIT = 65536.0
#: Mantissa bits of the 16-bit formats, whose quotients are rounded on their bit patterns.
_MANTISSA_BITS = {FloatFormat.FLOAT16: 10, FloatFormat.BFLOAT16: 7}


@functools.lru_cache(maxsize=None)
def compiled_kernels() -> Optional[ModuleType]:
    """kernels.py where numba imports and compiles (CKPT_RTN_KERNEL is not 'numpy', nor
    NUMBA_DISABLE_JIT set), else None."""
    if os.environ.get("CKPT_RTN_KERNEL") == "numpy":
        return None
    try:
        from . import kernels
    except ImportError:
        return None
    return kernels if kernels.COMPILED else None


def kernel_name() -> str:
    """The RTN kernel conversions run: 'numba' (compiled) or 'numpy' (the reference)."""
    return "numpy" if compiled_kernels() is None else "numba"


def kernels_cached() -> bool:
    """False where the compiled kernels run but numba cannot cache them on disk, so that
    every process compiles them again (kernels.CACHED)."""
    kernels = compiled_kernels()
    return kernels is None or kernels.CACHED


@dataclass(frozen=True)
class ErrorStats:
    """How far the dequantized weight (q + zp_neg) * scale is from the original.

    `relative` is the Frobenius norm of the error over that of the weight.
    Measured in float32 arithmetic as the weight is quantized, so the report
    costs no second pass over the data.
    """

    max_abs: float
    mean_abs: float
    relative: float


@dataclass(frozen=True)
class RtnWeights:
    """Integer codes, scale and negated zero point of one quantized weight.

    `q` holds the codes (int8 storage, [out, in], or int4 pairs packed in the
    layout quantize_rtn was asked for); `scale` and `zp_neg` hold
    raw values of the weight's float format (uint16 bit patterns for
    bfloat16), shaped [out] per channel or [out, in / group_size] per group
    ([in / group_size, out] if quantize_rtn was asked for `groups_first`);
    `stats` is set when asked for.
    """

    q: np.ndarray
    scale: np.ndarray
    zp_neg: np.ndarray
    stats: Optional[ErrorStats] = None


class _RowErrors:
    """Per-row error sums, filled block by block (by several threads at once)."""

    def __init__(self, rows: int) -> None:
        self.max_abs = np.zeros(rows)
        self.sum_abs = np.zeros(rows)
        self.sum_sq = np.zeros(rows)
        self.weight_sq = np.zeros(rows)

    def summary(self, count: int) -> ErrorStats:
        weight_norm = float(np.sqrt(self.weight_sq.sum()))
        error_norm = float(np.sqrt(self.sum_sq.sum()))
        return ErrorStats(max_abs=float(self.max_abs.max(initial=0.0)),
                          mean_abs=float(self.sum_abs.sum() / count) if count else 0.0,
                          relative=error_norm / weight_norm if weight_norm else 0.0)


class NonFiniteWeightError(ValueError):
    """The weight holds inf or NaN: no finite scale exists."""


RowBounds = Tuple[np.ndarray, np.ndarray]
"""(min, max) of each row of a weight, in the work dtype."""


def quantize_rtn(weight: np.ndarray, fmt: FloatFormat, spec: RtnSpec = W8, *,
                 pool: Optional[Executor] = None, stats: bool = False,
                 bounds: Optional[RowBounds] = None,
                 block_rows: Optional[int] = None,
                 buffers: Optional[BufferPool] = None,
                 int4: Optional[Int4Layout] = None, groups_first: bool = False) -> RtnWeights:
    """Quantize a 2-D [out, in] weight of raw `fmt` values per output channel (or group).

    With a thread `pool`, row spans are quantized concurrently; the result
    does not depend on the pool. `stats` also measures the error. `bounds`
    gives each output channel's (min, max) instead of this weight's own: for
    a slice of a weight split along its input channels, the whole weight's
    (see `row_bounds`), so every slice gets the scale the whole would.
    `block_rows` overrides the rows quantized at a time by numpy, and the unit
    of the threads' spans and of int4 packing (BLOCK_ELEMENTS' worth).
    The codes' array comes from `buffers` when given.

    With `int4` (4-bit specs), q is the codes packed two per byte in that
    layout. The compiled kernels pack each block of rows while its codes are
    still in cache, on the thread that quantized it, so no [out, in] array of
    codes is made: packing one afterwards, on one thread, took 40% of W4's
    quantizing time.

    With `groups_first` (and a `group_size`), scale and zp_neg are laid out
    [in / group_size, out] instead of [out, in / group_size]. Each thread
    rounds its own rows' scales and zero points to the stored format and
    places them so as it finishes them: done afterwards, on one thread, the
    rounding and the transposition of a W4 weight's 64 groups per row took
    15 ms of its 165, while the other threads waited.
    """
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {weight.shape}")
    if weight.dtype != fmt.storage:
        raise ValueError(f"{fmt.value} weight must be stored as {fmt.storage}, got {weight.dtype}")
    out_channels, in_channels = weight.shape
    if not weight.size:
        raise ValueError(f"a weight of shape {weight.shape} has nothing to quantize")
    if int4 is not None and (spec.bits != 4 or out_channels % 2):
        raise ValueError(f"{out_channels} output channels of {spec.bits}-bit codes cannot be "
                         "packed two int4 codes per byte")
    weight = np.ascontiguousarray(weight)
    if spec.group_size:
        if in_channels % spec.group_size:
            raise ValueError(f"{in_channels} input channels do not split into groups of "
                             f"{spec.group_size}")
        # Each group of consecutive input channels becomes a row of its own.
        weight = weight.reshape(-1, spec.group_size)
    rows, cols = weight.shape
    block_rows = block_rows or _block_rows(cols)
    packs = int4 is not None and compiled_kernels() is not None
    per_channel = rows // out_channels  # rows of one output channel: its groups
    groups_first = groups_first and bool(spec.group_size)
    if int4 is not None:  # every block holds whole output rows, a multiple of 16: it packs
        # on its own, by 8 x 8 bytes (kernels.pack_int4_transposed)
        block_rows = -(-block_rows // (16 * per_channel)) * 16 * per_channel
    elif groups_first:  # every span holds whole output rows, whose groups it places
        block_rows = -(-block_rows // per_channel) * per_channel
    q = empty(int4.shape(out_channels, in_channels) if packs else weight.shape, np.int8,
              buffers)
    params = _Params(np.empty(rows, dtype=fmt.work), np.zeros(rows, dtype=fmt.work))
    errors = _RowErrors(rows) if stats else None
    if bounds is not None:
        low, high = bounds
        if spec.group_size or low.shape != (rows,) or high.shape != (rows,):
            raise ValueError(f"bounds must give one (min, max) per output channel ({rows})")
        if not (np.isfinite(low).all() and np.isfinite(high).all()):
            raise NonFiniteWeightError("weight contains inf or NaN values")
        params.fill(slice(None), low, high, fmt, spec)
        if (low == high).all():  # the whole weight's channels: as below
            params.scale[:], params.zp[:] = 1, 0
    codes = _Codes(q, int4 if packs else None, in_channels)
    stored = _Stored.empty(out_channels, per_channel, fmt, groups_first)

    def quantize_span(span: Tuple[int, int], fixed: bool) -> int:
        constant = _quantize_rows(weight, fmt, spec, span, block_rows, codes, params, fixed,
                                  errors)
        stored.fill(span, params, fmt)
        return constant

    spans = _spans(rows, block_rows, pool)
    constant = _run(pool, spans, lambda span: quantize_span(span, bounds is not None))
    if bounds is None and sum(constant) == rows:
        # Golden Stick: when max == min in every channel, scale = 1 (and zp = 0) everywhere.
        params.scale[:], params.zp[:] = 1, 0
        _run(pool, spans, lambda span: quantize_span(span, True))
    if int4 is not None and not packs:
        unpacked, q = q, pack_codes(q.reshape(out_channels, in_channels), int4, buffers)
        if buffers is not None:
            buffers.give([unpacked])
    scale, zp_neg = stored.scale, stored.zp_neg
    if not spec.group_size:
        scale, zp_neg = scale.reshape(-1), zp_neg.reshape(-1)
    return RtnWeights(q=q if int4 is not None else q.reshape(out_channels, in_channels),
                      scale=scale, zp_neg=zp_neg,
                      stats=errors.summary(weight.size) if errors is not None else None)


@dataclass(frozen=True)
class _Stored:
    """A weight's scale and zp_neg as stored: raw values of its format, [out, groups], or
    [groups, out] (`groups_first`), filled a span of whole output rows at a time."""

    scale: np.ndarray
    zp_neg: np.ndarray
    groups_first: bool

    @classmethod
    def empty(cls, out_channels: int, groups: int, fmt: FloatFormat,
              groups_first: bool) -> "_Stored":
        shape = (groups, out_channels) if groups_first else (out_channels, groups)
        return cls(np.empty(shape, fmt.storage), np.empty(shape, fmt.storage), groups_first)

    def fill(self, span: Tuple[int, int], params: _Params, fmt: FloatFormat) -> None:
        """Store rows [start, stop)'s scales and zero points, rounded to `fmt` (exact: they
        are already values of it)."""
        start, stop = span
        scale = to_storage(params.scale[start:stop], fmt)
        # 0 - zp, not -zp: a symmetric zero point is stored as +0.0, as the legacy class does.
        zp_neg = to_storage(np.subtract(0, params.zp[start:stop]), fmt)
        if self.groups_first:
            groups = self.scale.shape[0]
            channels = slice(start // groups, stop // groups)
            self.scale[:, channels] = scale.reshape(-1, groups).T
            self.zp_neg[:, channels] = zp_neg.reshape(-1, groups).T
        else:
            self.scale.reshape(-1)[start:stop] = scale
            self.zp_neg.reshape(-1)[start:stop] = zp_neg


@dataclass(frozen=True)
class _Codes:
    """Where the codes of a weight's rows go: `array` [rows, cols] itself, or, with
    `int4`, `array` packed in that layout, a block of whole output rows (a multiple of 16)
    at a time (by the compiled kernels)."""

    array: np.ndarray
    int4: Optional[Int4Layout]
    in_channels: int


@dataclass(frozen=True)
class _Params:
    """Per-row scale and zero point, already rounded to the weight's format, in the
    work dtype (zp stays 0 for symmetric RTN)."""

    scale: np.ndarray
    zp: np.ndarray

    def fill(self, rows: slice, low: np.ndarray, high: np.ndarray, fmt: FloatFormat,
             spec: RtnSpec) -> None:
        if spec.symmetric:
            self.scale[rows] = _symmetric_scale(np.maximum(np.abs(low), np.abs(high)), fmt, spec)
            return
        low64 = low.astype(np.float64)
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            # A float64 row spanning more than float64's range overflows here: inf.
            exact = (high.astype(np.float64) - low64) / (spec.qmax - spec.qmin)
            zp = to_work(to_storage(np.rint(spec.qmin - low64 / exact), fmt), fmt)
            scale = to_work(to_storage(exact, fmt), fmt)
        symmetric = (scale == 0) | ~np.isfinite(scale) | ~np.isfinite(zp)
        if symmetric.any():
            absmax = np.maximum(np.abs(low[symmetric]), np.abs(high[symmetric]))
            scale[symmetric] = _symmetric_scale(absmax, fmt, spec)
            zp[symmetric] = 0
        self.scale[rows], self.zp[rows] = scale, zp


def _spans(rows: int, block_rows: int, pool: Optional[Executor]) -> List[Tuple[int, int]]:
    """Row ranges: one without a pool, else enough that uneven progress evens out."""
    parts = 1 if pool is None else _POOL_SPANS
    step = max(block_rows, -(-rows // parts // block_rows) * block_rows)
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def _run(pool: Optional[Executor], spans: List[Tuple[int, int]], fn) -> List[int]:
    if pool is None or len(spans) == 1:
        return [fn(span) for span in spans]
    return list(pool.map(fn, spans))


def _quantize_rows(weight: np.ndarray, fmt: FloatFormat, spec: RtnSpec, span: Tuple[int, int],
                   block_rows: int, codes: _Codes, params: _Params, fixed: bool,
                   errors: Optional[_RowErrors]) -> int:
    """Quantize rows [start, stop) into q and params; returns how many rows are constant.

    With `fixed`, the scales and zero points already in `params` are used
    instead of each row's own; with `errors`, the rows' error sums are
    recorded there.
    """
    kernels = compiled_kernels()
    if kernels is not None:
        return _quantize_rows_compiled(kernels, weight, fmt, spec, span, block_rows, codes,
                                       params, fixed, errors)
    q = codes.array
    start, stop = span
    cols = weight.shape[1]
    work = np.empty((min(block_rows, stop - start), cols), dtype=fmt.work)
    bits = work.view(np.uint32) if fmt.work.itemsize == 4 else None
    spare = np.empty_like(bits) if bits is not None else None
    exact = np.empty_like(work) if errors is not None else None
    mantissa_bits = _MANTISSA_BITS.get(fmt)
    constant = 0
    for first in range(start, stop, block_rows):
        last = min(first + block_rows, stop)
        rows = slice(first, last)
        block = work[:last - first]
        _load(weight[rows], fmt, block)
        if not fixed:
            high, low = block.max(axis=1), block.min(axis=1)
            limit = _FP16_LIMIT if fmt is FloatFormat.FLOAT16 else np.inf
            if not (np.all(np.abs(high) < limit) and np.all(np.abs(low) < limit)):
                raise NonFiniteWeightError("weight contains inf or NaN values")
            constant += int(np.count_nonzero(high == low))
            params.fill(rows, low, high, fmt, spec)
        row_scale, row_zp = params.scale[rows], params.zp[rows, None]
        divisor = np.where(row_scale == 0, np.inf, row_scale)  # w / inf = 0: zero scale, q = 0
        np.divide(block, divisor[:, None], out=block)
        if exact is not None:
            np.copyto(exact[:last - first], block)
        if mantissa_bits is not None:
            _round_bits(bits[:last - first], spare[:last - first], mantissa_bits)
        if not spec.symmetric:  # the zero point is added in the weight's format too
            np.add(block, row_zp, out=block)
            if mantissa_bits is not None:
                _round_bits(bits[:last - first], spare[:last - first], mantissa_bits)
        np.rint(block, out=block)
        np.minimum(block, spec.qmax, out=block)
        np.maximum(block, spec.qmin, out=block)
        np.copyto(q[rows], block, casting="unsafe")
        if errors is not None:
            _record_errors(errors, rows, block, row_zp, exact[:last - first], row_scale)
    return constant


def _quantize_rows_compiled(kernels: ModuleType, weight: np.ndarray, fmt: FloatFormat,
                            spec: RtnSpec, span: Tuple[int, int], block_rows: int,
                            codes: _Codes, params: _Params, fixed: bool,
                            errors: Optional[_RowErrors]) -> int:
    """_quantize_rows by the compiled kernel: the same bits, the whole span in one call
    that releases the GIL (kernels.span_kernel: bounds, scale and zero point, codes, error
    sums and int4 packing, row by row)."""
    start, stop = span
    raw = weight[start:stop]
    if fmt in _MANTISSA_BITS:
        raw = raw.view(np.uint16)
    kind = {FloatFormat.FLOAT16: kernels.FP16, FloatFormat.BFLOAT16: kernels.BF16}.get(
        fmt, kernels.FLOAT)
    pack = {None: kernels.UNPACKED, Int4Layout.TRANSPOSED: kernels.TRANSPOSED,
            Int4Layout.ROWS: kernels.ROWS}[codes.int4]
    legacy = fmt is FloatFormat.FLOAT16 and not spec.float64_scale
    kernel = kernels.span_kernel(kind, spec.symmetric, errors is not None, fixed, legacy, pack)
    stats = np.empty((stop - start if errors is not None else 0, 4))
    nothing = np.empty((0, 0), dtype=np.int8)
    work = fmt.work.type
    result = kernel(raw, work(spec.qmin), work(spec.qmax), params.scale[start:stop],
                    params.zp[start:stop], nothing if pack else codes.array[start:stop],
                    codes.array if pack else nothing, start, codes.in_channels, block_rows,
                    stats)
    if result == kernels.NON_FINITE:
        raise NonFiniteWeightError("weight contains inf or NaN values")
    if errors is not None:
        s = np.abs(params.scale[start:stop].astype(np.float64))
        errors.max_abs[start:stop] = stats[:, 0] * s
        errors.sum_abs[start:stop] = stats[:, 1] * s
        errors.sum_sq[start:stop] = stats[:, 2] * s * s
        errors.weight_sq[start:stop] = stats[:, 3] * s * s
    return result


def _record_errors(errors: _RowErrors, rows: slice, q: np.ndarray, zp: np.ndarray,
                   exact: np.ndarray, row_scale: np.ndarray) -> None:
    """Error sums of rows whose codes are `q` (zero points `zp`) and exact quotients
    `exact` (w / scale).

    |(q - zp)*s - w| = s * |q - zp - w/s|: measured on the quotients, scaled per row.
    """
    s = np.abs(row_scale.astype(np.float64))
    errors.weight_sq[rows] = np.einsum("ij,ij->i", exact, exact) * s * s
    np.subtract(exact, q, out=exact)
    np.add(exact, zp, out=exact)  # the error's negative: same squares and magnitudes
    errors.sum_sq[rows] = np.einsum("ij,ij->i", exact, exact) * s * s
    np.abs(exact, out=exact)
    errors.max_abs[rows] = exact.max(axis=1) * s
    errors.sum_abs[rows] = exact.sum(axis=1) * s


def _load(raw: np.ndarray, fmt: FloatFormat, out: np.ndarray) -> None:
    """Raw stored values into `out` (work dtype) without numpy's slow fp16 casts."""
    if fmt is FloatFormat.FLOAT16:
        # sign to bit 31, exponent+mantissa to bits 27..13, then fix the exponent bias.
        ints = out.view(np.int32)
        np.copyto(ints, raw.view(np.uint16), casting="unsafe")
        np.left_shift(ints, 16, out=ints)
        np.right_shift(ints, 3, out=ints)  # arithmetic: copies the sign into bits 30..28
        np.bitwise_and(ints, np.int32(-0x70000001), out=ints)  # 0x8FFFFFFF: clear them
        np.multiply(out, _FP16_EXPONENT_FIX, out=out)  # exact, subnormals included
    elif fmt is FloatFormat.BFLOAT16:
        ints = out.view(np.uint32)
        np.copyto(ints, raw, casting="unsafe")
        np.left_shift(ints, 16, out=ints)
    else:
        np.copyto(out, raw)


def _round_bits(bits: np.ndarray, spare: np.ndarray, mantissa_bits: int) -> None:
    """Round float32 values (as uint32 bits) to `mantissa_bits`, half to even, in place.

    Quotients below the narrow format's normal range round on a finer grid
    than it would, but all of them are far below 0.5, so rint gives 0 either
    way; quotients above its range stay finite instead of becoming inf and
    are clamped all the same. Sums with a zero point are exact in float32
    before this rounding (24 >= 2p + 2 bits again), so they round as if
    added in the narrow format.
    """
    drop = 23 - mantissa_bits
    np.right_shift(bits, drop, out=spare)
    np.bitwise_and(spare, 1, out=spare)
    np.add(spare, (1 << (drop - 1)) - 1, out=spare)
    np.add(bits, spare, out=bits)
    np.bitwise_and(bits, np.uint32((0xFFFFFFFF >> drop) << drop), out=bits)


def row_bounds(weight: np.ndarray, fmt: FloatFormat) -> RowBounds:
    """(min, max) of each row of a [out, in] weight of raw `fmt` values, in the work dtype."""
    low = np.zeros(weight.shape[0], dtype=fmt.work)
    high = np.zeros(weight.shape[0], dtype=fmt.work)
    step = _block_rows(weight.shape[1])
    for start in range(0, weight.shape[0], step):
        block = to_work(weight[start:start + step], fmt)
        low[start:start + step] = block.min(axis=1, initial=np.inf)
        high[start:start + step] = block.max(axis=1, initial=-np.inf)
    return low, high


def _block_rows(cols: int) -> int:
    return max(1, BLOCK_ELEMENTS // max(cols, 1))


def _symmetric_scale(absmax: np.ndarray, fmt: FloatFormat, spec: RtnSpec) -> np.ndarray:
    """Per-row 2*a/(qmax - qmin), rounded to `fmt`, in the work dtype: float32
    arithmetic for the legacy class's fp16 scale, float64 otherwise."""
    if fmt is FloatFormat.FLOAT16 and not spec.float64_scale:
        raw = (absmax.astype(np.float32) / np.float32(spec.half_range)).astype(np.float16)
    else:
        raw = to_storage(absmax.astype(np.float64) / spec.half_range, fmt)
    return to_work(raw, fmt)


def dequantize_rtn(weights: RtnWeights, fmt: FloatFormat) -> np.ndarray:
    """(q + zp_neg) * scale in the work dtype, [out, in]: what the deployed network computes."""
    scale, zp_neg = to_work(weights.scale, fmt), to_work(weights.zp_neg, fmt)
    out_channels, in_channels = weights.q.shape
    groups = scale.reshape(out_channels, -1).shape[1]
    q = weights.q.astype(fmt.work).reshape(out_channels, groups, -1)
    return ((q + zp_neg.reshape(out_channels, groups, 1))
            * scale.reshape(out_channels, groups, 1)).reshape(out_channels, in_channels)
