"""How integer codes are laid out for storage: int4 pairs in a byte, and matrices turned.

Golden Stick and MindFormers store int4 codes two to a byte (qint4x2), in
two's complement, the even element in the low nibble; which two elements
share a byte depends on the network that loads them (`Int4Layout`). The
RTN math (rtn.py) packs as it quantizes, block by block, through these
layouts; the functions here are the reference it is checked against, and
what the deploy side and tests unpack with.
"""
from __future__ import annotations

import enum
from typing import Optional, Tuple

import numpy as np

from .buffers import BufferPool, empty


class Int4Layout(enum.Enum):
    """Which int4 codes of an [out, in] weight share a byte, and the packed matrix's shape."""

    #: qint4x2 [in, out/2]: output rows 2j and 2j+1 share a byte, then transposed; what
    #: Golden Stick PTQ's w4a16 stores and WeightQuantBatchMatmul reads.
    TRANSPOSED = "transposed"
    #: [out/2, in]: output rows 2j and 2j+1 share a byte, untransposed; MindFormers' A8W4
    #: expert weights (w4a8-dynamic) as Hugging Face names store them.
    ROWS = "rows"

    def shape(self, out_channels: int, in_channels: int) -> Tuple[int, int]:
        """The packed matrix's shape for [out, in] codes."""
        if self is Int4Layout.TRANSPOSED:
            return in_channels, out_channels // 2
        return out_channels // 2, in_channels


def pack_int4(codes: np.ndarray, axis: int = -1) -> np.ndarray:
    """int4 codes (int8 values in [-8, 7]) to bytes holding two, along `axis`.

    Element 2j goes to the low nibble and 2j+1 to the high nibble, in
    two's complement: Golden Stick's np_int4data_pack_to_int8 (last axis).
    """
    raw = np.moveaxis(codes.view(np.uint8), axis, -1)
    packed = raw[..., 0::2] & np.uint8(0x0F)
    packed |= raw[..., 1::2] << np.uint8(4)
    return np.moveaxis(packed, -1, axis).view(np.int8)


def unpack_int4(packed: np.ndarray) -> np.ndarray:
    """The inverse of `pack_int4`: int8 codes in [-8, 7], last axis doubled."""
    raw = packed.view(np.uint8)
    low = (raw & np.uint8(0x0F)).astype(np.int8)
    high = (raw >> np.uint8(4)).astype(np.int8)
    codes = np.empty(raw.shape[:-1] + (raw.shape[-1] * 2,), dtype=np.int8)
    codes[..., 0::2], codes[..., 1::2] = low, high
    return np.where(codes > 7, codes - 16, codes).astype(np.int8)


def pack_codes(codes: np.ndarray, layout: Int4Layout,
               buffers: Optional[BufferPool] = None) -> np.ndarray:
    """int4 codes [out, in] packed in `layout`, in numpy (the reference for rtn's packing)."""
    packed = pack_int4(codes, axis=0)
    if layout is Int4Layout.ROWS:
        return packed
    out = empty(layout.shape(*codes.shape), np.int8, buffers)
    transpose_into(packed, out)
    return out


#: Tile edge for `transposed`: a 256x256 tile of bytes stays in L1/L2 while it turns.
_TILE = 256


def transposed(matrix: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of a 2-D matrix's transpose, copied tile by tile."""
    out = np.empty(matrix.shape[::-1], dtype=matrix.dtype)
    transpose_into(matrix, out)
    return out


def transpose_into(matrix: np.ndarray, out: np.ndarray) -> None:
    """out = matrix.T, tile by tile.

    numpy copies a transposed view element by element across the whole
    matrix, missing the cache on every write; 256x256 tiles make the same
    copy about 3x faster for the int8 codes of a large weight.
    """
    rows, cols = matrix.shape
    for i in range(0, rows, _TILE):
        for j in range(0, cols, _TILE):
            out[j:j + _TILE, i:i + _TILE] = matrix[i:i + _TILE, j:j + _TILE].T
