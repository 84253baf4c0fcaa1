"""Prove that an output is exactly what `convert` makes of its input.

An output records the settings it was made with (settings.py). `verify`
rebuilds the rules and the scheme from them, plans the conversion of the
source as `convert` would, and streams the source through the same
per-tensor step (`converter.convert_step`), comparing each result with the
output's bytes instead of writing it: a few tensors in memory at a time,
like `convert`. Before any data moves, the output's tensor list is compared
with the plan (missing, extra, dtype/shape, order) and, for safetensors,
its metadata. When all of that matches, the bytes between the tensors (the
`.ckpt` record headers, the safetensors header), the file size and the CRC
trailer are compared as well, so a clean verdict means byte-identical.

A directory is checked file by file against its manifest (size, sha256,
tensor lists), and the manifest against the one `convert` writes; a SRC
`convert` refuses is refused here too. Every shard as above, with the whole-weight row bounds
`convert` uses when strategy files are present; copied files byte for byte
against the source's; each rewritten index against the one `convert` writes.
A w8a8-dynamic output's quant_model_description.json (beside a file, or in
the directory) is compared with the one `convert` writes for the planned
tensors.
"""
from __future__ import annotations

import json
import os
import stat
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Set, Tuple

import numpy as np

from . import __version__, converter, description, directory, formats, fp8, paths
from .errors import FormatError, UnsupportedError
from .formats import ckpt, crc32, safetensors
from .formats.strategy import is_strategy_file
from .formats.tensor import TensorInfo, TensorReader, raw_bytes
from .formats.untrusted_json import brief
from .options import ConvertOptions
from .rtn import RowBounds
from .settings import TOOL, Settings, recorded

#: Bytes compared at a time, so a large tensor's comparison needs no third buffer of its size.
_BLOCK = 16 * 1024 * 1024


@dataclass(frozen=True)
class Difference:
    """One way the output is not what `convert` writes: `where` is a tensor, file or part."""

    where: str
    what: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass
class Verdict:
    settings: Settings
    differences: List[Difference] = field(default_factory=list)
    tensors: int = 0
    quantized: int = 0
    shards: int = 0
    copied: int = 0
    indexes: int = 0


def verify_file(src: str, dst: str, *, verify_crc: bool = True, workers: Optional[int] = None,
                progress: Optional[converter.ProgressFn] = None) -> Verdict:
    """Compare `dst` with the conversion of `src` under the settings `dst` records."""
    with formats.open_reader(dst, verify_crc=False) as out:
        settings = recorded(out)
        if settings is None:
            raise FormatError(dst, f"records no {TOOL} settings: it was not written by {TOOL}, "
                              f"or by a version before {TOOL} recorded them; convert its source "
                              "again to get a file verify can check")
        _check_version(settings, dst)
        if settings.format is None:
            raise FormatError(dst, f"its recorded {TOOL} settings name no output format")
        plan, differences = _compare_file(src, out, settings, verify_crc=verify_crc,
                                          workers=workers, progress=progress)
    if plan.scheme.mcore:
        differences += _check_description(description.path_beside(dst),
                                          description.render(plan.outputs))
        differences += [Difference(os.path.basename(other), "is another quantization "
                                   "description beside the output; MindFormers refuses a "
                                   "folder holding two")
                        for other in description.others_beside(dst)]
    return Verdict(settings, differences, tensors=len(plan.outputs),
                   quantized=len(plan.quantized))


