"""Fuzzing: structured mutations of real checkpoints, indexes and manifests.

Every parser of untrusted bytes must end in success or one of our own errors
(a CkptRtnError, which the CLI prints as one line): never a traceback. The
seeds are MindSpore 2.10's files (shared/fixtures) and files our writers
make; the mutations are those an adversary or a broken disk makes: byte
flips, truncations, insertions, varint and length edits, and, in JSON,
swapped types, huge and negative numbers, deep nesting, duplicate keys and
odd names. Examples are derandomized (the same every run) and sized for CI:
the whole file takes well under a minute on two cores.
"""
from __future__ import annotations

import copy
import itertools
import json
import shutil
import struct
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ckpt_rtn import directory, dtypes, formats
from ckpt_rtn.directory import convert_directory
from ckpt_rtn.errors import CkptRtnError
from ckpt_rtn.formats import TensorInfo, protowire
from ckpt_rtn.options import ConvertOptions
from ckpt_rtn.rules import load_rules
from ckpt_rtn.schemes import get_scheme
from ckpt_rtn.settings import Settings

from conftest import FIXTURES

_FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.filter_too_much])


def fuzz(examples: int) -> settings:
    """Derandomized (the same examples every run), no deadline, `examples` of them."""
    return settings(_FUZZ, max_examples=examples)


#: A sentinel string in a JSON document, replaced in its text by raw JSON that
#: json.dumps cannot write (100 000-deep nesting, integers of thousands of digits).
RAW = "\x00raw:"
_counter = itertools.count()


# --------------------------------------------------------------------------- seeds

def _llama_like(path: Path, fmt: str, crc: bool) -> bytes:
    """A small checkpoint of our own: Llama-named weights, several dtypes, a chunked tensor."""
    rng = np.random.default_rng(7)
    arrays = {"model.layers.0.attention.wq.weight": rng.standard_normal((8, 16)).astype(np.float16),
              "model.layers.0.attention_norm.weight": np.ones(16, np.float32),
              "model.norm_out.weight": np.ones(16, np.float16),
              "lm_head.weight": rng.standard_normal((4, 16)).astype(np.float16),
              "step": np.int64(3).reshape(()), "mask": np.array([True, False])}
    kinds = {np.dtype("float16"): dtypes.FLOAT16, np.dtype("float32"): dtypes.FLOAT32,
             np.dtype("int64"): dtypes.INT64, np.dtype("bool"): dtypes.BOOL}
    infos = [TensorInfo.of(k, kinds[a.dtype], a.shape) for k, a in arrays.items()]
    if fmt == "ckpt":  # 100-byte chunks: the wq weight spans several records
        writer = formats.ckpt.CkptWriter(path, infos, crc=crc, chunk_size=100)
    else:
        writer = formats.open_writer(path, infos, format=fmt, metadata={"format": "ms"}, crc=crc)
    with writer:
        for name, array in arrays.items():
            writer.write(name, array)
    return path.read_bytes()


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, List[bytes]]:
    """Well-formed files by format: MindSpore's fixtures and our writers' output."""
    root = tmp_path_factory.mktemp("seeds")
    ours = {f"{fmt}{'_crc' if crc else ''}": _llama_like(root / f"s{crc}.{fmt}", fmt, crc)
            for fmt in formats.FORMATS for crc in (False, True)}
    return {
        "ckpt": [(FIXTURES / n).read_bytes() for n in ("small.ckpt", "small_crc.ckpt",
                                                       "int4.ckpt", "small_enc.ckpt")]
        + [ours["ckpt"], ours["ckpt_crc"]],
        "safetensors": [(FIXTURES / "ms.safetensors").read_bytes(), ours["safetensors"],
                        ours["safetensors_crc"]],
    }


# --------------------------------------------------------------------------- mutations

HUGE_INTS = st.one_of(st.integers(-2 ** 70, 2 ** 70),
                      st.sampled_from([0, -1, 2 ** 31, 2 ** 32 - 1, 2 ** 63, 2 ** 64, 10 ** 20]))
