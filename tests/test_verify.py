"""`ckpt-rtn verify`: convert's output passes; any byte, tensor, setting or file that is not
what convert writes is named, and unusable input is refused in one line."""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest

from ckpt_rtn import __version__, dtypes
from ckpt_rtn.directory import MANIFEST, sha256_of
from ckpt_rtn.formats import TensorInfo, open_reader, open_writer
from ckpt_rtn.settings import NAME, Settings

from conftest import cli, llama_weights
from test_directory import write_ckpt, write_tp2, write_two_shards

DIMS = dict(layers=1, hidden=128, kv=64, ffn=256, vocab=32)  # two groups of 64 per row
SCHEMES = {
    "w8a16": (),
    "w8a16-ptq": ("--scheme", "w8a16-ptq"),
    "w8a16-ptq-asym": ("--scheme", "w8a16-ptq", "--asymmetric"),
    "w4a16-g64": ("--scheme", "w4a16", "--group-size", "64"),
    "w4a16-g64-asym": ("--scheme", "w4a16", "--group-size", "64", "--asymmetric"),
}
QUANTIZED = "model.layers.0.attention.wq._handler.weight"
COPIED = "model.tok_embeddings.embedding_weight"

Edit = Callable[[TensorInfo, np.ndarray], Optional[Tuple[TensorInfo, np.ndarray]]]


def fp16_weights(seed: int = 0) -> Dict[str, np.ndarray]:
    return {k: v.astype(np.float16) for k, v in llama_weights(seed, **DIMS).items()}


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("verify") / "in.ckpt"
    write_ckpt(path, fp16_weights())
    return path


def convert(src: Path, dst: Path, *args: str) -> Path:
    result = cli("convert", src, dst, "-q", *args)
    assert result.exit_code == 0, result.stderr
    return dst


def verify(src: Path, dst: Path, *args: str):
    return cli("verify", src, dst, *args)


def differences(result) -> List[str]:
    """The difference lines of a failed verify (after its summary line)."""
    assert result.exit_code == 1, (result.stdout, result.stderr)
    lines = result.stdout.splitlines()
    assert " differs from converting " in lines[0]
    assert lines[0].endswith(f": {len(lines) - 1} difference{'' if len(lines) == 2 else 's'}")
    return [line.strip() for line in lines[1:]]


def refused(result, path: Path, *words: str) -> str:
    """A single `error: <path>: ...` line and exit 2."""
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: "), lines
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def flip_byte(path: Path, name: str, at: int = 3) -> None:
    """Invert one byte of a tensor's data in place."""
    with open_reader(path) as reader:
        info = next(t for t in reader.tensors if t.name == name)
        offset = reader.segments(info)[0].offset + at
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0xFF]))


