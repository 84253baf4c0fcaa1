"""Every bad input a user can hand `ckpt-rtn`, through the real CLI.

Each refusal must: exit 2, print exactly one line on stderr of the form
`error: <the offending path>: <reason>`, never a traceback, and leave no
output file (and no `.<name>.ckpt-rtn-*.tmp` temp file) behind.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np
import pytest
from click.testing import Result
from safetensors.numpy import save_file

from ckpt_rtn import converter, dtypes, formats, schemes
from ckpt_rtn.errors import QuantizationError
from ckpt_rtn.formats import TensorInfo
from ckpt_rtn.options import ConvertOptions
from ckpt_rtn.rules import load_rules

from conftest import FIXTURES, cli, llama_weights
SMALL = FIXTURES / "small.ckpt"
SMALL_CRC = FIXTURES / "small_crc.ckpt"
SMALL_ENC = FIXTURES / "small_enc.ckpt"

#: Where each record of small.ckpt starts (checked against the file below):
#: a.fp16 b.fp32 c.bf16 d.int8 e.scalar_i64 f.bool g.f64 h.u8 epoch_num note lr, end.
SMALL_RECORDS = (0, 39, 80, 116, 146, 181, 206, 240, 264, 296, 335, 358)
#: a.fp16's tensor bytes lie at [27, 39) (shared/specs/mindspore-ckpt-format.md, section 2).
SMALL_A_FP16_DATA = (27, 39)

TEMP_GLOB = ".*.ckpt-rtn-*.tmp"
OFFSET_RE = re.compile(r"\(at byte (\d+)\)$")


# --------------------------------------------------------------------------- helpers

def run(*args: object) -> Result:
    return cli(*args)


def temp_files(directory: Path) -> List[Path]:
    return sorted(directory.glob(TEMP_GLOB))


def assert_refused(result: Result, path: "Path | str", reason: str, *,
                   leaves: Iterable[Path] = (), directory: Optional[Path] = None,
                   offset: Optional[bool] = None) -> str:
    """The CLI refused cleanly; returns the error line.

    `reason`: a regex that must occur in the error line (case-insensitive).
    `leaves`: paths that must not exist afterwards. `directory`: where no
    temp file may remain. `offset`: True if the line must end in
    "(at byte N)".
    """
    context = f"exit {result.exit_code}\nstdout: {result.stdout!r}\nstderr: {result.stderr!r}"
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"uncaught {result.exception!r} (a traceback for the user)\n{context}")
    assert "Traceback" not in result.output, context
    assert result.exit_code == 2, context
    for p in leaves:
        assert not os.path.lexists(p), f"{p} was left behind\n{context}"
    if directory is not None:
        assert temp_files(directory) == [], context
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one line on stderr\n{context}"
    line = lines[0]
    prefix = f"error: {os.fspath(path)}: "
    assert line.startswith(prefix), f"expected {prefix!r}...\n{context}"
    assert re.search(reason, line[len(prefix):], re.IGNORECASE), (
        f"reason /{reason}/ not named\n{context}")
    if offset is True:
        assert OFFSET_RE.search(line), f"expected '(at byte N)'\n{context}"
    return line


def offset_of(line: str) -> int:
    match = OFFSET_RE.search(line)
    assert match, line
    return int(match.group(1))


def llama_infos(layers: int = 2) -> List[TensorInfo]:
    f16 = dtypes.FLOAT16
    infos = [TensorInfo.of("model.tok_embeddings.embedding_weight", f16, [32, 64])]
    for i in range(layers):
        for w in ("wq", "wk", "wv", "wo"):
            infos.append(TensorInfo.of(f"model.layers.{i}.attention.{w}.weight", f16, [64, 64]))
        for w in ("w1", "w2", "w3"):
            infos.append(TensorInfo.of(f"model.layers.{i}.feed_forward.{w}.weight", f16,
                                       [64, 64]))
        infos.append(TensorInfo.of(f"model.layers.{i}.attention_norm.weight", f16, [64]))
    infos.append(TensorInfo.of("model.norm_out.weight", f16, [64]))
    infos.append(TensorInfo.of("lm_head.weight", f16, [32, 64]))
    return infos


def write_llama_ckpt(path: Path, *, crc: bool = False) -> Path:
    """A small Llama-shaped .ckpt (or .safetensors, by suffix) written by our own writer
    (14 quantizable weights)."""
    rng = np.random.default_rng(1234)
    infos = llama_infos()
    fmt = formats.format_from_suffix(path)
    with formats.open_writer(path, infos, format=fmt, metadata={}, crc=crc) as writer:
        for info in infos:
            writer.write(info.name, rng.standard_normal(info.shape).astype(np.float16))
    return path


def write_safetensors(path: Path, header: object, data: bytes, *,
                      header_len: Optional[int] = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def copy_of(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)  # not copy(): the fixtures are read-only
    os.chmod(dst, 0o644)
    return dst


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_llama_ckpt(tmp_path_factory.mktemp("llama") / "llama.ckpt")


@pytest.fixture
def llama_copy(tmp_path: Path, llama_ckpt: Path) -> Path:
    return copy_of(llama_ckpt, tmp_path / "in.ckpt")


def test_fixture_layout_is_what_these_tests_assume() -> None:
    data = SMALL.read_bytes()
    assert len(data) == SMALL_RECORDS[-1]
    assert all(data[start] == 0x0A for start in SMALL_RECORDS[:-1])
    assert SMALL_ENC.read_bytes()[:4] == bytes.fromhex("d85e3a7f")
    assert SMALL_CRC.read_bytes()[-17:-10] == b"crc_num"


# --------------------------------------------------------------------------- input files

COMMANDS = ("inspect", "convert")


def run_on_input(command: str, src: Path, tmp_path: Path, *extra: str) -> "tuple[Result, Path]":
    """`inspect SRC` or `convert SRC <tmp>/out/out.ckpt`; returns the result and the output."""
    out_dir = tmp_path / "out"
    out_dir.mkdir(exist_ok=True)
    dst = out_dir / "out.ckpt"
    if command == "inspect":
        return run("inspect", src, *extra), dst
    # The fixtures hold no model family to detect; name one so that the file's own
    # fault is what is reported (a CRC, checked while converting, comes last).
    return run("convert", "--config", "llama2", src, dst, *extra), dst


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name, reason", [("empty.ckpt", r"empty"),
                                          ("empty.safetensors", r"empty|too short")])
def test_empty_file(tmp_path: Path, command: str, name: str, reason: str) -> None:
    src = tmp_path / name
    src.write_bytes(b"")
    result, dst = run_on_input(command, src, tmp_path)
    assert_refused(result, src, reason, leaves=[dst], directory=dst.parent)
    assert result.stdout == ""


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("cut", [1, 2, 5, 20, 30, 33, 38, 60, 100, 200, 300, 357])
def test_fixture_truncated_mid_record(tmp_path: Path, command: str, cut: int) -> None:
    """small.ckpt cut inside a record: in a length, the tag, the dtype name, the data."""
    src = tmp_path / "cut.ckpt"
    src.write_bytes(SMALL.read_bytes()[:cut])
    result, dst = run_on_input(command, src, tmp_path)
    line = assert_refused(result, src, r"truncated|corrupt", leaves=[dst],
                          directory=dst.parent, offset=True)
    # the offset points into the record that was cut, not somewhere arbitrary
    record = max(start for start in SMALL_RECORDS if start < cut)
    assert record <= offset_of(line) <= cut, line


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("where", ["first record header", "first tensor data", "middle",
                                   "last byte"])
def test_our_ckpt_truncated(tmp_path: Path, llama_ckpt: Path, command: str, where: str) -> None:
    data = llama_ckpt.read_bytes()
    first_data = data.index(b"Float16") + len(b"Float16") + 3  # after 0x1a + 2-byte length
    cut = {"first record header": 12, "first tensor data": first_data + 100,
           "middle": len(data) // 2, "last byte": len(data) - 1}[where]
    src = tmp_path / "cut.ckpt"
    src.write_bytes(data[:cut])
    result, dst = run_on_input(command, src, tmp_path)
    line = assert_refused(result, src, r"truncated|corrupt", leaves=[dst],
                          directory=dst.parent, offset=True)
    assert 0 <= offset_of(line) <= cut


@pytest.mark.parametrize("command", COMMANDS)
def test_crc_trailer_cut_short(tmp_path: Path, command: str) -> None:
    src = tmp_path / "cut.ckpt"
    src.write_bytes(SMALL_CRC.read_bytes()[:-5])
    result, dst = run_on_input(command, src, tmp_path)
    line = assert_refused(result, src, r"truncated|corrupt", leaves=[dst],
                          directory=dst.parent, offset=True)
    # the error points at the (now unrecognisable) trailer, not into the intact records
    assert SMALL_RECORDS[-1] <= offset_of(line) <= len(SMALL_CRC.read_bytes()) - 5


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name, first, reason", [
    ("random.ckpt", None, r"not a MindSpore checkpoint|corrupt"),
    ("random_0a.ckpt", b"\x0a", r"corrupt|truncated"),  # passes the first-byte test
    ("random.safetensors", None, r"header length|not a safetensors|truncated"),
])
def test_random_bytes(tmp_path: Path, command: str, name: str, first: Optional[bytes],
                      reason: str) -> None:
    payload = np.random.default_rng(20240531).bytes(4096)
    src = tmp_path / name
    src.write_bytes((first or b"") + payload)
    result, dst = run_on_input(command, src, tmp_path)
    assert_refused(result, src, reason, leaves=[dst], directory=dst.parent, offset=True)


@pytest.mark.parametrize("seed", range(8))
def test_random_bytes_never_crash(tmp_path: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for size in (1, 7, 8, 9, 17, 64, 1000):
        for name in ("r.ckpt", "r.safetensors"):
            src = tmp_path / name
            src.write_bytes(rng.bytes(size))
            assert_refused(run("inspect", src), src, r".")


@pytest.mark.parametrize("command", COMMANDS)
def test_encrypted_checkpoint(tmp_path: Path, command: str) -> None:
    result, dst = run_on_input(command, SMALL_ENC, tmp_path)
    line = assert_refused(result, SMALL_ENC, r"encrypted", leaves=[dst], directory=dst.parent)
    assert "AES-GCM" in line


@pytest.fixture
def crc_damaged(tmp_path: Path) -> Path:
    src = copy_of(SMALL_CRC, tmp_path / "damaged.ckpt")
    data = bytearray(src.read_bytes())
    start, end = SMALL_A_FP16_DATA
    data[start + 3] ^= 0x40  # one byte of a.fp16's data
    src.write_bytes(bytes(data))
    return src


@pytest.mark.parametrize("command", COMMANDS)
def test_crc_mismatch(tmp_path: Path, crc_damaged: Path, command: str) -> None:
    result, dst = run_on_input(command, crc_damaged, tmp_path)
    line = assert_refused(result, crc_damaged, r"CRC mismatch", leaves=[dst],
                          directory=dst.parent)
    assert "--no-verify-crc" in line  # tells the user the way out


def test_crc_mismatch_no_verify_crc_reads_it(tmp_path: Path, crc_damaged: Path) -> None:
    result = run("inspect", "--no-verify-crc", crc_damaged)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert "not checked" in result.stdout
    for name in ("a.fp16", "b.fp32", "note", "lr"):
        assert re.search(rf"^{re.escape(name)}\s", result.stdout, re.M)
    assert re.search(r"^11 tensors, 96 bytes of data", result.stdout, re.M)

    dst = tmp_path / "out" / "copy.ckpt"
    dst.parent.mkdir()
    result = run("convert", "--quiet", "--no-verify-crc", "--config", "llama2", crc_damaged, dst)
    assert result.exit_code == 0, result.stderr
    assert dst.is_file() and temp_files(dst.parent) == []


@pytest.fixture
def st_crc_damaged(tmp_path: Path) -> Path:
    """A safetensors file with crc_num and one weight byte flipped."""
    src = write_llama_ckpt(tmp_path / "damaged.safetensors", crc=True)
    with formats.open_reader(src, verify_crc=False) as reader:
        info = next(t for t in reader.tensors if t.name.endswith("wq.weight"))
        offset = reader.segments(info)[0].offset
    data = bytearray(src.read_bytes())
    data[offset + 5] ^= 0x01
    src.write_bytes(bytes(data))
    return src


@pytest.mark.parametrize("command", COMMANDS)
def test_safetensors_crc_mismatch(tmp_path: Path, st_crc_damaged: Path, command: str) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "w8.ckpt"
    result = run(command, st_crc_damaged) if command == "inspect" else \
        run("convert", st_crc_damaged, dst)
    line = assert_refused(result, st_crc_damaged, r"CRC mismatch: crc_num says \d+",
                          leaves=[dst], directory=out_dir)
    assert "--no-verify-crc" in line
    result = run("inspect", "--no-verify-crc", st_crc_damaged)
    assert result.exit_code == 0 and "not checked" in result.stdout, result.output


@pytest.mark.parametrize("src_name", ["in.ckpt", "in.safetensors"])
def test_crc_with_safetensors_output(tmp_path: Path, src_name: str) -> None:
    """--crc writes MindSpore's crc_num; the plan's size is the written size, every byte of
    it parsed back (inspect refuses bytes that the header does not describe)."""
    src = write_llama_ckpt(tmp_path / src_name, crc=True)
    dst = tmp_path / "out.safetensors"
    plan = converter.plan_conversion(src, dst, ConvertOptions(load_rules("llama2"), crc=True))
    result = run("convert", "-q", "--crc", src, dst)
    assert result.exit_code == 0, result.stderr
    assert dst.stat().st_size == plan.output_size
    result = run("inspect", dst)
    assert result.exit_code == 0 and re.search(r"CRC 0x[0-9a-f]{8} verified", result.stdout)


# --------------------------------------------------------------------------- lying safetensors

def _f16(name: str, shape: Sequence[int], begin: int, end: int) -> dict:
    return {name: {"dtype": "F16", "shape": list(shape), "data_offsets": [begin, end]}}


def _header(*entries: dict, metadata: Optional[dict] = None) -> dict:
    header: dict = {"__metadata__": metadata} if metadata is not None else {}
    for entry in entries:
        header.update(entry)
    return header


SAFETENSORS_CASES = {
    # name: (header, data bytes, header_len override, reason regex, offset expected)
    "overlap": (_header(_f16("a", [4], 0, 8), _f16("b", [4], 4, 12)), 12, None,
                r"data_offsets.*overlap", True),
    "gap": (_header(_f16("a", [4], 0, 8), _f16("b", [4], 10, 18)), 18, None,
            r"data_offsets.*gap", True),
    "past_end": (_header(_f16("a", [4], 0, 8), _f16("b", [4], 8, 16)), 12, None,
                 r"data_offsets.*past the end", True),
    "wrong_span": (_header(_f16("a", [2, 3], 0, 8)), 8, None,
                   r"data_offsets.*span 8 bytes.*needs 12", True),
    "reversed_offsets": (_header(_f16("a", [0], 8, 0)), 8, None,
                         r"invalid data_offsets", True),
    "trailing_bytes": (_header(_f16("a", [4], 0, 8)), 16, None,
                       r"not described by the header", True),
    "header_len_past_eof": (_header(_f16("a", [4], 0, 8)), 8, 10_000, r"header length", True),
    "header_not_json": (b'{"a": {"dtype": "F16", ', 8, None, r"not valid JSON", True),
    "header_not_object": (b"[1, 2, 3]", 0, None, r"not a JSON object", True),
    "header_not_utf8": (b'{"\xff\xfe": 1}  ', 0, None, r"not valid JSON", True),
    "negative_shape": (_header(_f16("a", [-4], 0, 8)), 8, None, r"invalid shape", True),
    # Two negative dims make a positive size that matched the data: it was accepted.
    "negative_dims": (_header(_f16("a", [-2, -2], 0, 8)), 8, None, r"negative dimension", True),
    "unknown_dtype": (_header({"a": {"dtype": "Q7", "shape": [4], "data_offsets": [0, 4]}}),
                      4, None, r"unknown dtype", None),
    "dtype_not_a_string": (_header({"a": {"dtype": ["F16"], "shape": [4],
                                          "data_offsets": [0, 8]}}), 8, None, r"dtype", None),
    "metadata_not_strings": (_header(_f16("a", [4], 0, 8), metadata={"format": 1}), 8, None,
                             r"__metadata__", True),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", sorted(SAFETENSORS_CASES))
def test_lying_safetensors_header(tmp_path: Path, command: str, case: str) -> None:
    header, data_len, header_len, reason, offset = SAFETENSORS_CASES[case]
    src = write_safetensors(tmp_path / f"{case}.safetensors", header, bytes(range(data_len)),
                            header_len=header_len)
    result, dst = run_on_input(command, src, tmp_path)
    line = assert_refused(result, src, reason, leaves=[dst], directory=dst.parent,
                          offset=offset)
    if offset:
        assert 0 <= offset_of(line) <= src.stat().st_size


def test_consistent_hand_made_safetensors_is_accepted(tmp_path: Path) -> None:
    """The same builder with honest offsets works: the refusals above are about the lies."""
    header = _header(_f16("b", [4], 8, 16), _f16("a", [2, 2], 0, 8), metadata={"format": "ms"})
    src = write_safetensors(tmp_path / "ok.safetensors", header, bytes(16))
    result = run("inspect", src)
    assert result.exit_code == 0, result.stderr
    assert re.search(r"^2 tensors, 16 bytes of data", result.stdout, re.M)


#: Raw header texts (not built with json.dumps, which cannot write most of these lies).
F32_ENTRY = '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
HOSTILE_HEADERS = {
    # name: (header text, data bytes, reason regex)
    "nested_100000_deep": ('{"a":' + "[" * 100_000 + "]" * 100_000 + "}", 0,
                           r"nested too deeply"),
    "nested_in_an_entry": ('{"a":{"dtype":"F32","shape":' + "[" * 100_000 + "]" * 100_000
                           + "}}", 0, r"nested too deeply"),
    "nested_in_metadata": ('{"__metadata__":{"k":' + "[" * 100_000 + "]" * 100_000 + "}}", 0,
                           r"__metadata__ must map strings to strings"),
    "entry_of_a_million_lists": ('{"a":[' + ",".join(["[]"] * 1_000_000) + "]}", 0,
                                 r"takes more than 65536 characters"),
    "shape_of_a_million_dims": ('{"a":{"dtype":"F32","shape":[' + ",".join(["1"] * 1_000_000)
                                + '],"data_offsets":[0,4]}}', 4,
                                r"takes more than 65536 characters"),
    "metadata_of_5000_keys": ('{"__metadata__":{' + ",".join(f'"k{i}":"v"' for i in range(5000))
                              + "}}", 0, r"__metadata__ holds more than 1000 entries"),
    "metadata_value_a_number": ('{"__metadata__":{"format":1}}', 0, r"__metadata__ must map"),
    "offset_of_5000_digits": ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,'
                              + "9" * 5000 + "]}}", 8, r"integer of 5000 digits"),
    "shape_of_400_digits": ('{"a":{"dtype":"F32","shape":[' + "1" * 400
                            + '],"data_offsets":[0,8]}}', 8, r"integer of 400 digits"),
    "negative_huge_offset": ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[-'
                             + "9" * 20 + ",8]}}", 8, r"invalid data_offsets"),
    "offsets_floats": ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0.0,8.0]}}', 8,
                       r"invalid data_offsets"),
    "offsets_three": ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}}', 8,
                      r"invalid data_offsets"),
    "offsets_strings": ('{"a":{"dtype":"F32","shape":[2],"data_offsets":["0","8"]}}', 8,
                        r"invalid data_offsets"),
    "shape_bools": ('{"a":{"dtype":"F32","shape":[true,true],"data_offsets":[0,4]}}', 4,
                    r"invalid shape"),
    "shape_a_dict": ('{"a":{"dtype":"F32","shape":{"0":2},"data_offsets":[0,8]}}', 8,
                     r"invalid shape"),
    "shape_40_dims": ('{"a":{"dtype":"F32","shape":[' + ",".join(["1"] * 40)
                      + '],"data_offsets":[0,4]}}', 4, r"40 dimensions"),
    "zero_dim_beside_huge_dims": ('{"a":{"dtype":"F32","shape":[0,' + ",".join(
        [str(10 ** 19)] * 3) + '],"data_offsets":[0,0]}}', 0, r"too large"),
    "entry_a_number": ('{"a":5}', 0, r"not an object"),
    "entry_null": ('{"a":null}', 0, r"not an object"),
    "duplicate_name": ("{" + F32_ENTRY + "," + F32_ENTRY + "}", 8, r"'a' appears twice"),
    "duplicate_metadata": ('{"__metadata__":{},"__metadata__":{}}', 0,
                           r"__metadata__' appears twice"),
    "metadata_a_list": ('{"__metadata__":["format","ms"]}', 0, r"__metadata__"),
    "metadata_false": ('{"__metadata__":false,' + F32_ENTRY + "}", 8, r"__metadata__"),
    "lone_surrogate_name": ('{"\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8,
                            r"not valid Unicode"),
    "text_after_the_object": ("{" + F32_ENTRY + "} x", 8, r"after the header"),
    "two_objects": ("{" + F32_ENTRY + "}{}", 8, r"after the header"),
    "unterminated": ('{"a":{"dtype":"F32"', 8, r"not valid JSON"),
    "missing_colon": ('{"a" {}}', 0, r"expected ':'"),
    "nan_in_shape": ('{"a":{"dtype":"F32","shape":[NaN],"data_offsets":[0,8]}}', 8,
                     r"invalid shape"),
    "crc_num_not_a_number": ('{"__metadata__":{"crc_num":"0x1f"},' + F32_ENTRY + "}", 8,
                             r"crc_num.*not a CRC-32"),
    "crc_num_too_big": ('{"__metadata__":{"crc_num":"4294967296"},' + F32_ENTRY + "}", 8,
                        r"crc_num.*not a CRC-32"),
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_hostile_safetensors_header(tmp_path: Path, command: str, case: str) -> None:
    """Headers crafted to crash a JSON parser: one error line naming the file, never a
    traceback (RecursionError, ValueError on a long integer, TypeError on a wrong type)."""
    text, data_len, reason = HOSTILE_HEADERS[case]
    src = write_safetensors(tmp_path / f"{case}.safetensors", text.encode(), bytes(data_len))
    result, dst = run_on_input(command, src, tmp_path)
    line = assert_refused(result, src, reason, leaves=[dst], directory=dst.parent)
    assert len(line) < 400, line  # hostile values are quoted briefly


def test_header_over_the_safetensors_limit_is_refused_by_its_length(tmp_path: Path) -> None:
    """100 MiB is over safetensors' 100 MB limit: refused from the length prefix alone."""
    src = tmp_path / "big_header.safetensors"
    with open(src, "wb") as f:
        f.write(struct.pack("<Q", 100 * 1024 * 1024) + b"{")
        f.truncate(8 + 100 * 1024 * 1024)  # sparse: the header is never written, nor read
    assert_refused(run("inspect", src), src, r"header length 104857600 is over the "
                   r"safetensors limit of 100000000 bytes", offset=True)


