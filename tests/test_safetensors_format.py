"""The safetensors reader and writer against MindSpore and the safetensors library."""
from __future__ import annotations

import json
import os
import struct
import tracemalloc
import zlib
from contextlib import nullcontext
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from ckpt_rtn import dtypes
from ckpt_rtn.errors import ChecksumError, FormatError
from ckpt_rtn.formats import crc32, open_reader, open_writer, planned_size
from ckpt_rtn.formats.tensor import TensorInfo

from conftest import ms_bytes, ms_load, ms_save
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


# --------------------------------------------------------------------------- crc_num

def test_crc32_combine_matches_zlib_on_the_concatenation() -> None:
    rng = np.random.default_rng(11)
    for len_a, len_b in [(0, 0), (0, 9), (9, 0), (1, 1), (100, 65536), (3, 65537),
                         (1000, 3 * 2 ** 20 + 7)]:
        a, b = rng.bytes(len_a), rng.bytes(len_b)
        assert crc32.combine(zlib.crc32(a), zlib.crc32(b), len_b) == zlib.crc32(a + b)
    pieces = [rng.bytes(int(n)) for n in rng.integers(0, 300, 500)]
    assert crc32.chain((zlib.crc32(p), len(p)) for p in pieces) == zlib.crc32(b"".join(pieces))


def mindspore_crc(path: Path) -> int:
    """crc_num as MindSpore's save_checkpoint computes it: sorted names, name then bytes."""
    crc = 0
    with safe_open(str(path), framework="numpy") as f:
        for name in sorted(f.keys()):
            crc = zlib.crc32(name.encode(), crc)
            crc = zlib.crc32(f.get_tensor(name).tobytes(), crc)
    return crc


NUMPY_DTYPES = {"<f2": dtypes.FLOAT16, "<f4": dtypes.FLOAT32, "<f8": dtypes.FLOAT64,
                "|i1": dtypes.INT8}


def crc_infos() -> Dict[str, np.ndarray]:
    """Tensors whose data order (largest alignment first) differs from their sorted order."""
    rng = np.random.default_rng(4)
    return {"z.f16": rng.standard_normal((3, 5)).astype(np.float16),
            "a.f32": rng.standard_normal(7).astype(np.float32),
            "m.i8": np.arange(-3, 3, dtype=np.int8), "b.f64": np.float64([np.e, 0]),
            "é.unicode": np.float16([1]), "empty": np.zeros((0, 4), np.float32),
            "b.f16": np.float16([2, -2])}


def write_with_crc(path: Path, arrays: Dict[str, np.ndarray], **metadata: str) -> None:
    infos = [TensorInfo.of(k, NUMPY_DTYPES[a.dtype.str], a.shape) for k, a in arrays.items()]
    with open_writer(path, infos, format="safetensors", metadata=metadata, crc=True) as writer:
        for name in reversed(list(arrays)):  # any order: each tensor's CRC is combined at the end
            writer.write(name, arrays[name])
    assert path.stat().st_size == planned_size(infos, format="safetensors", metadata=metadata,
                                               crc=True)


def test_crc_num_written_is_mindspores_and_verified(tmp_path: Path) -> None:
    arrays = crc_infos()
    path = tmp_path / "crc.safetensors"
    write_with_crc(path, arrays, format="ms", crc_num="12")  # a stale crc_num is replaced
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    assert meta == {"format": "ms", "crc_num": str(mindspore_crc(path))}
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0 and raw[8:8 + n].rstrip(b" ").endswith(b'"}}')
    with open_reader(path) as reader:
        assert reader.crc == mindspore_crc(path)
        for info in reader.tensors:
            assert reader.read(info).tobytes() == arrays[info.name].tobytes()


def flip_data_byte(path: Path, name: str) -> None:
    with open_reader(path, verify_crc=False) as reader:
        info = next(t for t in reader.tensors if t.name == name)
        offset = reader.segments(info)[0].offset
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x10
    path.write_bytes(bytes(raw))