def rewrite(path: Path, dst: Path, edit: Edit = lambda info, array: (info, array),
            metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write `path`'s tensors again, edited, in its format (metadata kept unless given)."""
    with open_reader(path) as reader:
        items = [edit(t, reader.read(t)) for t in reader.tensors]
        kept = dict(reader.metadata) if metadata is None else metadata
        fmt = reader.format
    kept_items = [item for item in items if item is not None]
    with open_writer(dst, [info for info, _ in kept_items], format=fmt, metadata=kept) as writer:
        for info, array in kept_items:
            writer.write(info.name, array)
    return dst


def settings_of(path: Path) -> Settings:
    with open_reader(path) as reader:
        from ckpt_rtn.settings import recorded
        settings = recorded(reader)
    assert settings is not None
    return settings


def with_settings(path: Path, dst: Path, settings: Settings) -> Path:
    """`path` with its recorded settings replaced (a .ckpt record or safetensors metadata)."""
    text = settings.to_json()
    if path.suffix == ".safetensors":
        with open_reader(path) as reader:
            metadata = {**reader.metadata, NAME: text}
        return rewrite(path, dst, metadata=metadata)
    value = np.array(text)

    def edit(info: TensorInfo, array: np.ndarray):
        if info.name == NAME:
            return TensorInfo(NAME, dtypes.STRING, (), value.nbytes), value
        return info, array
    return rewrite(path, dst, edit)


# --------------------------------------------------------------------------- passes


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_convert_output_verifies(src: Path, tmp_path: Path, scheme: str, fmt: str) -> None:
    dst = convert(src, tmp_path / f"out.{fmt}", *SCHEMES[scheme])
    result = verify(src, dst)
    assert result.exit_code == 0, (result.stdout, result.stderr)
    label = settings_of(dst).summary
    assert result.stdout == (f"{dst}: identical to converting {src} ({label}): "
                             f"{26 + (fmt == 'ckpt')} tensors, 7 quantized\n")
    assert label.startswith(f"ckpt-rtn {__version__}: {scheme.split('-a')[0].replace('-g', ' g')}")
    assert verify(src, dst, "-q", "--workers", "1").stdout == ""


def test_crc_and_include_settings_verify(src: Path, tmp_path: Path) -> None:
    dst = convert(src, tmp_path / "out.ckpt", "--crc", "--include", r"w[12]\.weight$",
                  "--blacklist", "w2", "--no-default-blacklist")
    result = verify(src, dst)
    assert result.exit_code == 0, result.stdout
    assert "include w[12]\\.weight$, blacklist w2, CRC): 15 tensors, 1 quantized" in result.stdout


def test_inspect_shows_the_recorded_settings(src: Path, tmp_path: Path) -> None:
    dst = convert(src, tmp_path / "out.safetensors", *SCHEMES["w4a16-g64-asym"])
    lines = cli("inspect", dst).stdout.splitlines()
    assert lines[-1] == (f"written by ckpt-rtn {__version__}: w4a16 g64 asymmetric, llama2 rules, "
                         "blacklist lm_head")
    assert NAME not in lines[-3]  # the metadata summary leaves the settings to their own line


# --------------------------------------------------------------------------- differences


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
@pytest.mark.parametrize("name", [QUANTIZED, COPIED])
def test_a_flipped_byte_names_exactly_that_tensor(src: Path, tmp_path: Path, fmt: str,
                                                  name: str) -> None:
    extra = ("--crc",) if fmt == "ckpt" else ()
    dst = convert(src, tmp_path / f"out.{fmt}", *extra)
    flip_byte(dst, name, at=5)
    assert differences(verify(src, dst)) == [
        f"{name}: bytes differ from convert's, first at byte 5 of "
        f"{128 * 128 if name == QUANTIZED else 32 * 128 * 2}"]


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_renamed_and_dropped_tensors(src: Path, tmp_path: Path, fmt: str) -> None:
    dst = convert(src, tmp_path / f"out.{fmt}")
    scale = "model.layers.0.feed_forward.w2._weight_quantizer.scale"

    def edit(info: TensorInfo, array: np.ndarray):
        if info.name == scale:
            return None
        if info.name == COPIED:
            return replace(info, name="model.embedding"), array
        return info, array
    bad = rewrite(dst, tmp_path / f"bad.{fmt}", edit)
    found = differences(verify(src, bad))
    assert found == [f"{COPIED}: missing (convert writes Float16 [32, 128] (8192 bytes))",
                     f"{scale}: missing (convert writes Float16 [128] (256 bytes))",
                     "model.embedding: extra Float16 [32, 128] (8192 bytes): convert does not "
                     "write it"]


def test_dtype_and_order_differences(src: Path, tmp_path: Path) -> None:
    dst = convert(src, tmp_path / "out.ckpt")
    zp = "model.layers.0.attention.wk._weight_quantizer.zp_neg"

    def widen(info: TensorInfo, array: np.ndarray):
        if info.name == zp:
            return TensorInfo.of(zp, dtypes.FLOAT32, info.shape), array.astype(np.float32)
        return info, array
    found = differences(verify(src, rewrite(dst, tmp_path / "wide.ckpt", widen)))
    assert found == [f"{zp}: Float32 [64] (256 bytes) where convert writes Float16 [64] "
                     "(128 bytes)"]

    with open_reader(dst) as reader:
        items = [(t, reader.read(t)) for t in reader.tensors]
    items[0], items[1] = items[1], items[0]
    swapped = tmp_path / "swapped.ckpt"
    with open_writer(swapped, [t for t, _ in items], format="ckpt", metadata={}) as writer:
        for info, array in items:
            writer.write(info.name, array)
    assert differences(verify(src, swapped)) == [
        f"order: {items[0][0].name} is where convert writes {items[1][0].name}: the tensors are "
        "not in convert's order"]


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_output_of_other_settings_than_recorded(src: Path, tmp_path: Path, fmt: str) -> None:
    """A symmetric conversion whose record claims asymmetric: same names and shapes, so only
    the bytes of quantized tensors can tell."""
    dst = convert(src, tmp_path / f"sym.{fmt}", "--scheme", "w8a16-ptq")
    claimed = replace(settings_of(dst), symmetric=False)
    edited = with_settings(dst, tmp_path / f"edited.{fmt}", claimed)
    found = differences(verify(src, edited))
    assert found and all(line.startswith("model.layers.0.") and "bytes differ" in line
                         for line in found), found
    assert any(line.startswith("model.layers.0.attention.wq._layer.matmul.weight_zp:")
               for line in found)
    # and a blacklist the record leaves out: the layer would be quantized
    claimed = replace(settings_of(dst), blacklist=())
    found = differences(verify(src, with_settings(dst, tmp_path / f"nolist.{fmt}", claimed)))
    assert "lm_head.weight: extra Float16 [32, 128] (8192 bytes): convert does not write it" \
        in found
    assert any(line.startswith("lm_head._layer.weight: missing") for line in found)


def test_output_of_another_source(src: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.ckpt"
    write_ckpt(other, fp16_weights(seed=1))
    dst = convert(other, tmp_path / "out.ckpt")
    found = differences(verify(src, dst))
    named = {line.split(": ")[0] for line in found}
    assert {QUANTIZED, COPIED, "lm_head.weight"} <= named
    assert "model.norm_out.weight" not in named  # all ones in both sources: the same bytes


def test_format_bytes_outside_the_tensors(src: Path, tmp_path: Path) -> None:
    """Same tensors, metadata and data, other framing: still not what convert writes."""
    dst = convert(src, tmp_path / "out.safetensors")
    raw = dst.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.dumps(json.loads(raw[8:8 + length]), indent=1).encode()
    header += b" " * (-len(header) % 8)
    spaced = tmp_path / "spaced.safetensors"
    spaced.write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + length:])
    assert differences(verify(src, spaced)) == [
        "header: its bytes differ from the header convert writes (same tensors and metadata, "
        "other spacing or key order)"]

    crc = convert(src, tmp_path / "crc.ckpt", "--crc")
    body = crc.read_bytes()
    no_trailer = tmp_path / "no_trailer.ckpt"
    no_trailer.write_bytes(body[:-17])
    flipped = tmp_path / "bad_trailer.ckpt"
    flipped.write_bytes(body[:-1] + bytes([body[-1] ^ 1]))
    assert differences(verify(src, no_trailer)) == [
        "CRC trailer: missing; the settings say convert writes one"]
    assert differences(verify(src, flipped))[0].startswith("CRC trailer: ")