def _str_record(value: bytes) -> bytes:
    """A .ckpt record holding a str value of these raw bytes (MindSpore: UTF-32-LE)."""
    from ckpt_rtn.formats import ckpt
    info = TensorInfo("memo", dtypes.STRING, (), len(value))
    return ckpt._record_header(b"memo", ckpt._tensor_head(info, len(value)), len(value)) + value


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("length", [1, 2, 3, 5, 4099])
def test_str_record_not_whole_utf32(tmp_path: Path, command: str, length: int) -> None:
    src = tmp_path / "str.ckpt"
    src.write_bytes(SMALL.read_bytes() + _str_record(b"x" * length))
    result, dst = run_on_input(command, src, tmp_path)
    assert_refused(result, src, rf"str value 'memo' holds {length} bytes.*UTF-32",
                   leaves=[dst], directory=dst.parent, offset=True)


def test_empty_str_record_round_trips(tmp_path: Path) -> None:
    src = tmp_path / "empty_str.ckpt"
    src.write_bytes(SMALL.read_bytes() + _str_record(b""))
    dst = tmp_path / "out.ckpt"
    result = run("convert", "-q", "--config", "llama2", src, dst)
    assert result.exit_code == 0, result.stderr
    with formats.open_reader(dst) as reader:
        info = next(t for t in reader.tensors if t.name == "memo")
        assert info.nbytes == 0 and str(reader.read(info)) == ""


