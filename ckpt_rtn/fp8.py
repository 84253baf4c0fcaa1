"""FP8 sources: DeepSeek-V3-style E4M3 weights with 128x128 block scales, dequantized on the fly.

DeepSeek-V3 (and the checkpoints transformers' fine-grained FP8 writes) store
each Linear weight `<p>.weight` as F8_E4M3 codes [out, in] beside
`<p>.weight_scale_inv`, float32 [ceil(out/128), ceil(in/128)]: the weight is
the code's value times the scale of its 128x128 block (the last row and
column of blocks may be partial). DeepSeek-V3's own `fp8_cast_bf16.py`
(`kernel.weight_dequant`) computes `fp8.to(float32) * scale` in float32 and
stores bfloat16; this module does the same, rounding float32 to bfloat16
half-to-even (numerics.py), so its bfloat16 weights are bit for bit what
that script writes. They then go through the chosen scheme as any bfloat16
weight does; an FP8 weight that is not quantized is written as that
bfloat16, never as FP8 without its scales.

The 256 E4M3 codes are decoded through a float32 table indexed by the codes,
built here from the format's definition (OCP FP8 E4M3, "fn": 4 exponent
bits with bias 7, 3 mantissa bits, subnormals at exponent 0, no infinities,
S.1111.111 the only NaN). Every E4M3 value is exact in float32, so the table
is exact; it needs no dependency (ml_dtypes' float8_e4m3fn gives the same
values, which the tests check), and a 256-entry lookup is one vectorised
`take` over the codes, as fast as any cast.

A weight's scales usually sit in its shard, but a sharded directory may put
them in another one (DeepSeek-V3's own has such pairs): `OtherShards` carries
what one shard's conversion needs from the others (directory.py reads them
before the shard is converted: a few kilobytes per weight).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AbstractSet, Dict, Mapping, Optional, Sequence, Set, Tuple

import numpy as np

from . import dtypes
from .errors import FormatError
from .formats.tensor import TensorInfo
from .numerics import round_float32_to_bf16_inplace

#: DeepSeek-V3's quantization_config weight_block_size, and transformers' default.
BLOCK = 128
#: `<p>.weight`'s block scales are `<p>.weight_scale_inv` (fp8_cast_bf16.py's naming).
SCALE_SUFFIX = "_scale_inv"
#: `<p>.weight`'s one scale in NVIDIA's per-tensor FP8 layout, which is not read.
TENSOR_SCALE_SUFFIX = "_scale"
#: The largest E4M3 magnitude, and the largest block scale whose weights all stay finite
#: in bfloat16 (its largest finite value, 3.39e38, over 448).
E4M3_MAX = 448.0
_LARGEST_SCALE = float(np.float32(3.3895313892515355e38 / E4M3_MAX))


def _e4m3_table() -> np.ndarray:
    """The float32 value of each E4M3 (fn) code, from the format's bit fields."""
    codes = np.arange(256)
    exponent, mantissa = (codes >> 3) & 0xF, (codes & 0x7).astype(np.float64)
    magnitude = np.where(exponent == 0, mantissa / 8 * 2.0 ** -6,
                         (1 + mantissa / 8) * np.exp2(exponent - 7.0))
    magnitude[(codes & 0x7F) == 0x7F] = np.nan
    return np.where(codes & 0x80, -magnitude, magnitude).astype(np.float32)


E4M3 = _e4m3_table()
E4M3.flags.writeable = False


def decode(codes: np.ndarray) -> np.ndarray:
    """E4M3 codes (uint8) to their float32 values, exactly."""
    return E4M3.take(codes)