def test_tampered_crc_file_is_refused_on_opening_or_at_finish(tmp_path: Path) -> None:
    path = tmp_path / "crc.safetensors"
    write_with_crc(path, crc_infos())
    flip_data_byte(path, "m.i8")
    with pytest.raises(ChecksumError, match=r"CRC mismatch.*--no-verify-crc"):
        open_reader(path)
    with open_reader(path, defer_crc=True) as reader:  # some read, out of order; finish: the rest
        reader.read(reader.tensors[-1])
        reader.read(reader.tensors[0])
        with pytest.raises(ChecksumError, match=str(path)):
            reader.finish()
    with open_reader(path, verify_crc=False) as reader:
        assert reader.crc is not None and len(reader.tensors) == 7


@pytest.mark.parametrize("order", ["data", "reversed", "none"])
def test_deferred_crc_accepts_any_read_order(tmp_path: Path, order: str) -> None:
    path = tmp_path / "crc.safetensors"
    write_with_crc(path, crc_infos())
    with open_reader(path, defer_crc=True) as reader:
        tensors = {"data": reader.tensors, "reversed": reader.tensors[::-1], "none": []}[order]
        for info in tensors:
            reader.read(info)
        reader.finish()


@pytest.fixture(scope="module")
def ms_crc_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A safetensors file MindSpore wrote with crc_check=True (fp16/fp32: 2.10 fails on bf16)."""
    path = tmp_path_factory.mktemp("ms_crc") / "ms_crc.safetensors"
    arrays = {k: v for k, v in crc_infos().items() if v.dtype in (np.float16, np.float32)}
    ms_save(path, arrays, crc_check=True)
    return path


def test_mindspore_crc_file_is_verified_and_tampering_refused(ms_crc_file: Path,
                                                              tmp_path: Path) -> None:
    with open_reader(ms_crc_file) as reader:
        assert reader.crc == int(reader.metadata["crc_num"]) == mindspore_crc(ms_crc_file)
        names = [t.name for t in reader.tensors]
    assert names != sorted(names)  # the CRC runs in another order than the data
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(ms_crc_file.read_bytes())
    flip_data_byte(tampered, "z.f16")
    with pytest.raises(ChecksumError):
        open_reader(tampered)


def test_mindspore_checks_our_crc(tmp_path: Path) -> None:
    path = tmp_path / "ours.safetensors"
    write_with_crc(path, crc_infos(), format="ms")
    loaded = ms_load(path, crc_check=True)
    assert set(loaded) == set(crc_infos())
    flip_data_byte(path, "a.f32")
    with pytest.raises(ValueError, match="crc check has failed"):
        ms_load(path, crc_check=True)


# --------------------------------------------------------------------------- header cost

def test_header_over_the_limit_is_refused_before_it_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 100_000_001) + b"{")
        f.truncate(8 + 100_000_001)  # sparse
    reads = []
    real_pread = os.pread

    def pread(fd: int, n: int, offset: int) -> bytes:
        reads.append(n)
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", pread)
    with pytest.raises(FormatError, match=r"over the safetensors limit of 100000000"):
        open_reader(path)
    assert max(reads) <= 16


def indexing_peak(path: Path) -> int:
    """Bytes allocated at most while `path` is indexed (tracemalloc)."""
    tracemalloc.start()
    try:
        with pytest.raises(FormatError) if path.name.startswith("bad") else nullcontext():
            open_reader(path, verify_crc=False).close()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_indexing_costs_a_bounded_multiple_of_the_header(tmp_path: Path) -> None:
    """A legal header: its text and the index (~300 bytes a tensor), never a dict of dicts
    (over 1000 bytes a tensor before). A hostile one (an entry of a million lists, each a
    Python object) costs no more than its text before it is refused."""
    count = 50_000
    infos = [TensorInfo.of(f"layers.{i}.w", dtypes.FLOAT16, (1,)) for i in range(count)]
    path = tmp_path / "many.safetensors"
    with open_writer(path, infos, format="safetensors", metadata={}) as writer:
        for info in infos:
            writer.write(info.name, np.float16([1]))
    assert indexing_peak(path) < 600 * count
    text = b'{"a":[' + b",".join([b"[]"] * 1_000_000) + b"]}"
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(text)) + text)
    assert indexing_peak(bad) < 3 * len(text)
