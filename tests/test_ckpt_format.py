"""The .ckpt reader and writer against real MindSpore, byte for byte."""
from __future__ import annotations

import os
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

from ckpt_rtn import dtypes
from ckpt_rtn.errors import ChecksumError, FormatError
from ckpt_rtn.formats import ckpt, open_reader, open_writer
from ckpt_rtn.formats import protowire as pw
from ckpt_rtn.formats.tensor import TensorInfo
from ckpt_rtn.numerics import bf16_to_float32

from conftest import field, ms_bytes, ms_load, ms_save, record, varint

import mindspore as ms
from mindspore.train import checkpoint_pb2


def read_all(path: Path, **kwargs):
    with open_reader(path, **kwargs) as reader:
        return {t.name: (t, reader.read(t)) for t in reader.tensors}


def assert_same_as_mindspore(path: Path, **load_kwargs) -> None:
    """Names (in order), dtypes, shapes and bytes equal mindspore.load_checkpoint's."""
    ours = read_all(path)
    theirs = ms_load(path, **load_kwargs)
    assert list(ours) == list(theirs)
    for name, value in theirs.items():
        info, array = ours[name]
        if isinstance(value, str):
            assert info.dtype is dtypes.STRING and str(array) == value
            continue
        assert info.dtype.name == str(value.dtype), name
        assert info.shape == tuple(value.shape), name
        assert array.tobytes() == ms_bytes(value), name


@pytest.mark.parametrize("name", ["small.ckpt", "small_crc.ckpt", "int4.ckpt"])
def test_mindspore_fixtures_read_like_load_checkpoint(fixtures: Path, name: str) -> None:
    assert_same_as_mindspore(fixtures / name)


def test_fixture_values(fixtures: Path) -> None:
    tensors = read_all(fixtures / "small.ckpt")
    assert tensors["c.bf16"][0].dtype is dtypes.BFLOAT16
    np.testing.assert_array_equal(bf16_to_float32(tensors["c.bf16"][1]),
                                  np.load(fixtures / "ref_bf16_as_f32.npy"))
    assert tensors["e.scalar_i64"][0].shape == () and tensors["e.scalar_i64"][1] == 7
    assert str(tensors["note"][1]) == "hello"
    info, data = read_all(fixtures / "int4.ckpt")["q"]
    assert info.dtype is dtypes.INT4 and info.shape == (1, 2)
    assert data.view(np.uint8).tolist() == [[0x21, 0x43]]


def test_crc_trailer_is_parsed_and_verified(fixtures: Path) -> None:
    raw = (fixtures / "small_crc.ckpt").read_bytes()
    with open_reader(fixtures / "small_crc.ckpt") as reader:
        assert reader.crc == zlib.crc32(raw[:-17]) == int.from_bytes(raw[-10:], "big")


@pytest.fixture(scope="module")
def big_ms_files(tmp_path_factory: pytest.TempPathFactory):
    """MindSpore-written files with a >512 MiB tensor (chunked) and bf16 data."""
    root = tmp_path_factory.mktemp("ms_big")
    big = np.arange(150_000_000, dtype=np.uint32).view(np.float16).reshape(1000, -1)
    arrays = {"big.fp16": big, "small.fp32": np.linspace(-1, 1, 12, dtype=np.float32)}
    ms_save(root / "big.ckpt", arrays)
    bf16 = {"w.bf16": np.random.default_rng(3).standard_normal((64, 48)).astype(np.float32),
            "v.bf16": np.array([1.5, -2.0, 3.0e38, 1e-40], np.float32)}
    ms_save(root / "bf16.ckpt", bf16, ms_dtype=ms.bfloat16)
    ms_save(root / "async.ckpt", {"big.fp16": big}, async_save=True)
    for thread in threading.enumerate():  # save_checkpoint's async writer thread
        if thread.name == "asyn_save_ckpt":
            thread.join()
    return root, big


