"""Round-to-nearest W8A16 weight quantization, bit-compatible with Golden Stick.

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

Float16 weights reproduce Golden Stick bit for bit. For bfloat16, float32
and float64 weights the scale is stored in the weight's own dtype (what
Golden Stick does for a bf16 network, whose compute dtype is bf16), and is
the correctly rounded value of a/127.5 computed in float64 (as Golden Stick
v1.0+ does), so huge float32 weights cannot overflow it.

Rows are independent, so the work is done in blocks of rows: temporaries
stay a few MB whatever the tensor's size.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .numerics import FloatFormat, round_to_format_inplace, to_storage, to_work

QMIN, QMAX = -128, 127
#: 2 * a / 255 == a / 127.5 exactly in real numbers, and 127.5 is exact in
#: binary, so one division gives the same rounding without 2*a overflowing.
HALF_RANGE = (QMAX - QMIN) / 2
#: Rows per block: 256 rows of a 8192-wide fp32 work buffer is 8 MiB.
BLOCK_ROWS = 256


@dataclass(frozen=True)
class W8Weights:
    """Golden Stick's three tensors for one quantized Linear.

    `scale` and `zp_neg` hold raw values of the weight's float format
    (uint16 bit patterns for bfloat16).
    """

    q: np.ndarray
    scale: np.ndarray
    zp_neg: np.ndarray


class NonFiniteWeightError(ValueError):
    """The weight holds inf or NaN: no finite scale exists."""


def quantize_w8(weight: np.ndarray, fmt: FloatFormat, *, block_rows: int = BLOCK_ROWS) -> W8Weights:
    """Quantize a 2-D [out, in] weight of raw `fmt` values per output channel."""
    if weight.ndim != 2:
        raise ValueError(f"expected a 2-D [out, in] weight, got shape {weight.shape}")
    if weight.dtype != fmt.storage:
        raise ValueError(f"{fmt.value} weight must be stored as {fmt.storage}, got {weight.dtype}")
    rows = weight.shape[0]
    q = np.empty(weight.shape, dtype=np.int8)
    scale = np.empty(rows, dtype=fmt.work)
    constant_rows = 0
    for start in range(0, rows, block_rows):
        block = to_work(weight[start:start + block_rows], fmt)
        high, low = block.max(axis=1), block.min(axis=1)
        if not (np.isfinite(high).all() and np.isfinite(low).all()):
            raise NonFiniteWeightError("weight contains inf or NaN values")
        constant_rows += int(np.count_nonzero(high == low))
        absmax = np.maximum(np.abs(high), np.abs(low))
        scale[start:start + block_rows] = _scale_from_absmax(absmax, fmt)
        _quantize_block(block, scale[start:start + block_rows], fmt, q[start:start + block_rows])
    if rows and constant_rows == rows and weight.shape[1]:
        # Golden Stick: when max == min in every channel, scale = 1 everywhere.
        scale[:] = 1
        for start in range(0, rows, block_rows):
            block = to_work(weight[start:start + block_rows], fmt)
            _quantize_block(block, scale[start:start + block_rows], fmt, q[start:start + block_rows])
    stored = to_storage(scale, fmt)
    return W8Weights(q=q, scale=stored, zp_neg=np.zeros_like(stored))


def _scale_from_absmax(absmax: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """Per-row scale, already rounded to `fmt`, returned in the work dtype."""
    if fmt is FloatFormat.FLOAT16:
        raw = (absmax.astype(np.float32) / np.float32(HALF_RANGE)).astype(np.float16)
    else:
        raw = to_storage(absmax.astype(np.float64) / HALF_RANGE, fmt)
    return to_work(raw, fmt)


def _quantize_block(block: np.ndarray, scale: np.ndarray, fmt: FloatFormat, out: np.ndarray) -> None:
    """q = clamp(rne(round_to_fmt(block / scale))) into `out`; `block` is overwritten."""
    divisor = np.where(scale == 0, np.inf, scale)  # w / inf = 0: a zero scale gives q = 0
    np.divide(block, divisor[:, None], out=block)
    round_to_format_inplace(block, fmt)
    np.rint(block, out=block)
    np.clip(block, QMIN, QMAX, out=block)
    out[...] = block


def dequantize_w8(w8: W8Weights, fmt: FloatFormat) -> np.ndarray:
    """(q + zp_neg) * scale in the work dtype: what the deployed network computes."""
    scale = to_work(w8.scale, fmt)
    zp_neg = to_work(w8.zp_neg, fmt)
    return (w8.q.astype(fmt.work) + zp_neg[:, None]) * scale[:, None]
