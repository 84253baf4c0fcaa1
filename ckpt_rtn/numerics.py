"""Float formats the quantizer works in, including bfloat16 without a numpy dtype.

numpy has no bfloat16, so bf16 tensors travel as uint16 bit patterns. The
helpers here turn them into float32 (exact: bf16 is the top half of an
IEEE float32) and round float32 back to bf16 with round-half-to-even, the
rounding every MindSpore cast uses.
"""
from __future__ import annotations

import enum

import numpy as np


class FloatFormat(enum.Enum):
    """A weight's float format; `storage` is the numpy dtype of its raw values."""

    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"
    FLOAT64 = "float64"

    @property
    def storage(self) -> np.dtype:
        return np.dtype(np.uint16) if self is FloatFormat.BFLOAT16 else np.dtype(self.value)

    @property
    def work(self) -> np.dtype:
        """The dtype arithmetic runs in: 16-bit formats are widened to float32."""
        return np.dtype(np.float64) if self is FloatFormat.FLOAT64 else np.dtype(np.float32)


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16) to float32 values, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def round_float32_to_bf16_inplace(values: np.ndarray) -> None:
    """Round float32 values to the nearest bfloat16 (ties to even), in place.

    Adding 0x7FFF plus the lowest kept bit, then clearing the low 16 bits,
    is round-half-to-even on the bit pattern; NaNs are kept NaN.
    """
    bits = values.view(np.uint32)
    nan = np.isnan(values)
    lsb = (bits >> 16) & 1
    bits += np.uint32(0x7FFF)
    bits += lsb
    bits &= np.uint32(0xFFFF0000)
    values[nan] = np.nan


def float32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 values to bfloat16 bit patterns (uint16), round-half-to-even."""
    rounded = np.array(values, dtype=np.float32, copy=True)
    round_float32_to_bf16_inplace(rounded)
    return (rounded.view(np.uint32) >> 16).astype(np.uint16)


def to_work(values: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """Raw stored values to the work dtype (a new array)."""
    if fmt is FloatFormat.BFLOAT16:
        return bf16_to_float32(values)
    return values.astype(fmt.work)


def to_storage(values: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """Work-dtype values to the format's raw stored values, rounding to nearest-even."""
    if fmt is FloatFormat.BFLOAT16:
        return float32_to_bf16(values.astype(np.float32))
    return values.astype(fmt.storage)