def test_mindspore_chunked_tensor_is_reassembled(big_ms_files) -> None:
    root, big = big_ms_files
    assert big.nbytes > ckpt.CHUNK_SIZE
    with open_reader(root / "big.ckpt") as reader:
        assert [len(reader.segments(t)) for t in reader.tensors] == [2, 1]
        info = reader.tensors[0]
        assert info.shape == big.shape and info.dtype is dtypes.FLOAT16
        assert reader.read(info).tobytes() == big.tobytes()
        assert reader.read(reader.tensors[1]).tolist() == np.linspace(-1, 1, 12,
                                                                      dtype=np.float32).tolist()


def test_mindspore_async_save_row_split_is_reassembled(big_ms_files) -> None:
    root, big = big_ms_files
    ours = read_all(root / "async.ckpt")
    assert ours["big.fp16"][1].tobytes() == big.tobytes()


def test_mindspore_bf16_is_read_bit_exactly(big_ms_files) -> None:
    root, _ = big_ms_files
    assert_same_as_mindspore(root / "bf16.ckpt")


ALL_DTYPES = {
    "bool": (dtypes.BOOL, np.array([True, False, True])),
    "i8": (dtypes.INT8, np.arange(-4, 4, dtype=np.int8).reshape(2, 4)),
    "u8": (dtypes.UINT8, np.array([0, 1, 255], np.uint8)),
    "i16": (dtypes.INT16, np.array([-32768, 7], np.int16)),
    "u16": (dtypes.UINT16, np.array([65535, 1], np.uint16)),
    "i32": (dtypes.INT32, np.array([[-(2**31), 5]], np.int32)),
    "u32": (dtypes.UINT32, np.array([2**32 - 1], np.uint32)),
    "i64": (dtypes.INT64, np.array(-(2**62), np.int64)),
    "u64": (dtypes.UINT64, np.array([2**64 - 1], np.uint64)),
    "f16": (dtypes.FLOAT16, np.array([[1.5, -0.0], [65504, 6e-8]], np.float16)),
    "f32": (dtypes.FLOAT32, np.linspace(-3, 3, 30, dtype=np.float32).reshape(5, 6)),
    "f64": (dtypes.FLOAT64, np.array([np.pi], np.float64)),
    "bf16": (dtypes.BFLOAT16, np.array([0x3FC0, 0xC000, 0x7F7F, 0x0001], np.uint16)),
    "scalar": (dtypes.FLOAT32, np.array(0.5, np.float32)),
    "empty": (dtypes.FLOAT32, np.zeros((0, 3), np.float32)),
}


def write_all(path: Path, fmt: str, **kwargs) -> None:
    infos = [TensorInfo.of(k, d, a.shape) for k, (d, a) in ALL_DTYPES.items()]
    with open_writer(path, infos, format=fmt, metadata={}, **kwargs) as writer:
        for k, (_, a) in ALL_DTYPES.items():
            writer.write(k, a)


@pytest.mark.parametrize("crc", [False, True])
def test_our_ckpt_loads_in_mindspore(tmp_path: Path, crc: bool) -> None:
    path = tmp_path / "ours.ckpt"
    write_all(path, "ckpt", crc=crc)
    if crc:
        assert path.read_bytes()[-17:-10] == b"crc_num"
    loaded = ms_load(path, crc_check=crc)
    assert list(loaded) == list(ALL_DTYPES)
    for name, value in loaded.items():
        dtype, array = ALL_DTYPES[name]
        assert str(value.dtype) == dtype.name
        assert tuple(value.shape) == array.shape
        assert ms_bytes(value) == array.tobytes(), name
    assert read_all(path).keys() == ALL_DTYPES.keys()