def _ckpt_with_dims(dims: Sequence[int], nbytes: int) -> bytes:
    from ckpt_rtn.formats import ckpt
    info = TensorInfo("w", dtypes.FLOAT32, tuple(dims), nbytes)
    return ckpt._record_header(b"w", ckpt._tensor_head(info, nbytes), nbytes) + bytes(nbytes)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("dims, nbytes, reason", [
    ([1] * 40, 4, r"40 dimensions"),
    ([0, 2 ** 62, 2 ** 62], 0, r"too large"),
    ([2 ** 63 - 1, 0], 0, r"too large"),
])
def test_ckpt_shape_numpy_cannot_hold(tmp_path: Path, command: str, dims: List[int],
                                      nbytes: int, reason: str) -> None:
    src = tmp_path / "dims.ckpt"
    src.write_bytes(_ckpt_with_dims(dims, nbytes))
    result, dst = run_on_input(command, src, tmp_path)
    assert_refused(result, src, reason, leaves=[dst], directory=dst.parent, offset=True)


# --------------------------------------------------------------------------- wrong suffix

@pytest.mark.parametrize("command", COMMANDS)
def test_safetensors_named_ckpt(tmp_path: Path, command: str) -> None:
    src = copy_of(FIXTURES / "ms.safetensors", tmp_path / "model.ckpt")
    result, dst = run_on_input(command, src, tmp_path)
    assert_refused(result, src, r"looks like a safetensors file \(name it \.safetensors\)",
                   leaves=[dst], directory=dst.parent)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("fixture, reason", [
    ("small.ckpt", r"looks like a MindSpore \.ckpt checkpoint \(name it \.ckpt\)"),
    ("small_crc.ckpt", r"looks like a MindSpore \.ckpt checkpoint"),
    ("small_enc.ckpt", r"looks like an encrypted MindSpore \.ckpt checkpoint"),
])
def test_ckpt_named_safetensors(tmp_path: Path, command: str, fixture: str, reason: str) -> None:
    src = copy_of(FIXTURES / fixture, tmp_path / "model.safetensors")
    result, dst = run_on_input(command, src, tmp_path)
    assert_refused(result, src, reason, leaves=[dst], directory=dst.parent)