def verify_directory(src: str, dst: str, *, verify_crc: bool = True,
                     workers: Optional[int] = None,
                     progress: Optional[converter.ProgressFn] = None) -> Verdict:
    """Compare the directory `dst` with the conversion of `src` under its manifest's settings."""
    manifest_path = os.path.join(dst, directory.MANIFEST)
    manifest, settings = _read_manifest(manifest_path)
    files: Dict[str, Dict[str, object]] = manifest["files"]  # type: ignore[assignment]
    _check_version(settings, manifest_path)
    layout = directory.scan(src)
    if not layout.shards:
        raise FormatError(src, "no .ckpt or .safetensors checkpoint files in this directory")
    verdict = Verdict(settings)
    if settings.format is not None:
        verdict.differences.append(Difference(directory.MANIFEST, "settings name the output "
                                              f"format {settings.format}; convert records none "
                                              "for a directory"))
    scheme = settings.build_scheme()
    links = directory.fp8_links(src, layout)
    # What convert refuses of this SRC, verify does too: no DST can be its output (one made
    # of parts, or by an older version, could still agree file by file).
    rules = settings.build_rules()
    directory.check_source(src, layout, rules,
                           ConvertOptions(rules=rules, scheme=scheme, crc=settings.crc), links)
    expected = layout.outputs(scheme.mcore)
    present = _check_files(expected, files, dst, verdict.differences)
    verdict.differences += _check_manifest(manifest, expected, settings, layout)
    planned = _check_shards(src, dst, layout, files, present, settings, verdict, links,
                            verify_crc=verify_crc, workers=workers, progress=progress)
    for rel in (rel for rel in layout.others if rel in present):
        config = directory.copied_config(os.path.join(src, rel))
        if config is not None:
            if not _holds(os.path.join(dst, rel), config):
                verdict.differences.append(Difference(rel, "is not the config.json convert "
                                                      "writes (without the FP8 "
                                                      "quantization_config)"))
        elif (at := _files_differ(os.path.join(src, rel), os.path.join(dst, rel))) is not None:
            verdict.differences.append(Difference(rel, "differs from the source's copy, first "
                                                  f"at byte {at}"))
        verdict.copied += 1
    for rel in (rel for rel in layout.indexes if rel in present):
        if not _holds(os.path.join(dst, rel), directory.rewritten_index(src, rel, planned)):
            verdict.differences.append(Difference(rel, "is not the index convert writes "
                                                  "(weight_map or total_size)"))
        verdict.indexes += 1
    if scheme.mcore and description.NAME in present:
        verdict.differences += _check_description(
            os.path.join(dst, description.NAME), directory.description_of(layout.shards, planned))
    return verdict


def _holds(path: str, expected: bytes) -> bool:
    """Whether the regular file at `path` (an output's) holds exactly `expected`, reading no
    more of it than those bytes and one; False if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read(len(expected) + 1) == expected
    except OSError:
        return False


def _check_manifest(manifest: Dict[str, object], expected: List[str], settings: Settings,
                    layout: "directory.SourceTree") -> List[Difference]:
    """The manifest's other parts against what convert writes: its keys, tool and version,
    settings (as written, not only as read), the source files it was made from (their
    sizes: a copy of SRC has other modification times), each entry's fields, and the
    files' order."""
    found: List[str] = []
    written = directory.new_manifest(
        settings, layout.stamps())
    if set(manifest) != set(written):  # in any order: a resumed run's may differ
        found.append(f"holds the keys {', '.join(map(brief, manifest))} where convert writes "
                     f"{', '.join(written)}")
    for key in ("tool", "version", "settings"):
        if key in manifest and manifest[key] != written[key]:
            found.append(f"{key} {brief(manifest[key])} where convert writes "
                         f"{brief(written[key])}")
    sources = manifest.get("sources")
    if not isinstance(sources, dict) or sorted(sources) != sorted(layout.sizes) or any(
            not isinstance(stamp, list) or len(stamp) != 2 or stamp[0] != layout.sizes[rel]
            for rel, stamp in sources.items()):
        found.append("sources do not name the source's files with their sizes")
    files: Dict[str, Dict[str, object]] = manifest["files"]  # type: ignore[assignment]
    known = set(expected)
    if [rel for rel in files if rel in known] != [rel for rel in expected if rel in files]:
        found.append("lists the files in another order than convert")
    shards = set(layout.shards)
    for rel, entry in files.items():
        keys = ["size", "sha256", *(["tensor_count", "tensors"] if rel in shards else [])]
        if set(entry) != set(keys):
            found.append(f"the entry of {rel} holds {', '.join(map(brief, entry))} where "
                         f"convert writes {', '.join(keys)}")
    return [Difference(directory.MANIFEST, what) for what in found]


