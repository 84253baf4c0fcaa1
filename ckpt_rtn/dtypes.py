"""Element types as the two file formats name them.

MindSpore `.ckpt` records carry a dtype *name* ("Float16", "BFloat16", ...),
safetensors a short *code* ("F16", "BF16", ...). Both map onto one `DType`
that also says how the bytes look to numpy. numpy has no bfloat16, so
BFloat16 is held as its raw `<u2` bit patterns; Int4 (MindSpore's qint4x2)
is held as its int8 storage bytes, two codes per byte; FP8 E4M3 (the
safetensors F8_E4M3 of DeepSeek-V3-style checkpoints) as its uint8 codes,
decoded by fp8.py. Only safetensors names it: MindSpore `.ckpt` files are not
read as FP8, and no writer is ever handed one (fp8.py dequantizes every FP8
weight before it is written).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np


@dataclass(frozen=True)
class DType:
    """One element type.

    `numpy` is the storage dtype of the raw bytes, or None when the bytes are
    opaque to us (strings, names we do not know); `safetensors` is the code
    used in safetensors headers, or None when safetensors cannot hold it.
    """

    name: str
    numpy: Optional[np.dtype]
    safetensors: Optional[str]
    is_float: bool = False

    @property
    def itemsize(self) -> Optional[int]:
        return None if self.numpy is None else self.numpy.itemsize

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"DType({self.name})"


def _d(name: str, np_code: Optional[str], st_code: Optional[str], is_float: bool = False) -> DType:
    return DType(name, None if np_code is None else np.dtype(np_code), st_code, is_float)


BOOL = _d("Bool", "?", "BOOL")
INT8 = _d("Int8", "i1", "I8")
UINT8 = _d("UInt8", "u1", "U8")
INT16 = _d("Int16", "<i2", "I16")
UINT16 = _d("UInt16", "<u2", "U16")
INT32 = _d("Int32", "<i4", "I32")
UINT32 = _d("UInt32", "<u4", "U32")
INT64 = _d("Int64", "<i8", "I64")
UINT64 = _d("UInt64", "<u8", "U64")
FLOAT16 = _d("Float16", "<f2", "F16", True)
BFLOAT16 = _d("BFloat16", "<u2", "BF16", True)
FLOAT32 = _d("Float32", "<f4", "F32", True)
FLOAT64 = _d("Float64", "<f8", "F64", True)
FLOAT8_E4M3 = _d("Float8E4M3FN", "u1", "F8_E4M3", True)
# qint4x2: the shape is the int8 *storage* shape; safetensors stores it as I8
# and marks the tensor name "Int4" in __metadata__ (MindSpore's convention).
INT4 = _d("Int4", "i1", "I8")
COMPLEX64 = _d("Complex64", "<c8", None)
COMPLEX128 = _d("Complex128", "<c16", None)
# A Python str saved through append_dict: UTF-32-LE code units, dims [0].
STRING = _d("str", None, None)

_ALL = (BOOL, INT8, UINT8, INT16, UINT16, INT32, UINT32, INT64, UINT64,
        FLOAT16, BFLOAT16, FLOAT32, FLOAT64, INT4, COMPLEX64, COMPLEX128, STRING)

# MindSpore names are matched case-insensitively; 1.0-era files spell "Uint8".
_BY_MS_NAME: Dict[str, DType] = {d.name.lower(): d for d in _ALL}
# Map-tensor protos and old writers use numpy's names.
_BY_MS_NAME.update({
    "float16": FLOAT16, "float32": FLOAT32, "float64": FLOAT64,
    "int8": INT8, "int16": INT16, "int32": INT32, "int64": INT64,
    "uint8": UINT8, "uint16": UINT16, "uint32": UINT32, "uint64": UINT64,
    "bool": BOOL, "bool_": BOOL, "qint4x2": INT4,
})

_BY_ST_CODE: Dict[str, DType] = {d.safetensors: d for d in _ALL + (FLOAT8_E4M3,)
                                 if d.safetensors is not None and d is not INT4}


def from_mindspore_name(name: str) -> DType:
    """The DType for a `.ckpt` tensor_type; unknown names stay opaque bytes."""
    known = _BY_MS_NAME.get(name.lower())
    return known if known is not None else DType(name, None, None)


def from_safetensors_code(code: str) -> Optional[DType]:
    """The DType for a safetensors dtype code, or None if we do not know it."""
    return _BY_ST_CODE.get(code)