# --------------------------------------------------------------------------- index and manifest

SHARD = "model-00001-of-00001.safetensors"
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def sharded_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hugging Face-style sharded safetensors: one shard and its index."""
    src = tmp_path_factory.mktemp("sharded") / "src"
    src.mkdir()
    rng = np.random.default_rng(5)
    infos = llama_infos()
    with formats.open_writer(src / SHARD, infos, format="safetensors", metadata={}) as writer:
        for info in infos:
            writer.write(info.name, rng.standard_normal(info.shape).astype(np.float16))
    (src / INDEX).write_text(json.dumps({"metadata": {"total_size": 1},
                                         "weight_map": {i.name: SHARD for i in infos}}))
    return src


def _source_with_index(tmp_path: Path, sharded_src: Path, index_text: str) -> Path:
    src = tmp_path / "src"
    shutil.copytree(sharded_src, src)
    (src / INDEX).write_text(index_text)
    return src


@pytest.mark.parametrize("weight_map, reason", [
    ({"model.norm_out.weight": 1}, r"gives tensor 'model.norm_out.weight' the shard 1, which "
                                   r"is not a file name"),
    ({"model.norm_out.weight": [SHARD]}, r"the shard \[.*\], which is not a file name"),
    ({"model.norm_out.weight": None}, r"the shard None, which is not a file name"),
    ({"model.norm_out.weight": {"file": SHARD}}, r"which is not a file name"),
    ([SHARD], r"weight_map is not a JSON object"),
    (None, r"weight_map is not a JSON object"),
    (SHARD, r"weight_map is not a JSON object"),
    ({"model.norm_out.weight": "model-00002-of-00002.safetensors"},
     r"weight_map names 'model-00002-of-00002.safetensors', which is not a \.safetensors or "
     r"\.ckpt file of this directory"),
    # An index naming the safetensors shard and, there too, PyTorch weights.
    ({"model.norm_out.weight": "pytorch_model-00001-of-00002.bin", "x": SHARD},
     r"indexes weights of another framework \('pytorch_model-00001-of-00002\.bin'\), which "
     r"ckpt-rtn does not read, and would copy unquantized beside its output: convert a copy "
     r"of the directory without them"),
])
def test_malformed_index_weight_map(tmp_path: Path, sharded_src: Path, weight_map: object,
                                    reason: str) -> None:
    """Refused before anything is written: once, the shards were converted first, and then
    no --resume could ever complete DST."""
    src = _source_with_index(tmp_path, sharded_src, json.dumps({"weight_map": weight_map}))
    dst = tmp_path / "out"
    result = run("convert", "-q", "--config", "llama2", src, dst)
    assert_refused(result, src / INDEX, reason)
    assert not dst.exists()


@pytest.mark.parametrize("text", ["{", '{"weight_map": ' + "[" * 100_000,
                                  '{"weight_map": {"a": ' + "[" * 80 + "]" * 80 + "}}",
                                  '{"weight_map": {}, "n": ' + "9" * 5000 + "}"])
def test_json_that_is_no_index_is_copied(tmp_path: Path, sharded_src: Path, text: str) -> None:
    """Not JSON, nested past any index's depth, integers past 64 bits: not read as an index
    (copied like any other file), never a traceback."""
    src = _source_with_index(tmp_path, sharded_src, json.dumps({"weight_map": {}}))
    (src / INDEX).unlink()
    (src / "notes.json").write_text(text)
    dst = tmp_path / "out"
    result = run("convert", "-q", "--config", "llama2", src, dst)
    assert result.exit_code == 0, result.output
    assert (dst / "notes.json").read_text() == text


@pytest.mark.parametrize("data, reason", [
    (b'{"metadata": {}, "weight_map": {"model.norm_out.weight": "mod', r"index is not valid JSON "
                                                                      r"\(Unterminated string"),
    (b"\xef\xbb\xbf{}", r"index is not valid JSON \(it starts with a byte-order mark\)"),
    (b'{"weight_map": "\xff"}', r"index is not valid JSON \(not UTF-8 text\)"),
], ids=["truncated", "byte-order-mark", "not-utf8"])
def test_a_file_named_as_an_index_that_cannot_be_read(tmp_path: Path, sharded_src: Path,
                                                      data: bytes, reason: str) -> None:
    """It was copied as any other file (exit 0, and verify agreed): an index that names none
    of the new tensors."""
    src = _source_with_index(tmp_path, sharded_src, "")
    (src / INDEX).write_bytes(data)
    dst = tmp_path / "out"
    assert_refused(run("convert", "-q", "--config", "llama2", src, dst), src / INDEX, reason)
    assert not dst.exists()


def test_other_frameworks_weights_beside_the_shards_are_refused(tmp_path: Path,
                                                                 sharded_src: Path) -> None:
    """Unindexed weights of another framework (a single-file snapshot's pytorch_model.bin,
    Llama 3's original/consolidated.00.pth, an old repo's tf_model.h5) were copied,
    unquantized, beside the quantized shards. Other files of those suffixes are copied: a
    trainer's training_args.bin (no weights) refused the directory, and so did the
    pytorch_model.bin.index.json that huggingface-cli's --exclude '*.bin' leaves, which the
    refusal itself advised."""
    for rel in ("pytorch_model.bin", "original/consolidated.00.pth", "TF_MODEL.H5",
                "flax_model-00001-of-00002.msgpack"):
        src = _source_with_index(tmp_path / rel.replace("/", "_"), sharded_src,
                                 (sharded_src / INDEX).read_text())
        (src / rel).parent.mkdir(exist_ok=True)
        (src / rel).write_bytes(b"PK\x03\x04")
        dst = tmp_path / "out"
        assert_refused(run("convert", "-q", "--config", "llama2", src, dst), src / rel,
                       r"model weights of another framework, which ckpt-rtn does not read, and "
                       r"would copy unquantized beside its output")
        assert not dst.exists()
    # A file of those suffixes from 1 MiB on holds weights or training state, whatever its
    # name (optimizer.pt was copied, at twice the model's size in float32).
    src = _source_with_index(tmp_path / "optimizer", sharded_src,
                             (sharded_src / INDEX).read_text())
    with open(src / "optimizer.pt", "wb") as f:
        f.truncate(1024 * 1024)
    assert_refused(run("convert", "-q", "--config", "llama2", src, tmp_path / "out"),
                   src / "optimizer.pt", r"1048576 bytes in another framework's format "
                   r"\(weights or training state\), which ckpt-rtn does not read")
    src = _source_with_index(tmp_path / "kept", sharded_src, (sharded_src / INDEX).read_text())
    (src / "training_args.bin").write_bytes(b"PK\x03\x04")
    (src / "rng_state.pth").write_bytes(bytes(1024 * 1024 - 1))
    pytorch_index = src / "pytorch_model.bin.index.json"
    pytorch_index.write_text(json.dumps({"weight_map": {"model.norm_out.weight":
                                                        "pytorch_model-00001-of-00001.bin"}}))
    dst = tmp_path / "kept_out"
    result = run("convert", "-q", "--config", "llama2", src, dst)
    assert result.exit_code == 0, result.output
    assert (dst / "training_args.bin").read_bytes() == b"PK\x03\x04"
    assert (dst / pytorch_index.name).read_text() == pytorch_index.read_text()
    assert run("verify", src, dst).exit_code == 0


GOOD_SHA = "0" * 64
BAD_MANIFESTS = {
    "not_json": ("{", r"manifest is not valid JSON"),
    "not_utf8": (b'{"files": "\xff"}', r"not UTF-8"),
    "a_list": ("[]", r"not a JSON object"),
    "no_files": ("{}", r'"files" is not an object'),
    "files_a_list": ('{"files": []}', r'"files" is not an object'),
    "entry_a_number": ('{"files": {"x": 5}}', r"entry 'x' is not an object"),
    "entry_without_size": ('{"files": {"x": {"sha256": "%s"}}}' % GOOD_SHA, r"no valid size"),
    "size_a_string": ('{"files": {"x": {"size": "5", "sha256": "%s"}}}' % GOOD_SHA,
                      r"no valid size"),
    "size_a_bool": ('{"files": {"x": {"size": true, "sha256": "%s"}}}' % GOOD_SHA,
                    r"no valid size"),
    "size_negative": ('{"files": {"x": {"size": -1, "sha256": "%s"}}}' % GOOD_SHA,
                      r"no valid size"),
    "size_of_5000_digits": ('{"files": {"x": {"size": %s, "sha256": "%s"}}}'
                            % ("9" * 5000, GOOD_SHA), r"integer of 5000 digits"),
    "entry_without_sha256": ('{"files": {"x": {"size": 5}}}', r"no valid sha256"),
    "sha256_a_number": ('{"files": {"x": {"size": 5, "sha256": 5}}}', r"no valid sha256"),
    "sha256_short": ('{"files": {"x": {"size": 5, "sha256": "abc"}}}', r"no valid sha256"),
    "tensors_a_dict": ('{"files": {"x": {"size": 5, "sha256": "%s", "tensors": {}}}}' % GOOD_SHA,
                       r"tensor list"),
    "tensor_without_name": ('{"files": {"x": {"size": 5, "sha256": "%s", "tensors": '
                            '[{"nbytes": 4}]}}}' % GOOD_SHA, r"tensor list"),
    "tensor_nbytes_a_string": ('{"files": {"x": {"size": 5, "sha256": "%s", "tensors": '
                               '[{"name": "a", "nbytes": "4"}]}}}' % GOOD_SHA, r"tensor list"),
    "nested_100000_deep": ('{"files": ' + "[" * 100_000 + "]" * 100_000 + "}",
                           r"nested too deeply"),
    "nested_80_deep": ('{"files": {}, "settings": ' + "[" * 80 + "]" * 80 + "}",
                       r"nested more than 64 deep"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_malformed_manifest_on_resume(tmp_path: Path, sharded_src: Path, case: str) -> None:
    text, reason = BAD_MANIFESTS[case]
    dst = tmp_path / "out"
    dst.mkdir()
    manifest = dst / "ckpt-rtn-manifest.json"
    manifest.write_bytes(text if isinstance(text, bytes) else text.encode())
    result = run("convert", "-q", "--resume", "--config", "llama2", sharded_src, dst)
    assert_refused(result, manifest, reason, directory=dst)
    assert sorted(p.name for p in dst.iterdir()) == [manifest.name]


def test_manifest_with_other_settings_quotes_them_briefly(tmp_path: Path,
                                                          sharded_src: Path) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    manifest = dst / "ckpt-rtn-manifest.json"
    manifest.write_text(json.dumps({"files": {}, "settings": {"scheme": "x" * 100_000}}))
    result = run("convert", "-q", "--resume", "--config", "llama2", sharded_src, dst)
    line = assert_refused(result, manifest, r"other settings")
    assert len(line) < 600


# --------------------------------------------------------------------------- output paths

def test_output_exists_is_refused_then_overwritten(tmp_path: Path, llama_copy: Path) -> None:
    dst = tmp_path / "out.ckpt"
    dst.write_bytes(b"previous result")
    os.chmod(dst, 0o400)  # as MindSpore leaves its checkpoints
    result = run("convert", llama_copy, dst)
    assert_refused(result, dst, r"already exists.*--overwrite", directory=tmp_path)
    assert dst.read_bytes() == b"previous result"
    assert stat.S_IMODE(dst.stat().st_mode) == 0o400

    result = run("convert", "--overwrite", llama_copy, dst)
    assert result.exit_code == 0, result.stderr
    assert temp_files(tmp_path) == []
    with formats.open_reader(dst) as reader:
        names = {t.name for t in reader.tensors}
    assert "model.layers.0.attention.wq._handler.weight" in names
    assert "model.layers.0.attention.wq.weight" not in names


def test_output_exists_safetensors(tmp_path: Path, llama_copy: Path) -> None:
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"x")
    assert_refused(run("convert", llama_copy, dst), dst, r"already exists", directory=tmp_path)
    assert dst.read_bytes() == b"x"


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("spelling", ["same", "dot_slash", "absolute_vs_relative", "symlink",
                                      "hardlink"])
def test_input_is_output(tmp_path: Path, llama_copy: Path, monkeypatch: pytest.MonkeyPatch,
                         spelling: str, overwrite: bool) -> None:
    monkeypatch.chdir(tmp_path)
    before = llama_copy.read_bytes()
    src = "in.ckpt"
    if spelling == "same":
        dst = "in.ckpt"
    elif spelling == "dot_slash":
        dst = "./in.ckpt"
    elif spelling == "absolute_vs_relative":
        dst = str(tmp_path / "sub" / ".." / "in.ckpt")
        (tmp_path / "sub").mkdir()
    elif spelling == "symlink":
        dst = "link.ckpt"
        os.symlink("in.ckpt", dst)
    else:
        dst = "hard.ckpt"
        os.link("in.ckpt", dst)
    args = ["convert", src, dst] + (["--overwrite"] if overwrite else [])
    assert_refused(run(*args), dst, r"is the input", directory=tmp_path)
    assert llama_copy.read_bytes() == before
    assert os.path.lexists(dst)


def test_input_is_output_safetensors(tmp_path: Path, llama_copy: Path) -> None:
    src = tmp_path / "m.safetensors"
    assert run("convert", "-q", llama_copy, src).exit_code == 0
    before = src.read_bytes()
    assert_refused(run("convert", "--overwrite", src, src), src, r"is the input",
                   directory=tmp_path)
    assert src.read_bytes() == before


@pytest.mark.parametrize("name", ["out.bin", "out", "out.ckpt.bak", "out.pt"])
def test_unknown_output_suffix(tmp_path: Path, llama_copy: Path, name: str) -> None:
    dst = tmp_path / name
    assert_refused(run("convert", llama_copy, dst), dst, r"output format.*--format",
                   leaves=[dst], directory=tmp_path)


def test_output_directory_missing(tmp_path: Path, llama_copy: Path) -> None:
    dst = tmp_path / "no" / "such" / "dir" / "out.ckpt"
    assert_refused(run("convert", llama_copy, dst), dst, r"does not exist", leaves=[dst])


def test_output_is_a_directory(tmp_path: Path, llama_copy: Path) -> None:
    dst = tmp_path / "outdir.ckpt"
    dst.mkdir()
    assert_refused(run("convert", "--overwrite", llama_copy, dst), dst, r"directory",
                   directory=tmp_path)
    assert dst.is_dir() and list(dst.iterdir()) == []


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", ["missing.ckpt", "missing.safetensors", "missing.bin"])
def test_missing_input(tmp_path: Path, command: str, name: str) -> None:
    src = tmp_path / name
    result, dst = run_on_input(command, src, tmp_path)
    assert_refused(result, src, r"No such file|does not exist|cannot open", leaves=[dst],
                   directory=dst.parent)


@pytest.mark.parametrize("command", COMMANDS)
def test_input_is_a_directory(tmp_path: Path, command: str) -> None:
    src = tmp_path / "model.ckpt"
    src.mkdir()
    result, dst = run_on_input(command, src, tmp_path)
    assert_refused(result, src, r"directory", leaves=[dst], directory=dst.parent)


@pytest.mark.parametrize("case", ["output_is_input", "output_exists"])
def test_dry_run_refuses_what_convert_refuses(tmp_path: Path, llama_copy: Path,
                                              case: str) -> None:
    """--dry-run must not promise an output size for a conversion that would be refused."""
    if case == "output_is_input":
        dst, reason = llama_copy, r"is the input"
    else:
        dst, reason = tmp_path / "old.ckpt", r"already exists"
        dst.write_bytes(b"old")
    real = run("convert", llama_copy, dst)
    assert real.exit_code == 2
    dry = run("convert", "--dry-run", llama_copy, dst)
    assert_refused(dry, dst, reason, directory=tmp_path)


# --------------------------------------------------------------------------- dropped str tensor

@pytest.mark.parametrize("quiet", [False, True])
def test_str_tensor_dropped_from_safetensors_with_warning(tmp_path: Path, quiet: bool) -> None:
    dst = tmp_path / "small.safetensors"
    result = run("convert", *(["--quiet"] if quiet else []), "--config", "llama2", SMALL, dst)
    assert result.exit_code == 0, result.stderr
    assert result.exception is None
    warnings = [l for l in result.stderr.splitlines() if l.startswith("warning:")]
    assert any("'note'" in w and "dropped" in w for w in warnings), result.stderr
    assert temp_files(tmp_path) == []
    with formats.open_reader(dst) as reader:
        names = [t.name for t in reader.tensors]
        assert sorted(names) == sorted(["a.fp16", "b.fp32", "c.bf16", "d.int8", "e.scalar_i64",
                                        "f.bool", "g.f64", "h.u8", "epoch_num", "lr"])
        assert reader.metadata.get("format") == "ms"


def test_str_tensor_kept_in_ckpt_output(tmp_path: Path) -> None:
    dst = tmp_path / "small.ckpt"
    result = run("convert", "--quiet", "--config", "llama2", SMALL, dst)
    assert result.exit_code == 0, result.stderr
    assert "dropped" not in result.stderr


# --------------------------------------------------------------------------- failure mid-write

def _fail_on_call(n: int, exc_factory):
    calls = {"n": 0}
    real = schemes.quantize_rtn

    def fake(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise exc_factory()
        return real(*args, **kwargs)
    return fake, calls


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_failure_mid_write_leaves_nothing(tmp_path: Path, llama_copy: Path,
                                          monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    fake, calls = _fail_on_call(3, lambda: QuantizationError(
        str(llama_copy), "tensor 'x': injected failure"))
    monkeypatch.setattr(schemes, "quantize_rtn", fake)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / f"w8{suffix}"
    result = run("convert", llama_copy, dst)
    assert calls["n"] == 3  # it did fail part-way, after writing two quantized tensors
    assert_refused(result, llama_copy, r"injected failure", leaves=[dst], directory=out_dir)
    assert list(out_dir.iterdir()) == []


def test_failure_mid_overwrite_keeps_the_old_file(tmp_path: Path, llama_copy: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    fake, _ = _fail_on_call(3, lambda: QuantizationError(str(llama_copy), "injected failure"))
    monkeypatch.setattr(schemes, "quantize_rtn", fake)
    dst = tmp_path / "old.ckpt"
    dst.write_bytes(b"old result")
    assert_refused(run("convert", "--overwrite", llama_copy, dst), llama_copy, r"injected",
                   directory=tmp_path)
    assert dst.read_bytes() == b"old result"


def test_interrupt_mid_write_leaves_nothing(tmp_path: Path, llama_copy: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    fake, _ = _fail_on_call(3, KeyboardInterrupt)
    monkeypatch.setattr(schemes, "quantize_rtn", fake)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run("convert", llama_copy, out_dir / "w8.ckpt")
    assert result.exit_code == 130, result.stderr
    assert "interrupted" in result.stderr
    assert list(out_dir.iterdir()) == []


def test_unexpected_error_mid_write_leaves_nothing(tmp_path: Path, llama_copy: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Even a bug (not one of our errors) must not leave a half-written file."""
    fake, _ = _fail_on_call(3, lambda: RuntimeError("boom"))
    monkeypatch.setattr(schemes, "quantize_rtn", fake)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        converter.convert(llama_copy, out_dir / "w8.safetensors",
                          ConvertOptions(load_rules("llama2")))
    assert list(out_dir.iterdir()) == []