def test_safetensors_crc_num_is_verified(src: Path, tmp_path: Path) -> None:
    """--crc safetensors output verifies; a wrong crc_num (same length, so the header still
    parses) is named, with --no-verify-crc too: it is part of what convert writes."""
    dst = convert(src, tmp_path / "crc.safetensors", "--crc")
    assert verify(src, dst).exit_code == 0
    raw = dst.read_bytes()
    stored = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])["__metadata__"]["crc_num"]
    wrong = str((int(stored) + 1) % 10 ** len(stored)).rjust(len(stored), "1")
    bad = tmp_path / "bad_crc.safetensors"
    bad.write_bytes(raw.replace(f'"crc_num":"{stored}"'.encode(),
                                f'"crc_num":"{wrong}"'.encode(), 1))
    assert differences(verify(src, bad, "--no-verify-crc")) == [
        f"metadata 'crc_num': '{wrong}' where convert writes '{stored}'"]


# --------------------------------------------------------------------------- refused


def test_output_without_settings_is_refused(src: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copy(src, tmp_path / "copy.ckpt"))
    refused(verify(src, copy), copy, "records no ckpt-rtn settings",
            "not written by ckpt-rtn, or by a version before")
    dst = convert(src, tmp_path / "out.ckpt")
    stripped = rewrite(dst, tmp_path / "stripped.ckpt",
                       lambda info, array: None if info.name == NAME else (info, array))
    refused(verify(src, stripped), stripped, "records no ckpt-rtn settings")