#: Varint values: int64 and past it (more than 10 bytes).
VARINTS = st.one_of(st.integers(-2 ** 63, 2 ** 70), st.sampled_from([0, 1, 2 ** 63, 2 ** 64]))
NAMES = st.one_of(st.text(max_size=12), st.sampled_from(["", "__metadata__", "\ud800", "a\udfff",
                                                         "x" * 300, "crc_num", "a\x00b"]))


def hostile_values(depth: int = 2) -> st.SearchStrategy[object]:
    """JSON values of every type, with extremes (sentinels become raw text, see RAW)."""
    scalars = st.one_of(HUGE_INTS, st.floats(), st.booleans(), st.none(), NAMES,
                        st.integers(21, 6000).map(lambda n: f"{RAW}{'9' * n}"),
                        st.integers(50, 100_000).map(lambda n: f"{RAW}{'[' * n}{']' * n}"))
    if depth == 0:
        return scalars
    return st.one_of(scalars, st.lists(hostile_values(depth - 1), max_size=40),
                     st.dictionaries(NAMES, hostile_values(depth - 1), max_size=4))


def dumps(pairs: List[Tuple[str, object]]) -> str:
    """A JSON object from (key, value) pairs, duplicates kept, sentinels made raw."""
    text = "{" + ",".join(json.dumps(k) + ":" + json.dumps(v) for k, v in pairs) + "}"
    while RAW in text:  # json.dumps wrote the sentinel as '"\u0000raw:..."'
        start = text.index(json.dumps(RAW)[:-1])
        end = text.index('"', start + 1)
        text = text[:start] + text[start + len(json.dumps(RAW)) - 1:end] + text[end + 1:]
    return text


@st.composite
def json_edits(draw: st.DrawFn, document: Dict[str, object]) -> str:
    """`document` with one structural edit somewhere inside, as JSON text."""
    doc = copy.deepcopy(document)
    node: object = doc
    for _ in range(draw(st.integers(0, 3))):  # walk down to some container
        if isinstance(node, dict) and node:
            child = node[draw(st.sampled_from(sorted(node)))]
        elif isinstance(node, list) and node:
            child = node[draw(st.integers(0, len(node) - 1))]
        else:
            break
        if not isinstance(child, (dict, list)):
            break
        node = child
    op = draw(st.sampled_from(["replace", "delete", "add", "swap_type"]))
    if isinstance(node, dict) and node:
        key = draw(st.sampled_from(sorted(node)))
        if op == "delete":
            del node[key]
        elif op == "add":
            node[draw(NAMES)] = draw(hostile_values())
        elif op == "swap_type":
            node[key] = [node[key]] if not isinstance(node[key], list) else {"0": node[key]}
        else:
            node[key] = draw(hostile_values())
    elif isinstance(node, list) and node:
        i = draw(st.integers(0, len(node) - 1))
        if op == "delete":
            del node[i]
        else:
            node[i] = draw(hostile_values())
    pairs = list(doc.items())
    if pairs and draw(st.booleans()):  # a key twice
        pairs.insert(draw(st.integers(0, len(pairs))), draw(st.sampled_from(pairs)))
    return dumps(pairs)


def _varints(data: bytes) -> List[Tuple[int, int]]:
    """(start, end) of what follows each protobuf key byte, read as a varint."""
    found = []
    for i, byte in enumerate(data[:-1]):
        if byte in (0x08, 0x0A, 0x12, 0x1A):
            try:
                found.append((i + 1, protowire.decode_varint(data, i + 1, len(data))[1]))
            except protowire.WireError:
                pass
    return found