def test_our_small_chunks_are_reassembled_by_mindspore(tmp_path: Path) -> None:
    """7-byte records cut elements apart: MindSpore must still rebuild them."""
    path = tmp_path / "chunks.ckpt"
    infos = [TensorInfo.of(k, d, a.shape) for k, (d, a) in ALL_DTYPES.items()]
    with ckpt.CkptWriter(path, infos, crc=True, chunk_size=7) as writer:
        for k, (_, a) in ALL_DTYPES.items():
            writer.write(k, a)
    assert path.stat().st_size == ckpt.planned_size(infos, crc=True, chunk_size=7)
    for name, value in ms_load(path, crc_check=True).items():
        assert ms_bytes(value) == ALL_DTYPES[name][1].tobytes(), name
    for name, (info, array) in read_all(path).items():
        assert array.tobytes() == ALL_DTYPES[name][1].tobytes(), name


def test_string_value_roundtrips_through_mindspore(tmp_path: Path, fixtures: Path) -> None:
    path = tmp_path / "str.ckpt"
    src = read_all(fixtures / "small.ckpt")
    infos = [info for info, _ in src.values()]
    with open_writer(path, infos, format="ckpt", metadata={}) as writer:
        for info, array in src.values():
            writer.write(info.name, array)
    assert path.read_bytes() == (fixtures / "small.ckpt").read_bytes()


def test_writer_output_is_byte_identical_to_mindspore(tmp_path: Path, fixtures: Path) -> None:
    """Re-writing MindSpore's own files with our writer gives the same bytes."""
    for name, crc in (("small.ckpt", False), ("small_crc.ckpt", True), ("int4.ckpt", False)):
        src = read_all(fixtures / name)
        out = tmp_path / name
        with open_writer(out, [i for i, _ in src.values()], format="ckpt", metadata={},
                         crc=crc) as writer:
            for info, array in src.values():
                writer.write(info.name, array)
        assert out.read_bytes() == (fixtures / name).read_bytes(), name


# Hand-built records: legal protobuf that MindSpore itself does not emit.

def test_any_field_order_packed_dims_and_unknown_fields(tmp_path: Path) -> None:
    data = np.arange(6, dtype=np.float32).tobytes()
    tensor = (field(3, 2, data) + field(9, 0, varint(300)) + field(2, 2, b"float32")
              + field(1, 2, varint(2) + varint(3)) + field(15, 5, b"\0\0\0\0"))
    value = field(2, 2, tensor) + field(7, 1, b"\0" * 8) + field(1, 2, b"packed")
    path = tmp_path / "odd.ckpt"
    path.write_bytes(record(value))
    (info, array), = read_all(path).values()
    assert info.name == "packed" and info.dtype is dtypes.FLOAT32 and info.shape == (2, 3)
    assert array.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_legacy_scalar_and_case_insensitive_names(tmp_path: Path) -> None:
    legacy = record(field(1, 2, b"step") + field(2, 2, field(1, 0, varint(0))
                    + field(2, 2, b"INT32") + field(3, 2, struct.pack("<i", 42))))
    old_name = record(field(1, 2, b"u") + field(2, 2, field(1, 0, varint(2))
                      + field(2, 2, b"Uint8") + field(3, 2, b"\x01\xff")))
    path = tmp_path / "legacy.ckpt"
    path.write_bytes(legacy + old_name)
    tensors = read_all(path)
    assert tensors["step"][0].shape == () and int(tensors["step"][1]) == 42
    assert tensors["u"][0].dtype is dtypes.UINT8 and tensors["u"][1].tolist() == [1, 255]


def test_protobuf_library_encoding_is_read(tmp_path: Path) -> None:
    """An independent encoder (MindSpore's checkpoint_pb2) for the same schema."""
    msg = checkpoint_pb2.Checkpoint()
    for name, dims, tname, raw in (("a", [2, 2], "Float16", np.ones(4, np.float16).tobytes()),
                                   ("b", [], "Int64", struct.pack("<q", -5))):
        value = msg.value.add()
        value.tag = name
        value.tensor.dims.extend(dims)
        value.tensor.tensor_type = tname
        value.tensor.tensor_content = raw
    path = tmp_path / "pb.ckpt"
    path.write_bytes(msg.SerializeToString())
    tensors = read_all(path)
    assert tensors["a"][1].tolist() == [[1, 1], [1, 1]] and int(tensors["b"][1]) == -5