@pytest.mark.parametrize("text,words", [
    ("{not json", ["not valid JSON"]),
    ("[" * 100000, ["nested"]),
    ('{"tool": "other"}', ["written by 'other', not ckpt-rtn"]),
    ("SETTINGS", []),  # replaced below by valid settings with one field broken
])
def test_malformed_settings_are_refused(src: Path, tmp_path: Path, text: str,
                                        words: List[str]) -> None:
    dst = convert(src, tmp_path / "out.safetensors")
    if text == "SETTINGS":
        data = settings_of(dst).to_dict()
        data["linear_weights"] = [{"pattern": "(", "layout": "out_in"}]
        text, words = json.dumps(data), ["invalid regular expression"]
    with open_reader(dst) as reader:
        metadata = {**reader.metadata, NAME: text}
    bad = rewrite(dst, tmp_path / "bad.safetensors", metadata=metadata)
    refused(verify(src, bad), bad, "recorded ckpt-rtn settings", *words)
    assert cli("inspect", bad).exit_code == 0  # inspect shows the problem instead


def test_settings_of_another_version_are_refused(src: Path, tmp_path: Path) -> None:
    dst = convert(src, tmp_path / "out.ckpt")
    older = with_settings(dst, tmp_path / "older.ckpt", replace(settings_of(dst), version="0.0.9"))
    refused(verify(src, older), older, "written by ckpt-rtn 0.0.9", "verify it with ckpt-rtn 0.0.9")


def test_file_against_directory_is_refused(src: Path, tmp_path: Path) -> None:
    refused(verify(src, tmp_path), tmp_path, "SRC is a file, so DST must be one too")


# --------------------------------------------------------------------------- directories


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Path]:
    """Two ranks, row-parallel wo/w2 split along input channels (strategy file), converted."""
    root = tmp_path_factory.mktemp("sharded")
    src = root / "tp2"
    write_tp2(src)
    (src / "README").write_text("tp2 Llama\n")
    result = cli("convert", src, root / "out", "-q", "--scheme", "w8a16-ptq", "--asymmetric")
    assert result.exit_code == 0, result.stderr
    return src, root / "out"


@pytest.fixture()
def out_copy(sharded, tmp_path: Path) -> Path:
    return Path(shutil.copytree(sharded[1], tmp_path / "out"))


def test_sharded_directory_verifies(sharded, tmp_path: Path) -> None:
    src, out = sharded
    result = verify(src, out)
    assert result.exit_code == 0, result.stdout
    assert result.stdout.endswith(": 2 shards (54 tensors, 14 quantized), 2 copied files, "
                                  "0 indexes, sizes and sha256 as the manifest records\n")
    # Without the strategy file, convert would give the input-split weights per-rank scales.
    alone = Path(shutil.copytree(src, tmp_path / "tp2"))
    os.unlink(alone / "strategy" / "ckpt_strategy.ckpt")
    found = differences(verify(alone, out))
    assert "strategy/ckpt_strategy.ckpt: extra file: convert does not write it" in found
    assert "rank_1/net.ckpt: model.layers.0.attention.wo._layer.matmul.weight_scale: bytes " \
           "differ from convert's, first at byte 0 of 128" in found