def test_non_finite_weight_is_refused(tmp_path: Path) -> None:
    """A selected weight holding inf/NaN: a clear error naming the tensor, no output."""
    src = tmp_path / "nan.ckpt"
    info = TensorInfo.of("model.layers.0.attention.wq.weight", dtypes.FLOAT16, [64, 64])
    weight = np.ones((64, 64), dtype=np.float16)
    weight[5, 7] = np.inf
    with formats.open_writer(src, [info], format="ckpt", metadata={}) as writer:
        writer.write(info.name, weight)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "w8.ckpt"
    assert_refused(run("convert", "--config", "llama2", src, dst), src, r"attention\.wq\.weight",
                   leaves=[dst],
                   directory=out_dir)


@pytest.mark.parametrize("dry_run", [False, True])
@pytest.mark.parametrize("shape", [[64, 0], [0, 64]])
def test_selected_weight_with_a_zero_dimension_is_refused(tmp_path: Path, shape: List[int],
                                                          dry_run: bool) -> None:
    """Nothing to take a min/max of: refused by name, by --dry-run as by convert."""
    src = tmp_path / "zero.safetensors"
    info = TensorInfo.of("model.layers.0.attention.wq.weight", dtypes.FLOAT16, shape)
    with formats.open_writer(src, [info], format="safetensors", metadata={}) as writer:
        writer.write(info.name, np.zeros(shape, np.float16))
    dst = tmp_path / "out.safetensors"
    result = run("convert", "--config", "llama2", *(["--dry-run"] if dry_run else []), src, dst)
    assert_refused(result, src, r"attention\.wq\.weight.*zero dimension", leaves=[dst],
                   directory=tmp_path)