@st.composite
def byte_edits(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` with a few flips, a cut, an insertion, a deletion or a varint rewritten."""
    raw = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "varint", "varint"]))
        if not raw:
            break
        at = draw(st.integers(0, len(raw) - 1))
        if op == "flip":
            raw[at] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del raw[at:]
        elif op == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del raw[at:at + draw(st.integers(1, 16))]
        else:
            spans = _varints(bytes(raw))
            if spans:
                start, end = draw(st.sampled_from(spans))
                raw[start:end] = protowire.encode_varint(draw(VARINTS))
    return bytes(raw)


@st.composite
def safetensors_edits(draw: st.DrawFn, data: bytes) -> bytes:
    """A safetensors file whose header JSON was edited, its length prefix kept or fixed."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    text = draw(json_edits(header)).encode("utf-8", "surrogatepass")
    prefix = draw(st.sampled_from(["fixed", "fixed", "kept", "off_by"]))
    length = {"fixed": len(text), "kept": n,
              "off_by": len(text) + draw(st.integers(-16, 16))}[prefix]
    return struct.pack("<Q", max(length, 0)) + text + data[8 + n:]


def write(root: Path, suffix: str, data: bytes) -> Path:
    path = root / f"f{next(_counter)}{suffix}"
    path.write_bytes(data)
    return path


def read_everything(path: Path, verify_crc: bool, defer_crc: bool) -> None:
    """What the converter does with an input: index, read every tensor, finish."""
    with formats.open_reader(path, verify_crc=verify_crc, defer_crc=defer_crc) as reader:
        for info in reader.tensors:
            reader.read(info)
        reader.finish()


def only_our_errors(run, *args) -> None:  # type: ignore[no-untyped-def]
    """Run the parser: success or our error, counted by kind (--hypothesis-show-statistics)."""
    try:
        run(*args)
    except CkptRtnError as exc:
        event(f"refused: {type(exc).__name__}: {' '.join(exc.reason.split()[:3])}")
    else:
        event("accepted")


# --------------------------------------------------------------------------- readers

@pytest.mark.parametrize("fmt", formats.FORMATS)
@fuzz(1000)
@given(data=st.data(), verify_crc=st.booleans(), defer_crc=st.booleans())
def test_readers_on_mutated_bytes(tmp_path_factory: pytest.TempPathFactory,
                                  seeds: Dict[str, List[bytes]], fmt: str, data: st.DataObject,
                                  verify_crc: bool, defer_crc: bool) -> None:
    seed = data.draw(st.sampled_from(seeds[fmt]))
    path = write(tmp_path_factory.getbasetemp(), f".{fmt}", data.draw(byte_edits(seed)))
    try:
        only_our_errors(read_everything, path, verify_crc, defer_crc)
    finally:
        path.unlink()


@fuzz(1500)
@given(data=st.data(), defer_crc=st.booleans())
def test_safetensors_reader_on_edited_headers(tmp_path_factory: pytest.TempPathFactory,
                                              seeds: Dict[str, List[bytes]], data: st.DataObject,
                                              defer_crc: bool) -> None:
    seed = data.draw(st.sampled_from(seeds["safetensors"]))
    path = write(tmp_path_factory.getbasetemp(), ".safetensors",
                 data.draw(safetensors_edits(seed)))
    try:
        only_our_errors(read_everything, path, True, defer_crc)
    finally:
        path.unlink()


@fuzz(300)
@given(data=st.data())
def test_a_file_under_the_wrong_suffix(tmp_path_factory: pytest.TempPathFactory,
                                       seeds: Dict[str, List[bytes]], data: st.DataObject) -> None:
    """Either reader on the other format's bytes (mutated or not)."""
    fmt = data.draw(st.sampled_from(formats.FORMATS))
    other = "ckpt" if fmt == "safetensors" else "safetensors"
    seed = data.draw(st.sampled_from(seeds[other]))
    if data.draw(st.booleans()):
        seed = data.draw(byte_edits(seed))
    path = write(tmp_path_factory.getbasetemp(), f".{fmt}", seed)
    try:
        only_our_errors(read_everything, path, True, False)
    finally:
        path.unlink()


# --------------------------------------------------------------------------- index and manifest

SHARD = "model-00001-of-00001.safetensors"
TENSORS = [{"name": "a.weight", "dtype": "Float16", "shape": [2, 2], "nbytes": 8},
           {"name": "b", "dtype": "Int8", "shape": [], "nbytes": 1}]
SETTINGS = Settings.of(load_rules("llama2"), get_scheme(), crc=False, out_format=None)


#: The input files' stamps a manifest_document records ([size, modification time]).
SOURCES = {SHARD: [9, 1_700_000_000_000_000_000], "config.json": [2, 1_700_000_000_000_000_000]}


def manifest_document() -> Dict[str, object]:
    return {"tool": "ckpt-rtn", "version": "0", "settings": SETTINGS.to_dict(),
            "sources": copy.deepcopy(SOURCES),
            "files": {SHARD: {"size": 9, "sha256": "0" * 64, "tensor_count": 2,
                              "tensors": copy.deepcopy(TENSORS)},
                      "config.json": {"size": 2, "sha256": "f" * 64}}}


@st.composite
def json_files(draw: st.DrawFn, document: Dict[str, object]) -> bytes:
    """`document` edited as JSON (three times in four), or its text edited as bytes."""
    if draw(st.integers(0, 3)):
        return draw(json_edits(document)).encode("utf-8", "surrogatepass")
    return draw(byte_edits(json.dumps(document, indent=1).encode()))


@fuzz(800)
@given(text=json_files({"metadata": {"total_size": 9, "format": "pt"},
                        "weight_map": {"a.weight": SHARD, "b": SHARD}}))
def test_index_rewriting(tmp_path_factory: pytest.TempPathFactory, text: bytes) -> None:
    root = tmp_path_factory.getbasetemp() / f"index{next(_counter)}"
    (root / "src").mkdir(parents=True)
    (root / "dst").mkdir()
    (root / "src" / "model.safetensors.index.json").write_bytes(text)
    try:
        if directory._is_index(str(root / "src" / "model.safetensors.index.json")):
            only_our_errors(directory._rewrite_index, str(root / "src"), str(root / "dst"),
                            "model.safetensors.index.json", manifest_document())
    finally:
        shutil.rmtree(root)


@fuzz(800)
@given(text=json_files(manifest_document()))
def test_manifest_loading(tmp_path_factory: pytest.TempPathFactory, text: bytes) -> None:
    root = tmp_path_factory.getbasetemp() / f"manifest{next(_counter)}"
    root.mkdir()
    (root / directory.MANIFEST).write_bytes(text)
    (root / SHARD).write_bytes(bytes(9))

    def load_and_use() -> None:
        manifest = directory._load_manifest(str(root), SETTINGS, SOURCES)
        for rel in list(manifest["files"]):  # type: ignore[arg-type]
            directory._is_done(manifest, rel, str(root / SHARD))
        directory._record(str(root), manifest, "new.bin", str(root / SHARD), TENSORS)

    try:
        only_our_errors(load_and_use)
    finally:
        shutil.rmtree(root)


# --------------------------------------------------------------------------- directory walker

@fuzz(200)
@given(data=st.data())
def test_directory_of_mutated_files(tmp_path_factory: pytest.TempPathFactory,
                                    seeds: Dict[str, List[bytes]], data: st.DataObject) -> None:
    """A source directory of rank shards, an index and a strategy-like file, each perhaps
    mutated: scanned and converted, it ends in success or our error."""
    root = tmp_path_factory.getbasetemp() / f"tree{next(_counter)}"
    src = root / "src"
    for rank in (0, 1):
        (src / f"rank_{rank}").mkdir(parents=True)
    files = {"rank_0/net.ckpt": seeds["ckpt"][-2], "rank_1/net.safetensors": seeds["safetensors"][1],
             "model.safetensors.index.json": json.dumps(
                 {"weight_map": {"lm_head.weight": "rank_1/net.safetensors"}}).encode(),
             "strategy.ckpt": b"\x08\x00\x1a\x0c\x0a\x04wq.w\x12\x04\x28\x00\x30\x00"}
    for rel, content in files.items():
        if data.draw(st.booleans()):
            content = data.draw(byte_edits(content)) if not rel.endswith(".json") \
                else data.draw(json_files(json.loads(content)))
        (src / rel).write_bytes(content)
    try:
        directory.scan(str(src))
        only_our_errors(convert_directory, str(src), str(root / "dst"),
                        ConvertOptions(load_rules("llama2")))
    finally:
        shutil.rmtree(root)


def test_the_seeds_are_valid(seeds: Dict[str, List[bytes]], tmp_path: Path) -> None:
    """Unmutated, every seed reads (the encrypted fixture is refused as such): the mutations
    are what the other tests exercise."""
    for fmt, files in seeds.items():
        for data in files:
            path = write(tmp_path, f".{fmt}", data)
            if data[:4] == bytes.fromhex("d85e3a7f"):
                with pytest.raises(CkptRtnError, match="encrypted"):
                    read_everything(path, True, False)
            else:
                read_everything(path, True, False)