def test_sharded_safetensors_with_index_verifies(tmp_path: Path) -> None:
    def save(path: Path, arrays: Dict[str, np.ndarray]) -> None:  # MindSpore-free
        with open_writer(path, [TensorInfo.of(k, dtypes.FLOAT16, v.shape)
                                for k, v in arrays.items()], format="safetensors",
                         metadata={"format": "pt"}) as writer:
            for k, v in arrays.items():
                writer.write(k, v)

    src = tmp_path / "hf"
    write_two_shards(src, fp16_weights(), save, {"total_size": 1})
    out = tmp_path / "out"
    assert cli("convert", src, out, "-q", "--scheme", "w4a16", "--group-size", "64",
               "--config", "llama2").exit_code == 0
    assert verify(src, out).exit_code == 0
    rewritten = json.loads((out / "model.safetensors.index.json").read_text())
    assert NAME not in rewritten["weight_map"]
    rewritten["weight_map"][COPIED] = "model-00002-of-00002.safetensors"
    (out / "model.safetensors.index.json").write_text(json.dumps(rewritten, indent=2) + "\n")
    found = differences(verify(src, out))
    assert found[-1] == ("model.safetensors.index.json: is not the index convert writes "
                         "(weight_map or total_size)")


def test_tampered_shard_is_named_with_its_tensor(sharded, out_copy: Path) -> None:
    src, _ = sharded
    shard = out_copy / "rank_1" / "net.ckpt"
    weight = "model.layers.0.attention.wo._layer.weight"
    flip_byte(shard, weight)
    found = differences(verify(src, out_copy))
    assert len(found) == 2
    assert found[0].startswith("rank_1/net.ckpt: sha256 ") and "the manifest records" in found[0]
    assert found[1] == f"rank_1/net.ckpt: {weight}: bytes differ from convert's, first at byte 3 " \
                       "of 2048"


def test_manifest_sha_mismatch_and_copied_files(sharded, out_copy: Path) -> None:
    src, _ = sharded
    manifest = json.loads((out_copy / MANIFEST).read_text())
    manifest["files"]["rank_0/net.ckpt"]["sha256"] = "0" * 64
    (out_copy / "README").write_text("tp2 Llama!\n")  # a copied file, its entry updated to match
    manifest["files"]["README"] = {"size": 11, "sha256": sha256_of(str(out_copy / "README"))}
    (out_copy / MANIFEST).write_text(json.dumps(manifest))
    (out_copy / "extra.txt").write_text("x")
    os.mkfifo(out_copy / "rank_0" / "pipe")  # reported, never opened: it would block
    os.unlink(out_copy / "strategy" / "ckpt_strategy.ckpt")
    assert sorted(differences(verify(src, out_copy))) == [
        "README: differs from the source's copy, first at byte 9",
        "extra.txt: extra file: convert does not write it",
        "rank_0/net.ckpt: sha256 " + sha256_of(str(out_copy / "rank_0" / "net.ckpt"))
        + "; the manifest records " + "0" * 64,
        "rank_0/pipe: is a FIFO (named pipe), not a file convert writes",
        "strategy/ckpt_strategy.ckpt: missing"]


def test_a_symlinked_shard_or_rank_is_reported_not_followed(sharded, out_copy: Path,
                                                             tmp_path: Path) -> None:
    """convert writes regular files: a link to the right bytes is still not its output."""
    src, _ = sharded
    moved = Path(shutil.move(str(out_copy / "rank_1" / "net.ckpt"), tmp_path / "net.ckpt"))
    os.symlink(moved, out_copy / "rank_1" / "net.ckpt")
    os.symlink(out_copy / "rank_0", out_copy / "rank_9")
    assert differences(verify(src, out_copy)) == [
        "rank_1/net.ckpt: is a symbolic link, not a file convert writes",
        "rank_9: is a symbolic link, not a file convert writes"]