def _check_description(path: str, expected: bytes) -> List[Difference]:
    """A quant_model_description.json against the one convert writes: only a regular file
    is opened (a FIFO would block, a link lead anywhere), and no more of it read than the
    expected bytes and one."""
    try:
        mode = os.stat(path, follow_symlinks=False).st_mode
        if not stat.S_ISREG(mode):
            return [Difference(description.NAME, f"is {paths.kind(mode)}, not a file convert "
                                                  "writes")]
        same = _holds(path, expected)
    except FileNotFoundError:
        return [Difference(description.NAME, f"missing: convert writes it beside the output "
                                              f"({path})")]
    except OSError as exc:
        return [Difference(description.NAME, f"cannot be read: {exc.strerror}")]
    if not same:
        return [Difference(description.NAME, "is not the description convert writes (a tensor "
                                             "missing, extra, or with another method)")]
    return []


def _check_files(expected: List[str], files: Dict[str, Dict[str, object]], dst: str,
                 differences: List[Difference]) -> Set[str]:
    """Which files are there, against `expected` and the manifest's size and sha256 of each;
    returns the regular files present (only those are read further)."""
    present, irregular = _files_under(dst)
    differences += [Difference(rel, f"is {kind}, not a file convert writes")
                    for rel, kind in sorted(irregular.items())]
    differences += [Difference(rel, "missing") for rel in expected
                    if rel not in present and rel not in irregular]
    differences += [Difference(rel, "extra file: convert does not write it")
                    for rel in sorted(present - set(expected))]
    known = set(expected)
    differences += [Difference(directory.MANIFEST, f"lists {rel}, which convert does not write")
                    for rel in files if rel not in known]
    for rel in expected:
        if rel in present:
            differences += _check_entry(files.get(rel), rel, os.path.join(dst, rel))
    return present


def _check_shards(src: str, dst: str, layout: "directory.SourceTree",
                  files: Dict[str, Dict[str, object]], present: Set[str], settings: Settings,
                  verdict: Verdict, links: directory.Fp8Links, *, verify_crc: bool,
                  workers: Optional[int],
                  progress: Optional[converter.ProgressFn]) -> Dict[str, Dict[str, object]]:
    """Every shard, with the row bounds convert takes over all ranks when strategy files are
    there; returns each one's planned tensors, as the manifest lists them, for the indexes."""
    strategies = [rel for rel in layout.others if is_strategy_file(os.path.join(src, rel))]
    bounds = (directory.bounds_over_ranks(
        src, layout.shards, strategies, settings.build_rules(), settings.build_scheme())
        if strategies else {})
    total = sum(layout.sizes[rel] for rel in layout.shards)

    def shard_progress(advance: int, _total: int) -> None:
        if progress is not None:
            progress(advance, total)

    planned: Dict[str, Dict[str, object]] = {}
    for rel in layout.shards:
        shard_settings = settings.with_format(formats.format_from_suffix(rel))
        plan, found = _verify_shard(os.path.join(src, rel), os.path.join(dst, rel),
                                    rel in present, shard_settings, bounds,
                                    verify_crc=verify_crc, workers=workers,
                                    progress=shard_progress, others=links.others(src, rel))
        verdict.differences += [Difference(f"{rel}: {d.where}", d.what) for d in found]
        tensors = directory.manifest_tensors(plan)
        planned[rel] = {"tensors": tensors}
        entry = files.get(rel)
        # As JSON: a shape of floats ([64.0]) equals convert's ([64]) in Python, not in JSON.
        if entry is not None and (json.dumps(entry.get("tensors")) != json.dumps(tensors)
                                  or entry.get("tensor_count") != len(tensors)):
            verdict.differences.append(Difference(directory.MANIFEST, "the tensors it lists for "
                                                  f"{rel} are not those convert writes"))
        verdict.shards += 1
        verdict.tensors += len(plan.outputs)
        verdict.quantized += len(plan.quantized)
        shard_progress(layout.sizes[rel] - sum(s.source.nbytes for s in plan.steps)
                       - sum(t.nbytes for t in plan.consumed), total)
    return planned


def _verify_shard(src: str, dst: str, present: bool, settings: Settings,
                  bounds: Mapping[str, RowBounds], *, verify_crc: bool, workers: Optional[int],
                  progress: converter.ProgressFn,
                  others: fp8.OtherShards) -> Tuple[converter.Plan, List[Difference]]:
    """One shard. A missing or unreadable one is still planned: the index needs its tensors."""
    if not present:  # reported with the files
        return _plan_of(src, settings, others), []
    try:
        out = formats.open_reader(dst, verify_crc=False)
    except (FormatError, UnsupportedError) as exc:  # damaged: an unknown dtype is damage too
        return _plan_of(src, settings, others), [Difference("file", "not a readable "
                                                                    f"checkpoint: {exc.reason}")]
    with out:
        return _compare_file(src, out, settings, row_bounds=bounds, verify_crc=verify_crc,
                             workers=workers, progress=progress, others=others)


