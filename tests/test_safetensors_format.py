"""The safetensors reader and writer against MindSpore and the safetensors library."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from ckpt_rtn import dtypes
from ckpt_rtn.formats import open_reader, open_writer, planned_size
from ckpt_rtn.formats.tensor import TensorInfo

from conftest import ms_bytes, ms_load
from test_ckpt_format import ALL_DTYPES, read_all, write_all


def test_mindspore_fixture_reads_like_load_checkpoint(fixtures: Path) -> None:
    path = fixtures / "ms.safetensors"
    ours = read_all(path)
    theirs = ms_load(path)
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        info, array = ours[name]
        assert info.dtype.name == str(value.dtype) and info.shape == tuple(value.shape)
        assert array.tobytes() == ms_bytes(value), name
    with open_reader(path) as reader:
        assert reader.metadata == {"format": "ms"}


def test_our_file_loads_in_mindspore_and_safetensors(tmp_path: Path) -> None:
    path = tmp_path / "ours.safetensors"
    write_all(path, "safetensors")
    infos = [TensorInfo.of(k, d, a.shape) for k, (d, a) in ALL_DTYPES.items()]
    assert path.stat().st_size == planned_size(infos, format="safetensors", metadata={})
    for name, value in ms_load(path).items():
        dtype, array = ALL_DTYPES[name]
        assert str(value.dtype) == dtype.name and tuple(value.shape) == array.shape
        assert ms_bytes(value) == array.tobytes(), name
    with safe_open(str(path), framework="numpy") as f:
        names = [k for k in ALL_DTYPES if ALL_DTYPES[k][0] is not dtypes.BFLOAT16]
        for name in names:  # numpy has no bfloat16
            np.testing.assert_array_equal(f.get_tensor(name), ALL_DTYPES[name][1])
    assert read_all(path).keys() == ALL_DTYPES.keys()


def test_data_is_aligned_and_header_in_data_order(tmp_path: Path) -> None:
    path = tmp_path / "aligned.safetensors"
    write_all(path, "safetensors")
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8:8 + n])
    offsets = [v["data_offsets"] for v in header.values()]
    assert offsets == sorted(offsets)  # MindSpore's reader demands this
    sizes = {"BOOL": 1, "I8": 1, "U8": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
    for entry in header.values():
        assert entry["data_offsets"][0] % sizes[entry["dtype"]] == 0


def test_int4_marks_and_metadata(tmp_path: Path, fixtures: Path) -> None:
    (info, array), = read_all(fixtures / "int4.ckpt").values()
    path = tmp_path / "int4.safetensors"
    with open_writer(path, [info], format="safetensors", metadata={"format": "ms"}) as writer:
        writer.write(info.name, array)
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"format": "ms", "q": "Int4"}
    (back, data), = read_all(path).values()
    assert back.dtype is dtypes.INT4 and data.tobytes() == array.tobytes()
    loaded = ms_load(path)["q"]
    assert str(loaded.dtype) == "Int4" and ms_bytes(loaded) == array.tobytes()


def test_reads_files_from_the_safetensors_library(tmp_path: Path) -> None:
    arrays = {"z": np.arange(6, dtype=np.int64).reshape(2, 3), "a": np.float16([1, 2]),
              "m": np.zeros((0,), np.float32)}
    path = tmp_path / "lib.safetensors"
    save_file(arrays, str(path), metadata={"k": "v"})
    ours = read_all(path)
    for name, array in arrays.items():
        np.testing.assert_array_equal(ours[name][1], array)
    with open_reader(path) as reader:
        assert reader.metadata == {"k": "v"}


def test_str_is_refused_by_the_writer(tmp_path: Path, fixtures: Path) -> None:
    info = read_all(fixtures / "small.ckpt")["note"][0]
    with pytest.raises(Exception, match="safetensors cannot store str"):
        open_writer(tmp_path / "x.safetensors", [info], format="safetensors", metadata={})
    assert not list(tmp_path.iterdir())