def test_a_shard_with_an_unknown_dtype_is_a_difference_not_a_refusal(tmp_path: Path) -> None:
    """A damaged output is reported (exit 1), whatever its damage: an unknown dtype made
    verify refuse the whole directory (exit 2) instead."""
    from safetensors.numpy import save_file
    src, out = tmp_path / "hf", tmp_path / "out"
    write_two_shards(src, fp16_weights(), lambda path, arrays: save_file(arrays, str(path)),
                     {"total_size": 1})
    assert cli("convert", src, out, "-q", "--config", "llama2").exit_code == 0
    shard = out / "model-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    at = data.index(b'"I8"')
    data[at:at + 4] = b'"I9"'  # the same length: the header still parses
    shard.write_bytes(bytes(data))
    result = verify(src, out)
    assert result.exit_code == 1, result.stderr
    found = differences(result)
    assert found[0].startswith("model-00001-of-00002.safetensors: sha256 ")
    assert found[1].startswith("model-00001-of-00002.safetensors: file: not a readable "
                               "checkpoint: ")
    assert "unknown dtype 'I9'" in found[1]


def test_directory_without_manifest_is_refused(sharded, out_copy: Path) -> None:
    src, _ = sharded
    (out_copy / MANIFEST).write_text('{"files": []}')
    refused(verify(src, out_copy), out_copy / MANIFEST, "unreadable manifest",
            '"files" is not an object')
    os.unlink(out_copy / MANIFEST)
    refused(verify(src, out_copy), out_copy, "has no ckpt-rtn-manifest.json")


def test_verify_peak_rss_is_bounded_and_independent_of_model_size(tmp_path: Path) -> None:
    from test_memory import MEASURE, make
    largest = make(tmp_path / "small.ckpt", layers=2)
    make(tmp_path / "large.ckpt", layers=16)
    peaks = {}
    for name in ("small", "large"):
        dst = convert(tmp_path / f"{name}.ckpt", tmp_path / f"{name}_out.ckpt")
        command = [sys.executable, "-m", "ckpt_rtn", "verify", "-q", str(tmp_path / f"{name}.ckpt"),
                   str(dst)]
        out = subprocess.run([sys.executable, "-c", MEASURE, *command], check=True,
                             capture_output=True, text=True).stdout
        peaks[name] = int(out.strip().splitlines()[-1])
    assert peaks["large"] <= 1.5 * 2**30 + 3 * largest
    # 8x the layers: the peak may move by a few tensors, not by the model.
    assert peaks["large"] - peaks["small"] < 3 * largest, (peaks, largest)


def _hf_two_shards(tmp_path: Path) -> Tuple[Path, Path, Dict[str, List[str]]]:
    from safetensors.numpy import save_file
    src, out = tmp_path / "hf", tmp_path / "out"
    shards = write_two_shards(src, fp16_weights(), lambda path, arrays: save_file(
        arrays, str(path)), {"total_size": 1})
    assert cli("convert", src, out, "-q", "--config", "llama2").exit_code == 0
    return src, out, shards


def test_a_source_convert_refuses_is_refused(tmp_path: Path) -> None:
    """SRC's second shard holds a tensor under the name w8a16 gives a scale of the first's:
    convert refuses that directory, but its parts convert, and a DST assembled from them
    (or made by an older version) was called identical, its index pointing a loader at the
    stray tensor."""
    from safetensors.numpy import load_file, save_file
    src, out, shards = _hf_two_shards(tmp_path)
    first, second = shards
    layer = shards[first][-1][:-len(".weight")]
    arrays = load_file(str(src / second))
    arrays[f"{layer}._weight_quantizer.scale"] = np.full(4, 7, np.float16)
    save_file(arrays, str(src / second))
    refused(verify(src, out), src / second, "would both be written as "
            f"'{layer}._weight_quantizer.scale'")


