"""Checkpoint file formats: bytes in, `TensorInfo` + numpy arrays out, and back.

Nothing here knows about quantization. One call per job:

    with open_reader("in.ckpt") as reader:
        for info in reader.tensors:
            array = reader.read(info)

    with open_writer("out.safetensors", planned_infos) as writer:
        writer.write(name, array)
"""
from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

from ..errors import FormatError
from ..paths import input_stat
from . import ckpt, safetensors
from .tensor import TensorInfo, TensorReader, TensorWriter

FORMATS = ("ckpt", "safetensors")
_SUFFIXES = {".ckpt": "ckpt", ".safetensors": "safetensors"}


def format_from_suffix(path: "os.PathLike[str] | str") -> Optional[str]:
    """'ckpt' or 'safetensors' from the file name, None if the suffix says neither."""
    return _SUFFIXES.get(os.path.splitext(os.fspath(path))[1].lower())


def detect_format(path: "os.PathLike[str] | str") -> str:
    """The format of an existing file: its suffix, else a look at its first bytes."""
    by_suffix = format_from_suffix(path)
    if by_suffix is not None:
        return by_suffix
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as exc:
        raise FormatError(path, f"cannot open: {exc.strerror}") from None
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return "ckpt"


def open_reader(path: "os.PathLike[str] | str", *, format: Optional[str] = None,
                verify_crc: bool = True, defer_crc: bool = False) -> TensorReader:
    """Index a checkpoint file; `verify_crc` and `defer_crc` apply to `.ckpt` CRC trailers
    and safetensors `crc_num` (see CkptReader, SafetensorsReader): a deferred check ends
    in `reader.finish()`."""
    input_stat(path)  # a FIFO, a device or a directory is refused before it is opened
    fmt = format or detect_format(path)
    if fmt == "ckpt":
        return ckpt.CkptReader(path, verify_crc=verify_crc, defer_crc=defer_crc)
    if fmt == "safetensors":
        return safetensors.SafetensorsReader(path, verify_crc=verify_crc, defer_crc=defer_crc)
    raise ValueError(f"unknown format {fmt!r}")


def open_writer(path: "os.PathLike[str] | str", tensors: Sequence[TensorInfo], *, format: str,
                metadata: Mapping[str, str], crc: bool = False,
                direct: bool = True) -> TensorWriter:
    """A writer for `tensors`; `metadata` goes to safetensors; `crc` writes a `.ckpt` CRC
    trailer, or MindSpore's safetensors `crc_num`; `direct` writes around the page cache
    where the filesystem allows it (direct.py), else through it."""
    if format == "ckpt":
        return ckpt.CkptWriter(path, tensors, crc=crc, direct=direct)
    if format == "safetensors":
        return safetensors.SafetensorsWriter(path, tensors, metadata, crc=crc, direct=direct)
    raise ValueError(f"unknown format {format!r}")


def planned_size(tensors: Sequence[TensorInfo], *, format: str,
                 metadata: Mapping[str, str], crc: bool = False,
                 path: "os.PathLike[str] | str | None" = None) -> int:
    """Exact byte size of the file `open_writer` would write for `tensors`; what it would
    refuse to write is refused here too, naming `path`."""
    if format == "ckpt":
        return ckpt.planned_size(tensors, crc=crc)
    return safetensors.planned_size(tensors, metadata, crc, path)


__all__ = ["FORMATS", "TensorInfo", "TensorReader", "TensorWriter", "detect_format",
           "format_from_suffix", "open_reader", "open_writer", "planned_size"]