def _plan_of(src: str, settings: Settings, others: fp8.OtherShards) -> converter.Plan:
    with formats.open_reader(src, verify_crc=False) as reader:
        return _make_plan(reader, settings, others)


def _make_plan(reader: TensorReader, settings: Settings,
               others: fp8.OtherShards = fp8.NONE) -> converter.Plan:
    """The plan `convert` makes of this input under these settings (those of one file)."""
    assert settings.format is not None
    return converter.make_plan(reader, settings.build_rules(), settings.format,
                               crc=settings.crc, scheme=settings.build_scheme(), others=others)


def _compare_file(src: str, out: TensorReader, settings: Settings, *,
                  row_bounds: Optional[Mapping[str, RowBounds]] = None, verify_crc: bool,
                  workers: Optional[int], progress: Optional[converter.ProgressFn],
                  others: fp8.OtherShards = fp8.NONE
                  ) -> Tuple[converter.Plan, List[Difference]]:
    """Convert `src` under `settings` in memory, a tensor at a time, against `out`."""
    workers = workers or converter.default_workers()
    with formats.open_reader(src, verify_crc=verify_crc, defer_crc=True) as reader, \
            open(out.path, "rb") as raw, \
            ThreadPoolExecutor(workers, thread_name_prefix="ckpt-rtn-verify") as pool:
        plan = _make_plan(reader, settings, others)
        check = _FileCheck(plan, out, raw.fileno())
        converter.stream(reader, plan, check.tensor, pool=pool if workers > 1 else None,
                         row_bounds=row_bounds, progress=progress)  # stage times: unused
        check.finish()
    return plan, check.differences


