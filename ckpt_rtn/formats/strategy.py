"""MindSpore parallel strategy files: how each parameter is split across ranks.

A distributed checkpoint stores each rank's local slice under the full
parameter name; the strategy file (`strategy_ckpt_save_file`, protobuf or
JSON) says which tensor dimensions are split. ckpt-rtn needs one fact from
it: whether a weight is split along its input channels, whose per-channel
scale must then come from all ranks. Only the layout items are read; the
protobuf is walked with the same wire helpers as `.ckpt` records
(ParallelStrategyMap: field 3 = ParallelLayoutItem{1: param_name,
2: ParallelLayouts{1: DevMatrix{1: dim*}, 2: TensorMap{1: dim*}}}).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from ..errors import FormatError
from . import protowire as pw
from . import untrusted_json


@dataclass(frozen=True)
class Layout:
    """`tensor_map[i]` is -1 when dimension i is not split, else a device-matrix axis."""

    dev_matrix: Tuple[int, ...]
    tensor_map: Tuple[int, ...]

    def splits(self, dim: int) -> bool:
        """Whether dimension `dim` is divided among ranks (over a device axis of size > 1)."""
        if dim >= len(self.tensor_map) or self.tensor_map[dim] < 0:
            return False
        axis = len(self.dev_matrix) - 1 - self.tensor_map[dim]  # counted from the right
        return 0 <= axis < len(self.dev_matrix) and self.dev_matrix[axis] > 1


#: Strategy files are small; a larger file is never parsed as one.
_MAX_STRATEGY_SIZE = 64 * 1024 * 1024


def is_strategy_file(path: "os.PathLike[str] | str") -> bool:
    """Whether `path` is a readable MindSpore strategy file (protobuf or JSON).

    A protobuf strategy starts with current_stage (field 1, varint: 0x08),
    never with a `.ckpt` record's 0x0a; safetensors files are never strategies
    (their length prefix can start with 0x08).
    """
    name = os.fspath(path)
    if name.endswith(".safetensors") or not os.path.isfile(name) \
            or os.path.getsize(name) > _MAX_STRATEGY_SIZE:
        return False
    if name.endswith(".json"):
        return _json_layouts(path) is not None
    with open(name, "rb") as f:
        data = f.read()
    try:
        return data[:1] == b"\x08" and bool(_protobuf_layouts(data))
    except (pw.WireError, UnicodeDecodeError):
        return False


def read_strategy(path: "os.PathLike[str] | str") -> Dict[str, Layout]:
    """Parameter name -> Layout, from a protobuf or JSON strategy file."""
    if os.fspath(path).endswith(".json"):
        layouts = _json_layouts(path)
        if layouts is None:
            raise FormatError(path, "not a MindSpore strategy JSON (no parallel_layout_item)")
        return layouts
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _protobuf_layouts(data)
    except pw.WireError as exc:
        raise FormatError(path, f"corrupt strategy file: {exc}", exc.offset) from None
    except UnicodeDecodeError:
        raise FormatError(path, "corrupt strategy file: a parameter name is not UTF-8") from None


def _json_layouts(path: "os.PathLike[str] | str") -> Optional[Dict[str, Layout]]:
    """The layouts of a JSON strategy, None if the file is not one (not JSON, or not shaped
    like a strategy: integers where MindSpore writes them)."""
    try:
        document = untrusted_json.load_file(path, "strategy", max_size=_MAX_STRATEGY_SIZE)
    except FormatError:
        return None
    items = document.get("parallel_layout_item") if isinstance(document, dict) else None
    if not isinstance(items, dict):
        return None
    layouts = {}
    for name, item in items.items():
        if not isinstance(item, dict):
            return None
        dev_matrix, tensor_map = item.get("dev_matrix", []), item.get("tensor_map", [])
        if not _int_list(dev_matrix) or not isinstance(tensor_map, list) \
                or not all(_is_int(e) or _int_list(e) for e in tensor_map):
            return None
        layouts[name] = Layout(tuple(dev_matrix), tuple(_axis(e) for e in tensor_map))
    return layouts


def _is_int(value: object) -> bool:
    return type(value) is int


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)


def _axis(entry: "int | List[int]") -> int:
    """A tensor_map entry; a list of axes (several device axes) counts by its first split one."""
    if isinstance(entry, list):
        return next((e for e in entry if e >= 0), -1)
    return entry


def _protobuf_layouts(data: bytes) -> Dict[str, Layout]:
    layouts: Dict[str, Layout] = {}
    for start, end in _fields(data, 0, len(data), 3):          # ParallelLayoutItem
        names = [bytes(data[s:e]).decode() for s, e in _fields(data, start, end, 1)]
        inner = _fields(data, start, end, 2)                      # ParallelLayouts
        if not names or not inner:
            continue
        s, e = inner[0]
        dev = [d for ds, de in _fields(data, s, e, 1) for d in _ints(data, ds, de)]
        tmap = [d for ts, te in _fields(data, s, e, 2) for d in _ints(data, ts, te)]
        layouts[names[0]] = Layout(tuple(dev), tuple(tmap))
    return layouts


def _fields(data: bytes, pos: int, end: int, wanted: int) -> List[Tuple[int, int]]:
    """(start, end) of every LEN field numbered `wanted` in data[pos:end]."""
    found = []
    while pos < end:
        field, wire, pos = pw.read_key(data, pos, end)
        if field == wanted and wire == pw.LEN:
            start, pos = pw.read_len(data, pos, end)
            found.append((start, pos))
        else:
            pos = pw.skip_field(data, wire, pos, end)
    return found


def _ints(data: bytes, pos: int, end: int) -> List[int]:
    """The `repeated int dim = 1` of a DevMatrix / TensorMap, packed or not."""
    values = []
    while pos < end:
        field, wire, pos = pw.read_key(data, pos, end)
        if field == 1 and wire in (pw.VARINT, pw.LEN):
            found, pos = pw.read_ints(data, wire, pos, end)
            values.extend(found)
        else:
            pos = pw.skip_field(data, wire, pos, end)
    return values