def test_corrupt_input_is_reported_as_such_not_by_its_symptom(tmp_path: Path) -> None:
    """A CRC'd checkpoint whose weight bytes were damaged into NaN: the deferred CRC check
    names the real fault, not the NaN it caused."""
    src = write_llama_ckpt(tmp_path / "crc.ckpt", crc=True)
    raw = bytearray(src.read_bytes())
    with formats.open_reader(src) as reader:
        info = next(t for t in reader.tensors if t.name.endswith("attention.wq.weight"))
        offset = reader.segments(info)[0].offset
    raw[offset:offset + 2] = np.float16(np.nan).tobytes()
    src.write_bytes(bytes(raw))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / "w8.ckpt"
    assert_refused(run("convert", src, dst), src, r"CRC mismatch", leaves=[dst], directory=out_dir)


def test_unwritable_report_is_refused_before_any_output(tmp_path: Path, llama_copy: Path) -> None:
    dst = tmp_path / "w8.ckpt"
    report = tmp_path / "missing" / "report.json"
    assert_refused(run("convert", "--report", report, llama_copy, dst), report,
                   r"report's directory does not exist", leaves=[dst], directory=tmp_path)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_disk_full_is_one_error_line_and_no_file(tmp_path: Path, llama_copy: Path,
                                                 suffix: str) -> None:
    """A write that fails (here: the file size limit, as a full disk would) is reported,
    and the temporary file is removed."""
    dst = tmp_path / "out" / f"w8{suffix}"
    dst.parent.mkdir()
    script = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
              "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000)); "
              "from ckpt_rtn.cli import main; sys.argv[0] = 'ckpt-rtn'; main()")
    result = subprocess.run([sys.executable, "-c", script, "convert", str(llama_copy), str(dst)],
                            capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [f"error: {dst}: cannot write: File too large"]
    assert not dst.exists() and temp_files(dst.parent) == []


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_bias_named_as_the_renamed_bias_is_refused(tmp_path: Path, dry_run: bool) -> None:
    """A quantized layer's bias is renamed `_handler.bias`; an input that already holds that
    name would have two tensors written under it (a traceback from the writer's plan)."""
    weights = {k: v.astype(np.float16) for k, v in llama_weights().items()}
    layer = "model.layers.0.attention.wq"
    rows = weights[layer + ".weight"].shape[0]
    weights[layer + ".bias"] = np.zeros(rows, np.float16)
    weights[layer + "._handler.bias"] = np.ones(rows, np.float16)
    src, dst = tmp_path / "in.safetensors", tmp_path / "out" / "w8.ckpt"
    save_file(weights, src)
    dst.parent.mkdir()
    result = cli("convert", src, dst, *(["--dry-run"] if dry_run else []))
    assert_refused(result, src, rf"tensors '{layer}\._handler\.bias' and '{layer}\.bias' would "
                   rf"both be written as '{layer}\._handler\.bias'", leaves=[dst],
                   directory=dst.parent)


def _ckpt_record(name: str, dtype: dtypes.DType, shape: Sequence[int], data: bytes) -> bytes:
    from ckpt_rtn.formats import ckpt
    info = TensorInfo(name, dtype, tuple(shape), len(data))
    return ckpt._record_header(name.encode(), ckpt._tensor_head(info, len(data)), len(data)) + data


@pytest.mark.parametrize("crc", [False, True], ids=["plain", "crc"])
@pytest.mark.parametrize("dry_run", [False, True], ids=["convert", "dry-run"])
@pytest.mark.parametrize("name, dtype, reason", [
    ("__metadata__", dtypes.FLOAT32, "safetensors keeps its metadata under that name"),
    ("format", dtypes.INT4, "its Int4 mark would take the __metadata__ key of that name"),
    ("crc_num", dtypes.INT4, "its Int4 mark would take the __metadata__ key of that name"),
])
def test_names_safetensors_keeps_for_itself(tmp_path: Path, name: str, dtype: dtypes.DType,
                                            reason: str, dry_run: bool, crc: bool) -> None:
    """A .ckpt tensor with such a name made a safetensors file that the safetensors library
    and ckpt-rtn's own inspect refused (a second __metadata__; a `format` or `crc_num` key
    holding an Int4 mark, or an Int4 tensor read back as Int8), exit 0."""
    src = tmp_path / "odd.ckpt"
    src.write_bytes(SMALL.read_bytes() + _ckpt_record(name, dtype, (2,), bytes(8 if dtype is
                                                                          dtypes.FLOAT32 else 2)))
    dst = tmp_path / "out.safetensors"
    extra = [*(["--dry-run"] if dry_run else []), *(["--crc"] if crc else [])]
    assert_refused(run("convert", "--config", "llama2", src, dst, *extra), dst,
                   re.escape(f"{name!r}: {reason}; write a .ckpt instead"), leaves=[dst],
                   directory=tmp_path)


def test_a_metadata_mark_named_as_an_output_tensor_is_not_carried(tmp_path: Path) -> None:
    """An input's `__metadata__` key naming a tensor the conversion writes (an Int4 mark for
    the codes' name) retyped the int8 codes as Int4: verify refused the fresh output and
    inspect raised a KeyError."""
    weight = "model.layers.0.attention.wq.weight"
    codes = schemes.legacy_names("model.layers.0.attention.wq").weight
    src, dst = tmp_path / "marked.safetensors", tmp_path / "out.safetensors"
    save_file({weight: np.arange(32, dtype=np.float16).reshape(4, 8)}, str(src),
              metadata={codes: "Int4", "note": "kept"})
    assert run("convert", "-q", "--config", "llama2", src, dst).exit_code == 0
    with formats.open_reader(dst) as reader:
        assert {t.name: t.dtype for t in reader.tensors}[codes] is dtypes.INT8
        assert codes not in reader.metadata and reader.metadata["note"] == "kept"
    assert run("verify", src, dst).exit_code == 0


@pytest.mark.parametrize("tensors, metadata, found", [
    ([("a._layer.weight", "I8", [2, 4]), ("a._layer.matmul.weight_scale", "F16", [2])], {},
     "w8a16-ptq"),  # no zero point: inspect's check for one raised KeyError
    ([("a._handler.weight", "I8", [2, 4])], {"a._handler.weight": "Int4"}, "w4a16"),
    ([("a._handler.weight", "I8", [2, 4]), ("a._weight_quantizer.scale", "F16", [])],
     {"a._handler.weight": "Int4"}, "w4a16"),
    ([("a._handler.weight", "I8", [2, 4]), ("a._weight_quantizer.scale", "F16", [0])],
     {"a._handler.weight": "Int4"}, "w4a16"),
    ([("a.weight", "I8", [8]), ("a.weight_scale", "I64", [2, 1])], {}, "w8a8-dynamic"),
], ids=["ptq-without-zp", "int4-without-scale", "int4-0d-scale", "int4-empty-scale",
        "mcore-1d-weight"])
def test_quantized_names_without_their_usual_companions(tmp_path: Path, tensors, metadata,
                                                        found: str) -> None:
    """Names that look quantized, with the scale missing or of an odd shape: KeyError,
    IndexError or ZeroDivisionError tracebacks from inspect and convert."""
    src = tmp_path / "odd.safetensors"
    header = {name: {"dtype": code, "shape": shape, "data_offsets": [0, 0]}
              for name, code, shape in tensors}
    offset = 0
    for entry in header.values():
        size = int(np.prod(entry["shape"])) * {"I8": 1, "F16": 2, "I64": 8}[entry["dtype"]]
        entry["data_offsets"] = [offset, offset + size]
        offset += size
    text = json.dumps({"__metadata__": metadata, **header} if metadata else header).encode()
    src.write_bytes(struct.pack("<Q", len(text)) + text + bytes(offset))
    listed = run("inspect", src)
    assert listed.exit_code == 0, listed.output
    assert f"quantized: {found}" in listed.stdout
    assert_refused(run("convert", src, tmp_path / "out.ckpt"), src,
                   rf"is already quantized \({found}")


def test_a_settings_record_that_is_not_utf32(tmp_path: Path) -> None:
    """A code unit past U+10FFFF in a .ckpt output's settings record: numpy made a str of it
    that `re` then failed on, a SystemError traceback from inspect and verify."""
    src, dst = tmp_path / "in.ckpt", tmp_path / "out.ckpt"
    shutil.copy(SMALL, src)
    assert run("convert", "-q", "--config", "llama2", src, dst).exit_code == 0
    data = bytearray(dst.read_bytes())
    at = data.index('"family"'.encode("utf-32-le"))
    data[at + 2] = 0x11  # the code unit of '"' becomes 0x110022
    dst.write_bytes(bytes(data))
    listed = run("inspect", dst)
    assert listed.exit_code == 0 and "settings: str record 'ckpt_rtn_settings' is not UTF-32 " \
        "text (code point not in range(0x110000)" in listed.stdout, listed.output
    assert_refused(run("verify", src, dst), dst, r"is not UTF-32 text")


def test_dry_run_does_not_take_a_report(tmp_path: Path) -> None:
    """It exited 0 and wrote no report."""
    report = tmp_path / "r.json"
    assert_refused(run("convert", "--dry-run", "--report", report, "--config", "llama2", SMALL,
                       tmp_path / "out.ckpt"), report, "--dry-run converts nothing",
                   leaves=[report])


def test_inspect_escapes_control_characters_in_names(tmp_path: Path) -> None:
    """A name holding a newline printed a row of its own: a fake tensor in the listing."""
    src = tmp_path / "names.safetensors"
    save_file({"x\nfake.weight  Float16  [4096, 4096]  33554432\x1b[31m":
               np.ones(2, np.float16)}, str(src))
    listed = run("inspect", src)
    assert listed.exit_code == 0
    lines = listed.stdout.splitlines()
    assert len(lines) == 3 and lines[1].startswith(
        r"x\x0afake.weight  Float16  [4096, 4096]  33554432\x1b[31m  Float16  [2]")