def test_the_whole_manifest_is_checked(tmp_path: Path) -> None:
    """Only its files' sizes, digests and tensor lists were: edited sources, settings with a
    key convert does not write, a tool or version, an entry with fields of another kind,
    shapes as floats, entries in another order all verified as identical."""
    src, out, shards = _hf_two_shards(tmp_path)
    original = json.loads((out / MANIFEST).read_text())
    first = next(iter(shards))

    def edited(change: Callable[[dict], None]) -> List[str]:
        manifest = json.loads(json.dumps(original))
        change(manifest)
        (out / MANIFEST).write_text(json.dumps(manifest))
        return [d for d in differences(verify(src, out)) if d.startswith(MANIFEST)]

    def floats(m: dict) -> None:
        m["files"][first]["tensors"][0]["shape"] = [float(x) for x in
                                                    m["files"][first]["tensors"][0]["shape"]]
    cases = [
        (lambda m: m.update(sources={"x": [1, 2]}), "sources do not name the source's files"),
        (lambda m: m["settings"].update(extra=1), "settings {"),
        (lambda m: m.update(tool="other"), "tool 'other' where convert writes 'ckpt-rtn'"),
        (lambda m: m["files"]["model.safetensors.index.json"].update(tensors=[]),
         "the entry of model.safetensors.index.json holds 'size', 'sha256', 'tensors'"),
        (floats, f"the tensors it lists for {first} are not those convert writes"),
        (lambda m: m.update(files=dict(reversed(list(m["files"].items())))),
         "lists the files in another order than convert"),
        (lambda m: m.update(extra=1), "holds the keys 'tool', 'version', 'settings', 'sources', "
                                      "'files', 'extra' where convert writes"),
    ]
    for change, what in cases:
        found = edited(change)
        assert len(found) == 1 and what in found[0], (what, found)
    (out / MANIFEST).write_text(json.dumps(original))
    assert verify(src, out).exit_code == 0


def test_what_verify_cannot_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An output directory it cannot list hid the files in it (identical, exit 0); a source
    file it cannot read was a traceback; SRC given as DST was identical."""
    src, out, _ = _hf_two_shards(tmp_path)
    (out / "hidden").mkdir()
    (out / "hidden" / "extra.safetensors").write_bytes(b"x")
    real = os.scandir

    def unreadable(path="."):  # what a directory of mode 000 gives a user other than root
        if os.path.basename(os.fspath(path)) == "hidden":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", unreadable)
    found = differences(verify(src, out))
    monkeypatch.undo()
    assert found == ["hidden: is a directory that cannot be listed (Permission denied), not a "
                     "file convert writes"], found
    shutil.rmtree(out / "hidden")
    # A source file that cannot be read (deleted meanwhile, or not readable to this user):
    # a traceback from verify's byte comparison. An output file that cannot be: different.
    from ckpt_rtn.errors import FormatError
    from ckpt_rtn.verify import _files_differ
    with pytest.raises(FormatError, match="cannot read: Is a directory"):
        _files_differ(str(tmp_path), str(src / "model.safetensors.index.json"))
    assert _files_differ(str(src / "model.safetensors.index.json"), str(tmp_path)) == 0
    refused(verify(src, src), src, "is SRC itself")


def test_oversized_patterns_manifests_and_unfinished_parts(tmp_path: Path) -> None:
    """A pattern too large for `re` was a traceback (OverflowError, RecursionError); a
    manifest was read whole, however large (2 GB of memory for a 1 GiB one); a DST of --part
    runs alone was 'not an output directory'."""
    src, out, _ = _hf_two_shards(tmp_path)
    real = re.compile

    def deep(pattern: str, *args: object):  # what groups nested thousands deep raise, where
        if pattern == "(" * 3:                # the recursion limit is the interpreter's own
            raise RecursionError("maximum recursion depth exceeded")
        return real(pattern, *args)
    for pattern in ("a{4294967296}", "(" * 3):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(re, "compile", deep)
            result = cli("convert", src, tmp_path / "o", "--include", pattern)
        assert result.exit_code == 2 and result.stderr.startswith("error: --include: regular "
                                                                  "expression '"), result.output
        assert result.stderr.endswith("is too large to compile\n")
    with open(out / MANIFEST, "r+b") as f:
        f.truncate(300 * 1024 * 1024)  # sparse: never read
    refused(verify(src, out), out / MANIFEST, "manifest of 314572800 bytes is larger than")
    parts = tmp_path / "parts"
    assert cli("convert", src, parts, "-q", "--config", "llama2", "--part", "0/2").exit_code == 0
    refused(verify(src, parts), parts, "holds the manifests of --part runs only")
