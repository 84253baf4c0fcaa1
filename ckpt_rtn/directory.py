"""Convert a directory of checkpoint shards, keeping its layout, resumably.

Two layouts are common: MindSpore's distributed `rank_<N>/<name>.ckpt` (plus
strategy files, which are protobuf too and are copied untouched), and
Hugging Face-style sharded safetensors (`*.safetensors` plus an index JSON
whose `weight_map` names each tensor's shard, rewritten here for the renamed
and added tensors). Any `.ckpt`/`.safetensors` file is a shard, any JSON with
a `weight_map` is an index, everything else is copied.

Per-output-channel quantization needs only the rows a shard holds, so a
rank's slice of a weight split by rows quantizes exactly as those rows of
the full weight do. A weight split along its input channels (row-parallel
wo/w2 under tensor parallelism) is different: its per-channel max spans all
ranks. When the directory holds MindSpore strategy files saying so, a first
pass takes those maxima over every rank, so each slice gets the scale the
whole weight would, as Golden Stick's replicated scale is.

Every output file is written under a temporary name and renamed once
complete; after each file `ckpt-rtn-manifest.json` records it (size, sha256,
tensors), so an interrupted run restarted with `resume=True` skips what is
already done and verified.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from . import __version__, converter
from .errors import CkptRtnError, ConfigError, FormatError, OutputError, UnsupportedError
from .formats import format_from_suffix, open_reader, untrusted_json
from .formats.atomic import TEMP_PATTERN, copy_atomic, write_bytes_atomic
from .formats.strategy import Layout, is_strategy_file, read_strategy
from .rtn import RowBounds, row_bounds
from .rules import OUT_IN, RuleChoice, Rules
from .schemes import Scheme

MANIFEST = "ckpt-rtn-manifest.json"
#: An index JSON takes some 100 bytes per tensor; a larger .json is not read as one.
_MAX_INDEX_SIZE = 256 * 1024 * 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class DirectoryResult:
    converted: List[converter.Result] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    copied: List[str] = field(default_factory=list)
    indexes: List[str] = field(default_factory=list)
    #: Weights split along input channels, whose scales were taken over all ranks.
    global_scales: List[str] = field(default_factory=list)
    input_size: int = 0
    output_size: int = 0
    seconds: float = 0.0


@dataclass
class _Layout:
    shards: List[str]
    indexes: List[str]
    others: List[str]


def convert_directory(src: str, dst: str, rules: "Rules | RuleChoice", *,
                      scheme: Scheme = converter.DEFAULT_SCHEME, overwrite: bool = False,
                      resume: bool = False, crc: bool = False, verify_crc: bool = True,
                      workers: Optional[int] = None, stats: bool = False,
                      progress: Optional[converter.ProgressFn] = None) -> DirectoryResult:
    """Convert every shard under `src` into the same layout under `dst`.

    Without an explicit family, it is detected from the first shard's names.
    """
    started = time.perf_counter()
    _check_directories(src, dst, overwrite, resume)
    layout = _scan(src)
    if not layout.shards:
        raise FormatError(src, "no .ckpt or .safetensors checkpoint files in this directory")
    with open_reader(os.path.join(src, layout.shards[0]), verify_crc=False) as first:
        rules = converter.resolve_rules(rules, first)
    settings = _settings(rules, scheme, crc)
    strategies = [rel for rel in layout.others if is_strategy_file(os.path.join(src, rel))]
    os.makedirs(dst, exist_ok=True)
    manifest = _load_manifest(dst, settings) if resume else _new_manifest(settings)
    _remove_stale_temp_files(dst)
    result = DirectoryResult(input_size=sum(os.path.getsize(os.path.join(src, rel))
                                            for rel in layout.shards + layout.others))
    total = sum(os.path.getsize(os.path.join(src, rel)) for rel in layout.shards)

    def shard_progress(advance: int, _total: int) -> None:
        if progress is not None:
            progress(advance, total)

    pending = [rel for rel in layout.shards if not _is_done(manifest, rel, os.path.join(dst, rel))]
    bounds = (_bounds_over_ranks(src, layout.shards, strategies, rules, scheme)
              if pending and strategies else {})
    result.global_scales = sorted(bounds)
    for rel in layout.shards:
        out = os.path.join(dst, rel)
        size = os.path.getsize(os.path.join(src, rel))
        if rel not in pending:
            result.skipped.append(rel)
            shard_progress(size, total)
            continue
        os.makedirs(os.path.dirname(out), exist_ok=True)
        converted = converter.convert(os.path.join(src, rel), out, rules, overwrite=True, crc=crc,
                                      verify_crc=verify_crc, workers=workers, stats=stats,
                                      scheme=scheme, row_bounds=bounds, progress=shard_progress)
        result.converted.append(converted)
        plan = converted.plan  # the bar counts file bytes; convert reported tensor bytes
        shard_progress(size - sum(s.source.nbytes for s in plan.steps)
                       - sum(t.nbytes for t in plan.dropped), total)
        _record(dst, manifest, rel, out, [
            {"name": t.name, "dtype": t.dtype.name, "shape": list(t.shape), "nbytes": t.nbytes}
            for t in converted.plan.outputs])
    for rel in layout.others:
        out = os.path.join(dst, rel)
        if _is_done(manifest, rel, out):
            result.skipped.append(rel)
            continue
        os.makedirs(os.path.dirname(out), exist_ok=True)
        copy_atomic(os.path.join(src, rel), out)
        result.copied.append(rel)
        _record(dst, manifest, rel, out, None)
    for rel in layout.indexes:
        _rewrite_index(src, dst, rel, manifest)
        _record(dst, manifest, rel, os.path.join(dst, rel), None)
        result.indexes.append(rel)
    result.output_size = sum(entry["size"] for entry in manifest["files"].values())
    result.seconds = time.perf_counter() - started
    return result


def _bounds_over_ranks(src: str, shards: List[str], strategies: List[str], rules: Rules,
                       scheme: Scheme) -> Dict[str, RowBounds]:
    """Per-output-channel (min, max) over all ranks, for weights split along input channels."""
    layouts: Dict[str, Layout] = {}
    for rel in strategies:
        layouts.update(read_strategy(os.path.join(src, rel)))
    bounds: Dict[str, RowBounds] = {}
    for rel in shards:
        with open_reader(os.path.join(src, rel), verify_crc=False) as reader:
            for info in reader.tensors:
                selection = rules.select(info)
                layout = layouts.get(info.name)
                if selection is None or layout is None or selection.layout is None:
                    continue
                in_dim = 1 if selection.layout == OUT_IN else 0
                if not layout.splits(in_dim):
                    continue
                if layout.splits(1 - in_dim):
                    raise UnsupportedError(os.path.join(src, rel), f"tensor {info.name!r} is split "
                                           "along both dimensions; convert a merged checkpoint")
                if scheme.spec.group_size:
                    continue  # groups of input channels stay within a slice (checked per shard)
                weight = converter.out_in_view(reader.read(info), selection)
                low, high = row_bounds(weight, converter.float_format(info.dtype))
                if info.name in bounds:
                    low = np.minimum(bounds[info.name][0], low)
                    high = np.maximum(bounds[info.name][1], high)
                bounds[info.name] = (low, high)
    return bounds


def _check_directories(src: str, dst: str, overwrite: bool, resume: bool) -> None:
    src_real, dst_real = os.path.realpath(src), os.path.realpath(dst)
    if src_real == dst_real:
        raise OutputError(dst, "output is the input directory; write to another path")
    if dst_real.startswith(src_real + os.sep):
        raise OutputError(dst, "output directory is inside the input directory")
    if os.path.exists(dst):
        if not os.path.isdir(dst):
            raise OutputError(dst, "input is a directory, so the output must be one too")
        if os.listdir(dst) and not (overwrite or resume):
            raise OutputError(dst, "already exists and is not empty; pass --resume to finish "
                              "an interrupted run, or --overwrite")
    elif not os.path.isdir(os.path.dirname(os.path.abspath(dst))):
        raise OutputError(dst, f"directory {os.path.dirname(os.path.abspath(dst))} does not exist")


def _scan(src: str) -> _Layout:
    layout = _Layout([], [], [])
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, src)
            if TEMP_PATTERN.fullmatch(name):
                continue
            if format_from_suffix(name) is not None and not is_strategy_file(path):
                layout.shards.append(rel)
            elif name.endswith(".json") and _is_index(path):
                layout.indexes.append(rel)
            elif name != MANIFEST:
                layout.others.append(rel)
    return layout


def _is_index(path: str) -> bool:
    """A JSON object with a `weight_map` (Hugging Face's sharded index); a malformed one is
    refused by name when rewritten, not copied as if it were some other file."""
    try:
        data = untrusted_json.load_file(path, "index", max_size=_MAX_INDEX_SIZE)
    except CkptRtnError:
        return False
    return isinstance(data, dict) and "weight_map" in data


def _settings(rules: Rules, scheme: Scheme, crc: bool) -> Dict[str, object]:
    return {"scheme": scheme.name, "group_size": scheme.spec.group_size,
            "symmetric": scheme.spec.symmetric, "family": rules.family,
            "linear_weights": [[p.regex.pattern, p.layout] for p in rules.linear_weights],
            "blacklist": list(rules.blacklist), "crc": crc}


def _new_manifest(settings: Dict[str, object]) -> Dict[str, object]:
    return {"tool": "ckpt-rtn", "version": __version__, "settings": settings, "files": {}}


def _load_manifest(dst: str, settings: Dict[str, object]) -> Dict[str, object]:
    path = os.path.join(dst, MANIFEST)
    if not os.path.exists(path):
        return _new_manifest(settings)
    manifest = untrusted_json.load_file(path, "manifest", error=ConfigError)
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise ConfigError(path, f"unreadable manifest ({problem}); remove it (and the output) "
                          "to start over")
    assert isinstance(manifest, dict)
    if manifest.get("settings") != settings:
        raise ConfigError(path, "was written with other settings "
                          f"({untrusted_json.brief(manifest.get('settings'))}); resume with the "
                          "same options, or start over in a new directory")
    return manifest


def _manifest_problem(manifest: object) -> Optional[str]:
    """What is wrong with a manifest's shape (None if nothing): --resume trusts its entries."""
    if not isinstance(manifest, dict):
        return "not a JSON object"
    files = manifest.get("files")
    if not isinstance(files, dict):
        return '"files" is not an object'
    for rel, entry in files.items():
        where = f"entry {untrusted_json.brief(rel)}"
        if not isinstance(entry, dict):
            return f"{where} is not an object"
        size, digest = entry.get("size"), entry.get("sha256")
        if type(size) is not int or size < 0:
            return f"{where} has no valid size"
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            return f"{where} has no valid sha256"
        tensors = entry.get("tensors")
        if tensors is None:
            continue
        if not isinstance(tensors, list) or not all(
                isinstance(t, dict) and isinstance(t.get("name"), str)
                and type(t.get("nbytes")) is int and t["nbytes"] >= 0 for t in tensors):
            return f"{where} has a tensor list without names and sizes"
    return None


def _is_done(manifest: Dict[str, object], rel: str, out: str) -> bool:
    """The output exists and is byte for byte what the manifest recorded."""
    entry = manifest["files"].get(rel)  # type: ignore[union-attr]
    if entry is None or not os.path.isfile(out) or os.path.getsize(out) != entry["size"]:
        return False
    return sha256_of(out) == entry["sha256"]


def _record(dst: str, manifest: Dict[str, object], rel: str, out: str,
            tensors: Optional[List[Dict[str, object]]]) -> None:
    """Add an output file to the manifest and save it (atomically)."""
    entry: Dict[str, object] = {"size": os.path.getsize(out), "sha256": sha256_of(out)}
    if tensors is not None:
        entry["tensor_count"] = len(tensors)
        entry["tensors"] = tensors
    manifest["files"][rel] = entry  # type: ignore[index]
    write_bytes_atomic(os.path.join(dst, MANIFEST), json.dumps(manifest, indent=1).encode())


def _rewrite_index(src: str, dst: str, rel: str, manifest: Dict[str, object]) -> None:
    """Point every output tensor at its shard; total_size becomes the output's tensor bytes."""
    path = os.path.join(src, rel)
    index = untrusted_json.load_file(path, "index", max_size=_MAX_INDEX_SIZE)
    old_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(old_map, dict):
        raise FormatError(path, "weight_map is not a JSON object (tensor name -> shard file)")
    for name, shard in old_map.items():
        if not isinstance(shard, str):
            raise FormatError(path, f"weight_map gives tensor {untrusted_json.brief(name)} the "
                              f"shard {untrusted_json.brief(shard)}, which is not a file name")
    assert isinstance(index, dict)
    files: Dict[str, Dict[str, object]] = manifest["files"]  # type: ignore[assignment]
    weight_map: Dict[str, str] = {}
    total = 0
    for shard in sorted(set(old_map.values())):
        entry = files.get(os.path.normpath(os.path.join(os.path.dirname(rel), shard)))
        if entry is None or "tensors" not in entry:
            raise FormatError(path, f"weight_map names {shard!r}, which is not a converted shard")
        for tensor in entry["tensors"]:  # type: ignore[union-attr]
            weight_map[tensor["name"]] = shard
            total += tensor["nbytes"]
    index["weight_map"] = dict(sorted(weight_map.items()))
    metadata = index.get("metadata")
    index["metadata"] = {**(metadata if isinstance(metadata, dict) else {}), "total_size": total}
    write_bytes_atomic(os.path.join(dst, rel), json.dumps(index, indent=2).encode() + b"\n")


def _remove_stale_temp_files(dst: str) -> None:
    """Temporary files of a killed run: never valid output, safe to delete."""
    for root, _, files in os.walk(dst):
        for name in files:
            if TEMP_PATTERN.fullmatch(name):
                os.unlink(os.path.join(root, name))


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 * 1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()