def scale_shape(shape: Tuple[int, ...]) -> Tuple[int, int]:
    """The shape of the block scales of an FP8 weight of `shape` [out, in]."""
    out, inner = shape
    return -(-out // BLOCK), -(-inner // BLOCK)


def scale_problem(scale_inv: np.ndarray) -> Optional[str]:
    """Why block scales would make some of their weight's values infinite or NaN (None if
    they do not): an FP8 weight that is not quantized is written as those values, with
    nothing after to refuse them, as the RTN kernel refuses a weight that holds them."""
    bad = ~(np.abs(scale_inv) <= _LARGEST_SCALE)  # NaN compares false
    if not bad.any():
        return None
    row, col = (int(i) for i in np.argwhere(bad)[0])
    return (f"the scale of block ({row}, {col}) is {scale_inv[row, col]!s}: its weights "
            f"could be infinite or NaN in bfloat16 (a scale is at most {_LARGEST_SCALE:.4g})")


def dequantize_bf16(codes: np.ndarray, scale_inv: np.ndarray) -> np.ndarray:
    """An FP8 weight [out, in] and its block scales as bfloat16 bit patterns (uint16).

    One band of BLOCK rows at a time: each band's float32 values (the codes
    decoded, times their block's scale repeated along the row) are rounded
    to bfloat16 in place, so no float32 copy of the whole weight is held.
    """
    out, inner = codes.shape
    result = np.empty((out, inner), dtype=np.uint16)
    for band, start in enumerate(range(0, out, BLOCK)):
        values = decode(codes[start:start + BLOCK])
        values *= np.repeat(scale_inv[band], BLOCK)[:inner]
        round_float32_to_bf16_inplace(values)
        result[start:start + BLOCK] = values.view(np.uint32) >> 16
    return result


@dataclass(frozen=True)
class OtherShards:
    """What one shard's FP8 weights and block scales have in a directory's other shards."""

    #: Block scales of this shard's FP8 weights that lie in another shard, by name.
    scales: Mapping[str, Tuple[TensorInfo, np.ndarray]] = field(default_factory=dict)
    #: This shard's block scales whose weights lie in another shard (consumed there).
    taken: AbstractSet[str] = frozenset()


NONE = OtherShards()


def pair_scales(tensors: Sequence[TensorInfo], path: str,
                others: OtherShards = NONE) -> Tuple[Dict[str, TensorInfo], Set[str]]:
    """Each FP8 weight's block scales (by weight name), checked against its shape, and the
    names of this file's scale tensors that are consumed rather than written.

    An FP8 weight without its scales cannot be read, and scales without
    their FP8 weight would be written beside a weight they no longer
    describe: both are refused.
    """
    by_name = {t.name: t for t in tensors}
    pairs: Dict[str, TensorInfo] = {}
    for info in tensors:
        if info.dtype is not dtypes.FLOAT8_E4M3:
            continue
        if info.name + TENSOR_SCALE_SUFFIX in by_name:
            raise FormatError(path, f"tensor {info.name!r} is FP8 with a per-tensor scale "
                              f"{info.name + TENSOR_SCALE_SUFFIX!r} (NVIDIA's layout), which "
                              "ckpt-rtn does not read: it reads DeepSeek-V3-style FP8 with "
                              "128x128 weight_scale_inv blocks")
        name = info.name + SCALE_SUFFIX
        scale = by_name.get(name) or (others.scales[name][0] if name in others.scales else None)
        if scale is None:
            raise FormatError(path, f"tensor {info.name!r} is FP8 (F8_E4M3) but has no block "
                              f"scales {name!r} beside it: it cannot be dequantized (ckpt-rtn "
                              "reads DeepSeek-V3-style FP8 with 128x128 weight_scale_inv blocks)")
        if len(info.shape) != 2:
            raise FormatError(path, f"tensor {info.name!r} is FP8 with shape {list(info.shape)}; "
                              "block scales describe 2-D [out, in] weights only")
        expected = scale_shape(info.shape)  # type: ignore[arg-type]
        if scale.dtype is not dtypes.FLOAT32 or scale.shape != expected:
            raise FormatError(path, f"tensor {name!r} is {scale.dtype} {list(scale.shape)}; the "
                              f"block scales of FP8 {list(info.shape)} are Float32 "
                              f"{list(expected)} (one per {BLOCK}x{BLOCK} block)")
        pairs[info.name] = scale
    consumed = {scale.name for scale in pairs.values()} | set(others.taken)
    for info in tensors:
        if info.name.endswith(SCALE_SUFFIX) and info.name not in consumed:
            weight = info.name[:-len(SCALE_SUFFIX)]
            found = by_name.get(weight)
            if found is not None and found.dtype.name.lower() == dtypes.FLOAT8_E4M3.name.lower():
                raise FormatError(path, f"tensor {weight!r} is {found.dtype} in a .ckpt, which "
                                  "ckpt-rtn reads as bytes: it dequantizes FP8 weights from "
                                  "safetensors (F8_E4M3) only")
            raise FormatError(path, f"tensor {info.name!r} holds block scales, but {weight!r} is "
                              "not an FP8 weight in this checkpoint")
    return pairs, consumed & set(by_name)