class _FileCheck:
    """The comparison of one output file with its plan, fed the planned arrays in plan order.

    Structure first (names, dtypes, shapes, order, metadata); tensor bytes as they come;
    the format's own bytes (headers, size, CRC trailer) only if the structure matched, since
    otherwise every offset after the first difference would differ too.
    """

    def __init__(self, plan: converter.Plan, out: TensorReader, fd: int) -> None:
        self.plan, self.out, self.fd = plan, out, fd
        self.differences: List[Difference] = []
        self.actual = {t.name: t for t in out.tensors}
        expected = plan.outputs
        self._structure(expected)
        if plan.out_format != out.format:
            self._add("format", f"the file is {out.format}; its settings say {plan.out_format}")
        self.header = b""
        #: safetensors with crc_num: each tensor's (CRC-32 of name and bytes, their length).
        self.crc_parts: Optional[Dict[str, Tuple[int, int]]] = None
        if plan.out_format == "safetensors":
            self.header = safetensors.header(expected, plan.metadata, 0 if plan.crc else None)
            stored = json.loads(self.header[8:])
            self._metadata(stored.pop("__metadata__", {}))
            order = list(stored)
            if plan.crc:
                self.crc_parts = {}
        else:
            order = [t.name for t in expected]
        if not self.differences:
            self._order(order)
        self.exact = not self.differences  # so far: the format's bytes are worth comparing
        self.pos, self.crc = 0, 0  # .ckpt: where the next record starts, CRC-32 of all before

    def _add(self, where: str, what: str) -> None:
        self.differences.append(Difference(where, what))

    def _structure(self, expected: List[TensorInfo]) -> None:
        names = set()
        for info in expected:
            names.add(info.name)
            got = self.actual.get(info.name)
            if got is None:
                self._add(info.name, f"missing (convert writes {_describe(info)})")
            elif not _same_kind(got, info):
                self._add(info.name, f"{_describe(got)} where convert writes {_describe(info)}")
        for got in self.out.tensors:
            if got.name not in names:
                self._add(got.name, f"extra {_describe(got)}: convert does not write it")

    def _metadata(self, expected: Mapping[str, str]) -> None:
        """Metadata against convert's; crc_num's value is checked with the header, once every
        tensor's bytes have given it."""
        actual = self.out.metadata
        for key in sorted(set(expected) | set(actual)):
            if key not in actual:
                self._add(f"metadata {key!r}", f"missing (convert writes {brief(expected[key])})")
            elif key not in expected:
                self._add(f"metadata {key!r}", f"extra ({brief(actual[key])}): convert does not "
                          "write it")
            elif actual[key] != expected[key] and key != safetensors.CRC_KEY:
                self._add(f"metadata {key!r}", f"{brief(actual[key])} where convert writes "
                          f"{brief(expected[key])}")

    def _order(self, expected: List[str]) -> None:
        actual = [t.name for t in self.out.tensors]
        for got, want in zip(actual, expected):
            if got != want:
                self._add("order", f"{got} is where convert writes {want}: the tensors are not "
                          "in convert's order")
                return

    def tensor(self, info: TensorInfo, array: np.ndarray) -> None:
        """Compare one planned tensor (or record) with the output's."""
        got = self.actual.get(info.name)
        if got is None or not _same_kind(got, info):
            return  # reported with the structure
        want = raw_bytes(info, array)
        at = _first_difference(want, raw_bytes(got, self.out.read(got)))
        if at is not None:
            self._add(info.name, f"bytes differ from convert's, first at byte {at} of "
                      f"{info.nbytes}")
        if self.plan.out_format == "ckpt":
            self._records(info, want)
        elif self.crc_parts is not None:
            name = info.name.encode("utf-8")
            self.crc_parts[info.name] = (zlib.crc32(want, zlib.crc32(name)),
                                         len(name) + info.nbytes)

    def _records(self, info: TensorInfo, data: memoryview) -> None:
        """Follow the `.ckpt` writer through this tensor's records (they come in file order)."""
        for header, start, length in ckpt.records(info):
            if self.exact and self._read_at(self.pos, len(header)) != header:
                self._add(info.name, f"record header differs from convert's (at byte "
                          f"{self.pos}): the file holds fields or encodings convert does not "
                          "write")
                self.exact = False
            self.crc = zlib.crc32(data[start:start + length], zlib.crc32(header, self.crc))
            self.pos += len(header) + length

    def finish(self) -> None:
        """The format's bytes around the tensors: header, CRC trailer, file size."""
        if not self.exact:
            return
        size = os.path.getsize(self.out.path)
        if self.plan.out_format == "safetensors":
            expected_size = len(self.header) + sum(t.nbytes for t in self.plan.outputs)
            if self.crc_parts is not None:
                parts = self.crc_parts
                self.header = safetensors.header(
                    self.plan.outputs, self.plan.metadata,
                    crc32.chain(parts[name] for name in sorted(parts)))
                stored = self.out.metadata.get(safetensors.CRC_KEY)
                expected = json.loads(self.header[8:])["__metadata__"][safetensors.CRC_KEY]
                if stored != expected:
                    self._add(f"metadata {safetensors.CRC_KEY!r}", f"{brief(str(stored))} "
                              f"where convert writes {brief(expected)}")
                    return
            if self._read_at(0, len(self.header)) != self.header:
                self._add("header", "its bytes differ from the header convert writes (same "
                          "tensors and metadata, other spacing or key order)")
                return
        else:
            expected_size = self.pos
            has_crc = getattr(self.out, "crc", None) is not None
            if has_crc != self.plan.crc:
                self._add("CRC trailer", "present; the settings say convert writes none"
                          if has_crc else "missing; the settings say convert writes one")
                return
            if self.plan.crc:
                trailer = ckpt.crc_trailer(self.crc)
                expected_size += len(trailer)
                if self._read_at(self.pos, len(trailer)) != trailer:
                    self._add("CRC trailer", f"{self._read_at(self.pos, len(trailer))[-10:].hex()}"
                              f" where convert writes {trailer[-10:].hex()}")
        if size != expected_size:
            self._add("size", f"{size} bytes where convert writes {expected_size}")

    def _read_at(self, offset: int, length: int) -> bytes:
        with self.out.reading():
            return os.pread(self.fd, length, offset)


def _read_manifest(path: str) -> Tuple[Dict[str, object], Settings]:
    """A directory's manifest, checked: its files' entries and its settings."""
    if not os.path.lexists(path):
        dst = os.path.dirname(path)
        if directory.part_manifest_names(dst):
            raise FormatError(dst, f"holds the manifests of --part runs only: run the final "
                              f"{TOOL} convert --resume (without --part) first")
        raise FormatError(dst, f"has no {directory.MANIFEST}: not an output directory of "
                          f"{TOOL} convert (or written by a version before it kept one)")
    paths.input_stat(path, FormatError, "a manifest")
    manifest = directory.read_manifest(path, FormatError)
    return manifest, Settings.from_dict(manifest.get("settings"), path)