def test_unknown_dtype_passes_through_opaque(tmp_path: Path) -> None:
    raw = bytes(range(8))
    path = tmp_path / "f8.ckpt"
    path.write_bytes(record(field(1, 2, b"x") + field(2, 2, field(1, 0, varint(8))
                     + field(2, 2, b"Float8E4M3FN") + field(3, 2, raw))))
    (info, array), = read_all(path).values()
    assert info.dtype.name == "Float8E4M3FN" and info.dtype.numpy is None
    out = tmp_path / "copy.ckpt"
    with open_writer(out, [info], format="ckpt", metadata={}) as writer:
        writer.write(info.name, array)
    assert out.read_bytes() == path.read_bytes()


def test_deferred_crc_is_checked_while_reading(tmp_path: Path, fixtures: Path) -> None:
    """defer_crc: the CRC is accumulated as tensors are read in file order, including
    the record headers and any tensor never read; finish() compares."""
    with open_reader(fixtures / "small_crc.ckpt", defer_crc=True) as reader:
        for info in reader.tensors[::2]:  # skip every other tensor
            reader.read(info)
        reader.finish()
    damaged = tmp_path / "damaged.ckpt"
    raw = bytearray((fixtures / "small_crc.ckpt").read_bytes())
    raw[30] ^= 0x01  # inside a.fp16's data
    damaged.write_bytes(bytes(raw))
    with open_reader(damaged, defer_crc=True) as reader:  # no full pass on opening
        for info in reversed(reader.tensors):  # out of order: finish() starts over
            reader.read(info)
        with pytest.raises(ChecksumError, match="CRC mismatch"):
            reader.finish()
    with pytest.raises(ChecksumError):
        open_reader(damaged)


def test_varint_encoding_refuses_what_int64_cannot_hold() -> None:
    assert pw.encode_varint(-1) == b"\xff" * 9 + b"\x01"
    assert pw.decode_varint(pw.encode_varint(-(2 ** 63)), 0, 10)[0] == 2 ** 63
    with pytest.raises(ValueError, match="int64"):
        pw.encode_varint(-(2 ** 63) - 1)  # looped for ever before


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_large_tensors_are_mapped_read_only_and_a_cut_file_is_still_refused(
        tmp_path: Path, fmt: str) -> None:
    """Tensors from 1 MiB on come from a map of the file (tensor.py): the same bytes as
    written, read-only (the map is the input file), and one cut short is refused as
    before rather than mapped past its end (which would kill the process with SIGBUS)."""
    rng = np.random.default_rng(3)
    arrays = {"small": rng.standard_normal(100).astype(np.float16),
              "large": rng.standard_normal((1024, 640)).astype(np.float16),  # 1.25 MiB
              "after": rng.standard_normal(7).astype(np.float32)}
    path = tmp_path / f"m.{fmt}"
    kinds = {np.dtype(np.float16): dtypes.FLOAT16, np.dtype(np.float32): dtypes.FLOAT32}
    infos = [TensorInfo.of(k, kinds[a.dtype], a.shape) for k, a in arrays.items()]
    with open_writer(path, infos, format=fmt, metadata={}) as writer:
        for k, a in arrays.items():
            writer.write(k, a)
    read = read_all(path)
    for k, a in arrays.items():
        np.testing.assert_array_equal(read[k][1], a)
    assert not read["large"][1].flags.writeable and read["small"][1].flags.writeable
    with open_reader(path) as reader:
        large = next(t for t in reader.tensors if t.name == "large")
        os.truncate(path, os.path.getsize(path) - large.nbytes // 2 - 7 * 4)
        with pytest.raises(FormatError, match="large"):
            reader.read(large)