def _check_entry(entry: Optional[Dict[str, object]], rel: str, path: str) -> List[Difference]:
    """The manifest's size and sha256 of one output file against the file."""
    if entry is None:
        return [Difference(directory.MANIFEST, f"does not list {rel}")]
    size = os.path.getsize(path)
    if size != entry["size"]:
        return [Difference(rel, f"{size} bytes; the manifest records {entry['size']}")]
    digest = directory.sha256_of(path)
    if digest != entry["sha256"]:
        return [Difference(rel, f"sha256 {digest}; the manifest records {entry['sha256']}")]
    return []


def _check_version(settings: Settings, path: str) -> None:
    if settings.version != __version__:
        raise UnsupportedError(path, f"was written by {TOOL} {settings.version}; this is "
                               f"{__version__}, whose output may differ: verify it with "
                               f"{TOOL} {settings.version}")


def _files_under(root: str) -> Tuple[Set[str], Dict[str, str]]:
    """Relative paths of the regular files under `root` (the manifest, and the lock and
    temporary files of a run that is writing it or was killed, aside), and the kind of
    anything else found there (which is never opened: a FIFO would block)."""
    files: Set[str] = set()
    irregular: Dict[str, str] = {}

    def unlisted(exc: OSError) -> None:  # its files would go unseen
        irregular[os.path.relpath(exc.filename, root)] = (f"a directory that cannot be listed "
                                                          f"({exc.strerror})")

    for base, dirs, names in os.walk(root, onerror=unlisted):
        dirs.sort()
        for name in [d for d in dirs if os.path.islink(os.path.join(base, d))]:
            irregular[os.path.relpath(os.path.join(base, name), root)] = "a symbolic link"
        for name in names:
            if paths.TEMP_PATTERN.fullmatch(name) or paths.LOCK_PATTERN.fullmatch(name):
                continue
            path = os.path.join(base, name)
            rel = os.path.relpath(path, root)
            try:  # a link is not what convert writes, whatever it points to
                mode = os.stat(path, follow_symlinks=False).st_mode
            except OSError as exc:
                irregular[rel] = f"a file that cannot be read ({exc.strerror})"
                continue
            if stat.S_ISREG(mode):
                if rel != directory.MANIFEST:
                    files.add(rel)
            else:
                irregular[rel] = paths.kind(mode)
    return files, irregular


def _files_differ(a: str, b: str) -> Optional[int]:
    """The first offset where the source's file `a` and the output's `b` differ (the shorter
    one's size if one is a prefix; 0 if `b` cannot be read)."""
    pos = 0
    try:
        fa = open(a, "rb")  # pylint: disable=consider-using-with
    except OSError as exc:
        raise FormatError(a, f"cannot read: {exc.strerror}") from None
    try:
        fb = open(b, "rb")  # pylint: disable=consider-using-with
    except OSError:
        fa.close()
        return 0
    with fa, fb:
        while True:
            x, y = fa.read(_BLOCK), fb.read(_BLOCK)
            at = _first_difference(memoryview(x), memoryview(y))
            if at is not None:
                return pos + at
            if not x:
                return None
            pos += len(x)


def _first_difference(a: memoryview, b: memoryview) -> Optional[int]:
    """Where two byte strings first differ, compared a block at a time; None if equal."""
    common = min(len(a), len(b))
    for start in range(0, common, _BLOCK):
        end = min(start + _BLOCK, common)
        x, y = np.frombuffer(a[start:end], np.uint8), np.frombuffer(b[start:end], np.uint8)
        if not np.array_equal(x, y):
            return start + int(np.argmax(x != y))
    return None if len(a) == len(b) else common


def _same_kind(a: TensorInfo, b: TensorInfo) -> bool:
    return (a.dtype, a.shape, a.nbytes) == (b.dtype, b.shape, b.nbytes)


def _describe(info: TensorInfo) -> str:
    return f"{info.dtype} [{', '.join(map(str, info.shape))}] ({info.nbytes} bytes)"
