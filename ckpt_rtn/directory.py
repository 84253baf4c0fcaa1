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
already done and verified (its tensors too, read back from its header). A
manifest also records each input file's size and modification time: a run
over a SRC changed since (a file edited, added or removed) is refused, since
what DST holds came from the old one. A run holds DST's lock (`DST/.ckpt-rtn.lock`,
paths.destination_lock) throughout, so it never races another run, and it
removes only dead runs' temporary files.

`--part I/N` (options.Part) converts only the I-th of N byte-balanced sets
of shards, so that N jobs of a Slurm array or a Kubernetes Indexed Job, on
as many machines sharing DST, convert a directory together. The parts never
write the same file: each writes its own shards and records them in its own
`ckpt-rtn-manifest.part-I-of-N.json`; none copies the other files or writes
an index. They share DST's lock and each holds its part manifest's, so two
parts run at once but the same part cannot run twice. A part always resumes
its own shards, and first checks every manifest already in DST, so a part
started with other options is refused at once. The run without --part that
completes the directory (`--resume`) holds DST's lock alone, so it cannot
start while a part runs (nor a part while it runs); it merges the part
manifests (refusing one made with other settings), skips every shard whose
file still has the size and sha256 recorded, converts what is missing,
copies, rewrites the indexes, writes the one manifest, in the layout's
order (and only the files it writes), and removes the part manifests and
the lock files of parts that were killed. Under --scheme w8a8-dynamic that run
also writes DST/quant_model_description.json (description.py), from every
shard's tensors as the manifest lists them; parts never do. A part's scales are a whole run's:
the input-split weights' bounds are read from every rank's shard.

FP8 checkpoints (DeepSeek-V3's, fp8.py) keep a weight's block scales
`<p>.weight_scale_inv` in its shard, or sometimes in another one: before a
shard is converted, the scales its FP8 weights have elsewhere are read from
those shards (Fp8Links), and the shard holding them leaves them out. A
config.json whose quantization_config describes FP8 is written without it
(copied_config): no output tensor is FP8.

The input is walked following symlinked directories (a rank_N linked from
elsewhere is common), with loops refused; FIFOs, devices, sockets and
dangling links are refused by name, and nothing written may land on, or
inside, anything read (paths.Claims).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import time
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Set, Tuple, Type

import numpy as np

from . import __version__, converter, description, dtypes, formats, fp8, paths
from .errors import CkptRtnError, ConfigError, FormatError, OutputError, UnsupportedError
from .formats import format_from_suffix, open_reader, untrusted_json
from .formats.atomic import TEMP_PATTERN, copy_atomic, remove_dead_temp_files, write_bytes_atomic
from .formats.strategy import Layout, is_strategy_file, read_strategy
from .formats.tensor import TensorInfo
from .rtn import RowBounds, row_bounds
from .options import ConvertOptions, Part
from .rules import OUT_IN, RuleChoice, Rules
from .schemes import Scheme
from .settings import NAME as SETTINGS_NAME, Settings

MANIFEST = "ckpt-rtn-manifest.json"
#: What each `--part I/N` records; the whole run merges and removes them.
PART_MANIFEST = re.compile(r"ckpt-rtn-manifest\.part-\d+-of-\d+\.json")
#: A part manifest's lock file (paths.lock_path).
_PART_LOCK = re.compile(r"\." + PART_MANIFEST.pattern + r"\.ckpt-rtn\.lock")
#: An index JSON takes some 100 bytes per tensor, a manifest some 150 bytes: a larger
#: .json is not read as one, nor a manifest read at all.
_MAX_INDEX_SIZE = 256 * 1024 * 1024
#: Model weights in other frameworks' files, as Hugging Face names them (PyTorch's
#: `pytorch_model-00001-of-00002.bin`, TensorFlow's `tf_model.h5`, Flax's
#: `flax_model.msgpack`) and Meta's releases (`original/consolidated.00.pth`): never read, and
#: a copy would put them unquantized beside the output.
_FOREIGN_WEIGHTS = re.compile(r"(?:pytorch_model|tf_model|flax_model)(?:[-.][^/]*)?"
                              r"\.(?:bin|h5|msgpack)|consolidated[^/]*\.pth", re.IGNORECASE)
#: Those frameworks' suffixes: an index naming such files as its shards names weights, and
#: a file of one from _FOREIGN_MIN bytes holds weights or training state (`optimizer.pt`, a
#: LoRA `adapter_model.bin`, `model.pt`), while smaller ones (a trainer's
#: `training_args.bin`, `rng_state.pth`, `scheduler.pt`) are copied as any other file.
_FOREIGN_SUFFIXES = (".bin", ".pt", ".pth", ".h5", ".msgpack")
_FOREIGN_MIN = 1024 * 1024
_FOREIGN_ADVICE = ("which ckpt-rtn does not read, and would copy unquantized beside its "
                   "output: convert a copy of the directory without them (e.g. huggingface-cli "
                   "download --exclude '*.bin' '*.pt' '*.h5' '*.msgpack' 'original/*')")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class DirectoryResult:
    converted: List[converter.Result] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    copied: List[str] = field(default_factory=list)
    indexes: List[str] = field(default_factory=list)
    #: Weights split along input channels, whose scales were taken over all ranks.
    global_scales: List[str] = field(default_factory=list)
    #: An earlier run's files that --overwrite removed: this run does not write them.
    removed: List[str] = field(default_factory=list)
    input_size: int = 0
    output_size: int = 0
    seconds: float = 0.0

    @property
    def stages(self) -> converter.Stages:
        """The shards' stage times added up (shards are converted one after another)."""
        return sum((shard.stages for shard in self.converted), converter.Stages(0.0, 0.0, 0.0))


@dataclass
class SourceTree:
    """SRC's files as `scan` classifies them, by path relative to SRC: what a whole run
    converts, rewrites and copies, and what verify checks DST against."""

    shards: List[str]
    indexes: List[str]
    others: List[str]
    #: Each file's size, by relative path.
    sizes: Dict[str, int]
    #: Symlinked directories followed (their targets are inputs too).
    linked: List[str]
    #: Each file's modification time (ns), by relative path.
    mtimes: Dict[str, int] = field(default_factory=dict)

    def outputs(self, mcore: bool) -> List[str]:
        """What a whole run writes, in its manifest's order (a description with an Mcore
        scheme)."""
        return self.shards + self.others + self.indexes + ([description.NAME] if mcore else [])

    def stamps(self) -> Dict[str, List[int]]:
        """Each file's [size, modification time]: every manifest records them, and a run
        over a SRC changed since one was written is refused (_check_sources)."""
        return {rel: [size, self.mtimes[rel]] for rel, size in self.sizes.items()}


def convert_directory(src: str, dst: str, options: ConvertOptions = ConvertOptions(), *,
                      progress: Optional[converter.ProgressFn] = None,
                      report: Optional[str] = None) -> DirectoryResult:
    """Convert every shard under `src` into the same layout under `dst`.

    Without an explicit family, it is detected from the names of every shard
    (read from their headers alone).
    `dst` is locked against other runs throughout (paths.destination_lock);
    a run refused before writing anything leaves no `dst` behind. `report`:
    a file the caller writes afterwards, refused here if it would land on
    anything this run reads or writes.
    """
    _check_directories(src, dst)
    layout = _source(src, dst)
    created = _make_directories(dst)
    try:
        if options.part is None:
            with paths.destination_lock(dst, directory=True):
                return _convert_locked(src, dst, layout, options, progress, report)
        # Parts share DST's lock (a run without --part holds it alone) and each holds its own
        # part manifest's lock, so the same part cannot run twice at once.
        with paths.destination_lock(dst, directory=True, shared=True), \
                paths.destination_lock(os.path.join(dst, part_manifest(options.part))):
            return _convert_locked(src, dst, layout, options, progress, report)
    except BaseException:
        if created and options.part is None:  # another part may be making directories there
            _remove_empty_directories(dst)
        raise


@dataclass(frozen=True)
class DirectoryPlan:
    """What a whole run of SRC would write (--dry-run): each shard's plan, and the size of
    every file it would write but the manifest, in the manifest's order."""

    rules: Rules
    plans: Dict[str, converter.Plan]
    sizes: Dict[str, int]
    input_size: int


def plan_directory(src: str, dst: str,
                   options: ConvertOptions = ConvertOptions()) -> DirectoryPlan:
    """The checks a whole run makes before it writes, and the files it would then write,
    with their exact sizes (the indexes' and the description's bytes made as the run makes
    them); nothing is written, and DST need not exist."""
    _check_directories(src, dst)
    layout = _source(src, dst)
    if os.path.isdir(dst):
        _check_empty(dst, options.overwrite, options.resume)
    rules, _, plans = _checked(src, dst, layout, options)
    copies = {rel: copied_config(os.path.join(src, rel)) for rel in layout.others}
    sizes = {rel: formats.planned_size(plan.outputs, format=plan.out_format,
                                       metadata=plan.metadata, crc=plan.crc,
                                       path=os.path.join(dst, rel))
             for rel, plan in plans.items()}
    sizes.update((rel, layout.sizes[rel] if copy is None else len(copy))
                 for rel, copy in copies.items())
    files: Dict[str, Dict[str, object]] = {rel: {"tensors": manifest_tensors(plan)}
                                           for rel, plan in plans.items()}
    sizes.update((rel, len(rewritten_index(src, rel, files))) for rel in layout.indexes)
    if options.scheme.mcore:
        sizes[description.NAME] = len(description_of(layout.shards, files))
    return DirectoryPlan(rules, plans, sizes, sum(layout.sizes.values()))


def _checked(src: str, dst: str, layout: SourceTree, options: ConvertOptions,
             report: Optional[str] = None,
             manifest: str = MANIFEST) -> Tuple[Rules, Fp8Links, Dict[str, converter.Plan]]:
    """What a run checks of SRC and DST before it writes anything, and what it found: the
    rules (the family detected over every shard), the FP8 links, and each shard's plan
    (a whole run's; a part plans its own shards as it converts them). A run and its
    --dry-run make the same checks through here."""
    rules = converter.rules_for(options.rules,
                                _detection_tensors(src, layout.shards, options.rules), src)
    for rel in layout.others:  # a config.json that cannot be rewritten
        copied_config(os.path.join(src, rel))
    links = fp8_links(src, layout)
    plans = check_source(src, layout, rules, options, links, across_shards=options.part is None)
    if os.path.isdir(dst):  # else nothing can lead into it (a --dry-run's new DST)
        _check_paths(src, dst, layout, report, manifest, options.scheme.mcore)
    return rules, links, plans


def shard_list(src: str, dst: str) -> List[str]:
    """The shards of `src` (relative paths), after convert_directory's first checks: what
    `--ray` deals into parts before any part runs."""
    _check_directories(src, dst)
    return _source(src, dst).shards


def _source(src: str, dst: str) -> SourceTree:
    """SRC's files (see scan), which must hold a shard, for a directory DST, which a new one
    must not be named like a file."""
    layout = scan(src)
    if not layout.shards:
        raise FormatError(src, "no .ckpt or .safetensors checkpoint files in this directory")
    if not os.path.lexists(dst) and format_from_suffix(dst) is not None:
        raise OutputError(dst, "the input is a directory of shards, so the output is a "
                          f"directory too; name it without the {os.path.splitext(dst)[1]} "
                          "suffix")
    return layout


def _convert_locked(src: str, dst: str, layout: SourceTree, options: ConvertOptions,
                    progress: Optional[converter.ProgressFn],
                    report: Optional[str]) -> DirectoryResult:
    """Convert the shards (those of `options.part` only, if given); a whole run then copies
    the other files, rewrites the indexes and merges the parts' manifests into its own."""
    started = time.perf_counter()
    part = options.part
    if part is None:
        _check_empty(dst, options.overwrite, options.resume)
    elif options.overwrite:
        raise ConfigError(dst, f"--part {part} always resumes its own shards; --overwrite "
                          "applies to a whole run (remove DST to start the parts over)")
    manifest_name = MANIFEST if part is None else part_manifest(part)
    rules, links, _ = _checked(src, dst, layout, options, report, manifest_name)
    settings = options.settings(rules, None)
    strategies = [rel for rel in layout.others if is_strategy_file(os.path.join(src, rel))]
    result = DirectoryResult()
    if part is None:
        shards = layout.shards
        manifest = (_merged_manifest(dst, settings, layout.stamps()) if options.resume
                    else new_manifest(settings, layout.stamps()))
        done = manifest
        _remove_dead_temp_files(dst)
    else:
        shards = part.shards({rel: layout.sizes[rel] for rel in layout.shards})
        manifest, done = _part_manifests(dst, settings, layout.stamps(), manifest_name)
        for rel in shards + [manifest_name]:  # only this part's: the others' may be alive
            directory, name = os.path.split(os.path.join(dst, rel))
            if os.path.isdir(directory):
                remove_dead_temp_files(directory, name)
    result.input_size = (sum(layout.sizes[rel] for rel in shards) if part
                         else sum(layout.sizes.values()))
    total = sum(layout.sizes[rel] for rel in shards)

    def shard_progress(advance: int, _total: int) -> None:
        if progress is not None:
            progress(advance, total)

    pending = [rel for rel in shards if not _is_done(done, rel, os.path.join(dst, rel))]
    # Over every rank's shard, not only this part's: a part's scales are a whole run's.
    bounds = (bounds_over_ranks(src, layout.shards, strategies, rules, options.scheme)
              if pending and strategies else {})
    result.global_scales = sorted(bounds)
    if part is None and options.overwrite and not options.resume:  # every check is passed
        result.removed = _remove_earlier_output(dst, set(layout.outputs(options.scheme.mcore)),
                                                _inodes(src, layout))
        # This run's, from now: a --resume after an interrupt continues it, where the
        # earlier runs' manifests (another SRC, other settings) refused it.
        _save(dst, MANIFEST, manifest)
        _remove_part_manifests(dst)
    # Each shard keeps its own format, and replaces whatever a killed run left.
    shard_options = replace(options, rules=rules, format=None, overwrite=True)
    for rel in shards:
        out = os.path.join(dst, rel)
        size = layout.sizes[rel]
        if rel not in pending:
            result.skipped.append(rel)
            shard_progress(size, total)
            continue
        _make_directories(os.path.dirname(out))
        converted = converter.convert(os.path.join(src, rel), out, shard_options,
                                      row_bounds=bounds, progress=shard_progress,
                                      others=links.others(src, rel))
        result.converted.append(converted)
        plan = converted.plan  # the bar counts file bytes; convert reported tensor bytes
        shard_progress(size - sum(s.source.nbytes for s in plan.steps)
                       - sum(t.nbytes for t in plan.dropped + plan.consumed), total)
        _record(dst, manifest, rel, out, manifest_tensors(converted.plan), manifest_name)
    if part is not None:
        _save(dst, manifest_name, manifest)  # also when it had nothing to do: it ran
        files = {**done["files"], **manifest["files"]}  # type: ignore[dict-item]
        result.output_size = sum(files[rel]["size"] for rel in shards)
        result.seconds = time.perf_counter() - started
        return result
    for rel in layout.others:
        out = os.path.join(dst, rel)
        if _is_done(manifest, rel, out):
            result.skipped.append(rel)
            continue
        _make_directories(os.path.dirname(out))
        config = copied_config(os.path.join(src, rel))
        if config is None:
            copy_atomic(os.path.join(src, rel), out)
        else:
            write_bytes_atomic(out, config)
        result.copied.append(rel)
        _record(dst, manifest, rel, out, None)
    for rel in layout.indexes:
        _make_directories(os.path.dirname(os.path.join(dst, rel)))
        _rewrite_index(src, dst, rel, manifest)
        _record(dst, manifest, rel, os.path.join(dst, rel), None)
        result.indexes.append(rel)
    if options.scheme.mcore:  # from every shard's tensors: only the whole run knows them all
        write_bytes_atomic(os.path.join(dst, description.NAME),
                           description_of(layout.shards, manifest["files"]))
        _record(dst, manifest, description.NAME, os.path.join(dst, description.NAME), None)
    # In the layout's order, however the parts finished: the same bytes as one run's.
    files = manifest["files"]
    order = [rel for rel in layout.outputs(options.scheme.mcore) if rel in files]
    manifest["files"] = {rel: files[rel] for rel in order}  # and nothing a manifest made up
    _save(dst, MANIFEST, manifest)
    _remove_part_manifests(dst)  # merged into this run's
    for name in _dead_part_locks(dst):  # no part runs while this run holds DST's lock
        _remove(os.path.join(dst, name))
    result.output_size = sum(entry["size"] for entry in manifest["files"].values())
    result.seconds = time.perf_counter() - started
    return result


@dataclass(frozen=True)
class Fp8Links:
    """FP8 weights whose block scales lie in another shard (DeepSeek-V3's own checkpoint
    has such pairs): by the weight's shard, the scales it reads from others (scale name ->
    their shard); by the scale's shard, the scales its conversion leaves to another."""

    needs: Dict[str, Dict[str, str]]
    taken: Dict[str, Set[str]]

    def others(self, src: str, rel: str) -> fp8.OtherShards:
        """What shard `rel`'s conversion needs from the others: their scales read now (a few
        kilobytes per weight: one float32 per 128x128 block)."""
        by_shard: Dict[str, List[str]] = {}
        for name, shard in self.needs.get(rel, {}).items():
            by_shard.setdefault(shard, []).append(name)
        scales: Dict[str, Tuple[TensorInfo, np.ndarray]] = {}
        for shard, names in sorted(by_shard.items()):
            with open_reader(os.path.join(src, shard), verify_crc=False) as reader:
                infos = {t.name: t for t in reader.tensors}
                for name in names:
                    scales[name] = (infos[name], np.array(reader.read(infos[name])))
        return fp8.OtherShards(scales, frozenset(self.taken.get(rel, ())))


def fp8_links(src: str, layout: SourceTree) -> Fp8Links:
    """Which FP8 weights of the safetensors shards (read from their headers) have their block
    scales in another shard of their index. Shards of no index (rank directories) each hold
    a checkpoint of their own, the same names in each. Scales held by two shards of one
    index are refused: each shard's weight read its own, whatever the index named, and the
    other copy was dropped unread."""
    weights: Dict[str, Set[str]] = {}  # shard -> its FP8 weights
    scales: Dict[str, Set[str]] = {}  # shard -> its block scales
    for rel in layout.shards:
        if format_from_suffix(rel) != "safetensors":
            continue
        with open_reader(os.path.join(src, rel), verify_crc=False) as reader:
            weights[rel] = {t.name for t in reader.tensors if t.dtype is dtypes.FLOAT8_E4M3}
            scales[rel] = {t.name for t in reader.tensors if t.name.endswith(fp8.SCALE_SUFFIX)}
    links = Fp8Links({}, {})
    for group in _loaded_together(src, layout):
        for rel in group:
            for name in sorted(weights.get(rel, ())):
                scale = name + fp8.SCALE_SUFFIX
                held = [shard for shard in group if scale in scales.get(shard, ())]
                if len(held) > 1:
                    raise FormatError(os.path.join(src, held[1]), f"tensor {scale!r} is held by "
                                      f"{held[0]} too: the block scales of FP8 {name!r} must be "
                                      "in one shard")
                if held and held[0] != rel:
                    links.needs.setdefault(rel, {})[scale] = held[0]
                    links.taken.setdefault(held[0], set()).add(scale)
    return links


def _loaded_together(src: str, layout: SourceTree) -> List[List[str]]:
    """The shards a loader takes as one checkpoint: each index's, and each shard of no index
    on its own."""
    groups = [sorted(_index_shards(src, index) & set(layout.shards)) for index in layout.indexes]
    indexed = {rel for group in groups for rel in group}
    return groups + [[rel] for rel in layout.shards if rel not in indexed]


def _index_shards(src: str, index: str) -> Set[str]:
    """The shards the index `index` names, as paths relative to SRC."""
    _, weight_map = _read_index(os.path.join(src, index))
    return {os.path.normpath(os.path.join(os.path.dirname(index), shard))
            for shard in weight_map.values()}


#: The model's configuration that Hugging Face loaders read beside the shards.
CONFIG = "config.json"


def check_source(src: str, layout: SourceTree, rules: Rules, options: ConvertOptions,
                 links: Fp8Links, *, across_shards: bool = True) -> Dict[str, converter.Plan]:
    """Refuse what no conversion of SRC's files taken together can be, before anything is
    written (and `verify`, for which no DST can then be the output): shards an Mcore scheme
    cannot write or a description already there, an index naming a shard SRC lacks, and,
    `across_shards`, the clashes between shards of one index (a whole run checks them once:
    each of N parts planning all N shards would cost N^2). Returns each shard's plan, made
    from its header for those checks (none unless `across_shards`)."""
    if options.scheme.mcore:
        _check_mcore_input(src, layout, options.scheme)
    _check_indexes(src, layout)
    if not across_shards:
        return {}
    plans = {rel: _plan_shard(src, rel, rules, options, links) for rel in layout.shards}
    _check_output_names(src, layout, options, plans)
    return plans


def _plan_shard(src: str, rel: str, rules: Rules, options: ConvertOptions,
                links: Fp8Links) -> converter.Plan:
    """A shard's plan from its header, as a whole run makes it."""
    fmt = converter.output_format(rel, None, options.crc)
    with open_reader(os.path.join(src, rel), verify_crc=False) as reader:
        return converter.make_plan(reader, rules, fmt, crc=options.crc, scheme=options.scheme,
                                   others=links.others(src, rel))


def _check_output_names(src: str, layout: SourceTree, options: ConvertOptions,
                        plans: Dict[str, converter.Plan]) -> None:
    """Refuse, among the shards of one index, a name two of them would write because one
    renames a tensor to it (an input tensor named as the scheme names another shard's
    layer's scale: the index would point at one of them, and a loader take it for the
    other), and a bias the scheme would rename kept apart from its quantized weight (it
    would keep its old name). Shards of no index (rank directories) each hold a checkpoint
    of their own. A whole run checks; a part leaves it to the run that ends."""
    outputs: Dict[str, List[Tuple[str, str]]] = {}  # shard -> (output name, input name)
    renamed_biases: Dict[str, List[str]] = {}  # a quantized layer's bias -> its weight's shards
    for rel, plan in plans.items():
        outputs[rel] = [(out.name, step.source.name) for step in plan.steps
                        for out in step.outputs]
        for step in plan.quantized:
            layer = step.selection.layer  # type: ignore[union-attr]
            if options.scheme.for_layer(layer).names(layer).bias != layer + ".bias":
                renamed_biases.setdefault(layer + ".bias", []).append(rel)
    for index in layout.indexes:
        written: Dict[str, Tuple[str, str]] = {}  # output name -> (shard, input name)
        index_shards = _index_shards(src, index)
        for rel in sorted(index_shards):
            for name, source in outputs.get(rel, []):
                shard, first = written.setdefault(name, (rel, source))
                if shard != rel and not name == source == first:
                    raise UnsupportedError(os.path.join(src, rel), converter.output_clash(
                        name, f"{first!r} (of {shard})", repr(source), options.scheme))
                weight_shard = next((other for other in renamed_biases.get(source, [])
                                     if other in index_shards), None)
                if name == source and weight_shard not in (None, rel):
                    raise UnsupportedError(os.path.join(src, rel), (
                        f"tensor {source!r} is the bias of a layer quantized in {weight_shard}, "
                        f"and --scheme {options.scheme.name} renames it there: keep a layer's "
                        "bias in its weight's shard"))


def copied_config(path: str) -> Optional[bytes]:
    """The bytes a directory's copy of `path` gets when they are not the source's: a
    config.json whose quantization_config describes FP8 (DeepSeek-V3's), without it.

    Every FP8 weight is dequantized (and written as bfloat16 or quantized),
    so that description would be wrong for the output; the rest of the
    config is kept, in its order, written back as JSON with indent 2 (as
    transformers writes it). A config that is not a JSON object, or has no
    FP8 quantization_config, is copied as it is (None). An FP8 one other than
    E4M3 in 128x128 blocks is refused: its weights would not read as fp8.py
    reads them.
    """
    if os.path.basename(path) != CONFIG:
        return None
    try:
        config = untrusted_json.load_file(path, "config", max_size=_MAX_INDEX_SIZE)
    except CkptRtnError:
        return None
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "fp8":
        return None
    assert isinstance(config, dict)
    if quantization.get("fmt", "e4m3") != "e4m3" or \
            quantization.get("weight_block_size", [fp8.BLOCK] * 2) != [fp8.BLOCK] * 2:
        raise UnsupportedError(path, "quantization_config describes FP8 "
                               f"{untrusted_json.brief(quantization.get('fmt'))} in blocks of "
                               f"{untrusted_json.brief(quantization.get('weight_block_size'))}; "
                               f"ckpt-rtn reads e4m3 in {fp8.BLOCK}x{fp8.BLOCK} blocks")
    del config["quantization_config"]
    return json.dumps(config, indent=2).encode() + b"\n"


def description_of(shards: List[str], files: Dict[str, Dict[str, object]]) -> bytes:
    """The quant_model_description.json of a directory whose shards' tensors the manifest
    `files` lists."""
    tensors = [t for rel in shards
               for t in description.manifest_tensors(files[rel]["tensors"])  # type: ignore
               if t.name != SETTINGS_NAME]
    return description.render(tensors)


def _check_mcore_input(src: str, layout: SourceTree, scheme: Scheme) -> None:
    """MindFormers' Mcore networks load a directory of safetensors with one quantization
    description: refuse other shards, and a description already in the input."""
    for rel in layout.shards:
        if format_from_suffix(rel) != "safetensors":
            raise UnsupportedError(os.path.join(src, rel), f"--scheme {scheme.name} writes "
                                   "safetensors, the only format MindFormers' Mcore networks "
                                   "load; a directory's shards keep their format")
    for rel in layout.others + layout.indexes:
        if description.is_description(rel):
            raise UnsupportedError(os.path.join(src, rel), "is a quantization description "
                                   "(is this checkpoint quantized already?); MindFormers reads "
                                   f"exactly one, and --scheme {scheme.name} writes its own "
                                   f"{description.NAME}")


def _detection_tensors(src: str, shards: List[str],
                       rules: "Rules | RuleChoice") -> List[TensorInfo]:
    """Every shard's tensors, from the headers alone, when the family is to be detected.

    A shard may hold part of a layer, its MLP and nothing else (a large MoE
    model spreads its experts over many shards), and an MoE model's first
    shard may hold only its dense layers, which look like Llama's: the
    family, and whether the checkpoint is already quantized, show only in
    all the names together.
    """
    if isinstance(rules, Rules) or rules.config is not None:
        return []
    tensors: List[TensorInfo] = []
    for rel in shards:
        with open_reader(os.path.join(src, rel), verify_crc=False) as reader:
            tensors.extend(reader.tensors)
    return tensors


def bounds_over_ranks(src: str, shards: List[str], strategies: List[str], rules: Rules,
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
                if scheme.for_layer(selection.layer).spec.group_size:
                    continue  # groups of input channels stay within a slice (checked per shard)
                if info.dtype is dtypes.FLOAT8_E4M3:
                    raise UnsupportedError(os.path.join(src, rel), f"tensor {info.name!r} is FP8 "
                                           "and split along its input channels; convert a "
                                           "merged checkpoint")
                weight = converter.out_in_view(reader.read(info), selection)
                low, high = row_bounds(weight, converter.float_format(info.dtype))
                if info.name in bounds:
                    low = np.minimum(bounds[info.name][0], low)
                    high = np.maximum(bounds[info.name][1], high)
                bounds[info.name] = (low, high)
    return bounds


def _check_directories(src: str, dst: str) -> None:
    """Refuse a destination that overlaps the input or is not a directory."""
    src_real, dst_real = paths.resolved(src), paths.resolved(dst)
    if src_real == dst_real:
        raise OutputError(dst, "output is the input directory; write to another path")
    if dst_real.startswith(src_real + os.sep):
        raise OutputError(dst, "output directory is inside the input directory")
    if src_real.startswith(dst_real + os.sep):
        raise OutputError(dst, "input directory is inside the output directory; write to "
                          "another path")
    if os.path.lexists(dst):
        if not os.path.isdir(dst):
            raise OutputError(dst, "input is a directory, so the output must be one too")
    elif not os.path.isdir(os.path.dirname(os.path.abspath(dst))):
        raise OutputError(dst, f"directory {os.path.dirname(os.path.abspath(dst))} does not exist")


def _check_empty(dst: str, overwrite: bool, resume: bool) -> None:
    try:
        names = [name for name in os.listdir(dst) if name != paths.LOCK_NAME]
    except OSError as exc:
        raise OutputError(dst, f"cannot list: {exc.strerror}") from None
    if names and not (overwrite or resume):
        raise OutputError(dst, "already exists and is not empty; pass --resume to finish "
                          "an interrupted run, or --overwrite")


def scan(src: str) -> SourceTree:
    """Every file under `src`, classified; symlinked directories are followed.

    Anything but regular files and directories (a FIFO, a device, a socket,
    a dangling link) is refused by name: reading it could block or never end.
    """
    layout = SourceTree([], [], [], {}, [])
    _walk(src, src, layout, set())
    for rel in [rel for rel in layout.indexes if _indexes_absent_foreign_weights(src, rel)]:
        layout.indexes.remove(rel)  # metadata alone, as huggingface-cli's --exclude '*.bin'
        layout.others.append(rel)   # leaves pytorch_model.bin.index.json: copied
    return layout


def _indexes_absent_foreign_weights(src: str, rel: str) -> bool:
    """Whether the index `rel` names only other frameworks' weight files, none of them in
    SRC (_walk refuses those that are)."""
    try:
        shards = set(_read_index(os.path.join(src, rel))[1].values())
    except CkptRtnError:  # refused by name when it is checked
        return False
    return bool(shards) and all(shard.lower().endswith(_FOREIGN_SUFFIXES) and not
                                os.path.lexists(os.path.join(src, os.path.dirname(rel), shard))
                                for shard in shards)


def _walk(src: str, directory: str, layout: SourceTree, ancestors: Set[Tuple[int, int]]) -> None:
    try:
        st = os.stat(directory)
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as exc:
        raise FormatError(directory, f"cannot list: {exc.strerror}") from None
    if (st.st_dev, st.st_ino) in ancestors:
        raise FormatError(directory, "is a symbolic link to a directory that contains it "
                          "(a loop); remove the link")
    ancestors = ancestors | {(st.st_dev, st.st_ino)}
    subdirectories = []
    for entry in entries:
        if TEMP_PATTERN.fullmatch(entry.name) or paths.LOCK_PATTERN.fullmatch(entry.name):
            continue  # a run's own files, when SRC was written by ckpt-rtn
        try:
            st = os.stat(entry.path)
        except FileNotFoundError:
            raise FormatError(entry.path, "is a dangling symbolic link; remove it or fix "
                              "its target") from None
        except OSError as exc:
            raise FormatError(entry.path, f"cannot read: {exc.strerror}") from None
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            if entry.is_symlink():
                layout.linked.append(entry.path)
            subdirectories.append(entry.path)
            continue
        if not stat.S_ISREG(mode):
            raise FormatError(entry.path, f"is {paths.kind(mode)}; a checkpoint directory "
                              "may hold only regular files and directories")
        rel = os.path.relpath(entry.path, src)
        if _FOREIGN_WEIGHTS.fullmatch(entry.name):
            raise UnsupportedError(entry.path, f"model weights of another framework, "
                                   f"{_FOREIGN_ADVICE}")
        if entry.name.lower().endswith(_FOREIGN_SUFFIXES) and st.st_size >= _FOREIGN_MIN:
            raise UnsupportedError(entry.path, f"{st.st_size} bytes in another framework's "
                                   f"format (weights or training state), {_FOREIGN_ADVICE}")
        if format_from_suffix(entry.name) is not None and not is_strategy_file(entry.path):
            layout.shards.append(rel)
        elif entry.name.endswith(".json") and _is_index(entry.path):
            layout.indexes.append(rel)
        elif directory != src or not (entry.name == MANIFEST
                                      or PART_MANIFEST.fullmatch(entry.name)):
            layout.others.append(rel)  # a manifest's name deeper down is copied as any file
        else:
            continue
        layout.sizes[rel] = st.st_size
        layout.mtimes[rel] = st.st_mtime_ns
    for subdirectory in subdirectories:
        _walk(src, subdirectory, layout, ancestors)


def _check_paths(src: str, dst: str, layout: SourceTree, report: Optional[str],
                 manifest: str = MANIFEST, writes_description: bool = False) -> None:
    """Nothing this run writes may land on anything it reads (a symlinked input directory or
    file may lead into DST) or on another of its files; every destination must be replaceable
    by a regular file; the report must not go into the input."""
    claims = paths.Claims()
    claims.read_tree(src, "the input directory")
    for linked in layout.linked:
        claims.read_tree(linked, "the input directory")
    for rel in layout.shards + layout.others + layout.indexes:
        claims.read(os.path.join(src, rel), "an input file")
    claims.write_in_place(paths.lock_path(dst, directory=True), "the output's lock file")
    claims.write(os.path.join(dst, manifest), "the manifest")
    paths.check_destination(os.path.join(dst, manifest), overwrite=True)
    for rel in layout.outputs(writes_description):
        out = os.path.join(dst, rel)
        _refuse_linked_parents(dst, rel)
        claims.write(out, "an output file")
        if os.path.lexists(out):
            paths.check_destination(out, overwrite=True)
    if report is not None:
        claims.write(report, "the report")
        paths.check_destination(report, overwrite=True)
        paths.check_json(report, "the report")
        if paths.resolved(report).startswith(paths.resolved(dst) + os.sep):
            raise OutputError(report, "is inside DST, which holds the conversion alone "
                              "(verify reports any other file there, and MindFormers reads "
                              "the directory): write the report elsewhere")


def _refuse_linked_parents(dst: str, rel: str) -> None:
    """An output's directories under DST must be real ones: writing through a symlinked one
    would put the file somewhere else than the layout says."""
    parts = rel.split(os.sep)[:-1]
    for depth in range(1, len(parts) + 1):
        path = os.path.join(dst, *parts[:depth])
        if os.path.islink(path):
            raise OutputError(path, f"is a symbolic link (to {os.readlink(path)}) inside the "
                              "output directory; remove it")
        if os.path.lexists(path) and not os.path.isdir(path):
            raise OutputError(path, "is in the way of an output directory; remove it")


def _make_directories(path: str) -> bool:
    """Create `path` and its parents; whether `path` itself was created."""
    if os.path.isdir(path):
        return False
    try:
        os.makedirs(path)
    except FileExistsError:
        if os.path.isdir(path):
            return False  # another process made it meanwhile
        raise OutputError(path, "is in the way of an output directory; remove it") from None
    except OSError as exc:
        raise OutputError(path, f"cannot create directory: {exc.strerror}") from None
    return True


def _remove_earlier_output(dst: str, writes: Set[str],
                           inputs: Set[Tuple[int, int]]) -> List[str]:
    """--overwrite: remove, before anything is written, the files DST's manifests (the whole
    run's, and the parts') record, so that DST holds this run's output and no stale file
    a loader would also take, even where the run fails or is stopped: an earlier index
    kept until this run's replaced it pointed at shards removed meanwhile, and earlier
    shards kept until their turn came mixed two runs' tensors. A file this run will not
    write again (the shards of an SRC that had more, a description of another scheme) is
    removed only where still exactly as recorded (size and sha256); one it writes again
    goes whatever it holds, as it would when replaced. Neither goes unless it is a regular
    file inside DST and not one of this run's inputs (`inputs`: their device and inode;
    SRC may reach into DST through a link): anything else there is not known to be ours
    to remove, and stays."""
    removed = []
    top = paths.resolved(dst)
    for name in [MANIFEST, *part_manifest_names(dst)]:
        path = os.path.join(dst, name)
        try:
            manifest = read_manifest(path, OutputError)
        except CkptRtnError:  # none, or unreadable: nothing in DST is known to be ours
            continue
        for rel in manifest["files"]:  # type: ignore[union-attr]
            try:
                out = os.path.join(dst, rel)
                inside = (not os.path.isabs(rel) and os.path.normpath(rel) == rel
                          and not rel.startswith(os.pardir)
                          and paths.resolved(os.path.dirname(out)) == os.path.dirname(
                              os.path.join(top, rel)))
                ours = (rel not in removed and inside and not os.path.islink(out)
                        and os.path.isfile(out) and paths.inode(out) not in inputs
                        and (rel in writes or _is_done(manifest, rel, out)))
            except (ValueError, UnicodeError):  # a name no file can have (NUL, a surrogate)
                continue
            except CkptRtnError:  # unreadable: not known to be ours
                continue
            if ours:
                _remove(out)
                removed.append(rel)
                _remove_emptied_parents(dst, rel)
    return [rel for rel in removed if rel not in writes]  # those not replaced: the report's


def _inodes(src: str, layout: SourceTree) -> Set[Tuple[int, int]]:
    """The device and inode of every input file, as reached from SRC (through links)."""
    return {found for found in (paths.inode(os.path.join(src, rel)) for rel in layout.sizes)
            if found is not None}


def _remove_emptied_parents(dst: str, rel: str) -> None:
    """The directories a removed file leaves empty, as a fresh DST would not have them."""
    parent = os.path.dirname(rel)
    while parent:
        try:
            os.rmdir(os.path.join(dst, parent))
        except OSError:
            return
        parent = os.path.dirname(parent)


def _remove_empty_directories(dst: str) -> None:
    """Remove the directories a refused run created, bottom up; anything holding a file stays."""
    for root, _, _ in os.walk(dst, topdown=False):
        try:
            os.rmdir(root)
        except OSError:
            pass


def _is_index(path: str) -> bool:
    """A JSON object with a `weight_map` (Hugging Face's sharded index), or a file named as
    one (`*.index.json`) that cannot be read: refused by name when rewritten, not copied as
    if it were some other file (a truncated download's index would name no new tensor)."""
    try:
        data = untrusted_json.load_file(path, "index", max_size=_MAX_INDEX_SIZE)
    except CkptRtnError:
        return path.endswith(".index.json")
    return isinstance(data, dict) and "weight_map" in data


def manifest_tensors(plan: converter.Plan) -> List[Dict[str, object]]:
    """A converted shard's tensors as its manifest entry lists them."""
    return _tensor_entries(plan.outputs)


def _tensor_entries(tensors: List[TensorInfo]) -> List[Dict[str, object]]:
    return [{"name": t.name, "dtype": t.dtype.name, "shape": list(t.shape), "nbytes": t.nbytes}
            for t in tensors]


def new_manifest(settings: Settings, sources: Dict[str, List[int]]) -> Dict[str, object]:
    return {"tool": "ckpt-rtn", "version": __version__, "settings": settings.to_dict(),
            "sources": sources, "files": {}}


def _load_manifest(dst: str, settings: Settings, sources: Dict[str, List[int]],
                   name: str = MANIFEST) -> Dict[str, object]:
    """The manifest `name` in `dst` (new if there is none), refused if made with other
    settings or from another SRC (`sources`: its files' stamps, SourceTree.stamps())."""
    path = os.path.join(dst, name)
    if not os.path.exists(path):
        return new_manifest(settings, sources)
    manifest = read_manifest(path, ConfigError, "; remove it (and the output) to start over")
    _check_settings(path, manifest, settings)
    _check_sources(path, manifest, sources)
    manifest["sources"] = sources  # where a version that did not record them wrote it
    return manifest


def _check_sources(path: str, manifest: Dict[str, object],
                   sources: Dict[str, List[int]]) -> None:
    """Refuse a manifest written while SRC was otherwise: a file changed (size or
    modification time), added or removed since. Its outputs would be kept beside ones
    made from the new files, and a weight split across ranks takes its scales from all
    of them, so no file of it can be trusted."""
    recorded = manifest.get("sources")
    if recorded is None or recorded == sources:  # None: a version that did not record them
        return
    if not isinstance(recorded, dict):
        raise ConfigError(path, 'unreadable manifest ("sources" is not an object); remove it '
                          "(and the output) to start over")
    rel = min(name for name in set(recorded) | set(sources)
              if name not in recorded or name not in sources or recorded[name] != sources[name])
    how = ("is gone" if rel not in sources else "is new" if rel not in recorded
           else "has changed (its size or modification time)")
    raise ConfigError(path, f"the input's {rel} {how} since this manifest was written; "
                      "start over in a new directory, or with a whole run's --overwrite "
                      "(or remove DST to start the parts over)")


def _check_settings(path: str, manifest: Dict[str, object], settings: Settings) -> None:
    if manifest.get("settings") != settings.to_dict():
        try:
            were = Settings.from_dict(manifest.get("settings"), path).summary
        except FormatError:
            were = "not recorded by this ckpt-rtn version"
        raise ConfigError(path, f"was written with other settings ({were}; this run: "
                          f"{settings.summary}); resume with the same options, or start over "
                          "in a new directory")


def part_manifest(part: Part) -> str:
    """The manifest a part records its shards in: 'ckpt-rtn-manifest.part-0-of-4.json'."""
    return f"ckpt-rtn-manifest.{part.label}.json"


def _dead_part_locks(dst: str) -> List[str]:
    """The lock files of parts' manifests in `dst`: SIGKILLed parts leave theirs."""
    try:
        return sorted(name for name in os.listdir(dst) if _PART_LOCK.fullmatch(name))
    except OSError as exc:
        raise OutputError(dst, f"cannot list: {exc.strerror}") from None


def part_manifest_names(dst: str) -> List[str]:
    try:
        return sorted(name for name in os.listdir(dst) if PART_MANIFEST.fullmatch(name))
    except OSError as exc:
        raise OutputError(dst, f"cannot list: {exc.strerror}") from None


def _remove_part_manifests(dst: str) -> None:
    for name in part_manifest_names(dst):
        _remove(os.path.join(dst, name))


def _part_manifests(dst: str, settings: Settings, sources: Dict[str, List[int]],
                    own: str) -> Tuple[Dict[str, object], Dict[str, object]]:
    """A part's own manifest, and what it may skip: the shards its own manifest or the
    directory's shows done. Every manifest already in `dst` is checked first, so a part
    started with other options than the others (or over a changed SRC) fails at once, not
    at the merge."""
    mine = new_manifest(settings, sources)
    done = _load_manifest(dst, settings, sources)
    for name in part_manifest_names(dst):
        manifest = _load_manifest(dst, settings, sources, name)
        if name == own:
            mine = manifest
    done["files"] = {**done["files"], **mine["files"]}  # type: ignore[dict-item]
    return mine, done


def _merged_manifest(dst: str, settings: Settings,
                     sources: Dict[str, List[int]]) -> Dict[str, object]:
    """The directory's manifest with every part's entries added (a part's is the newer);
    each entry is still checked against its file before it is trusted (_is_done)."""
    manifest = _load_manifest(dst, settings, sources)
    for name in part_manifest_names(dst):
        part = _load_manifest(dst, settings, sources, name)
        manifest["files"].update(part["files"])  # type: ignore[union-attr]
    return manifest


def read_manifest(path: str, error: Type[CkptRtnError], advice: str = "") -> Dict[str, object]:
    """A manifest whose shape was checked (files' size, sha256 and tensor lists): `--resume`
    and `verify` trust its entries. Anything else raises `error`, with `advice` after it."""
    manifest = untrusted_json.load_file(path, "manifest", max_size=_MAX_INDEX_SIZE, error=error)
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise error(path, f"unreadable manifest ({problem}){advice}")
    assert isinstance(manifest, dict)
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
    """The output exists and is byte for byte what the manifest recorded, and holds the
    tensors it lists (the indexes and the description are written from those lists)."""
    entry = manifest["files"].get(rel)  # type: ignore[union-attr]
    if entry is None or not os.path.isfile(out) or _size(out) != entry["size"]:
        return False
    if sha256_of(out) != entry["sha256"]:
        return False
    if "tensors" not in entry:
        return True
    try:
        with open_reader(out, verify_crc=False) as reader:  # in the file's order, not the plan's
            held = _tensor_entries(reader.tensors)
    except CkptRtnError:  # a manifest that records a file as a shard it is not
        return False
    return _by_name(held) == _by_name(entry["tensors"])  # type: ignore[arg-type]


def _by_name(tensors: List[Dict[str, object]]) -> List[Dict[str, object]]:
    return sorted(tensors, key=lambda tensor: str(tensor["name"]))


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError as exc:
        raise OutputError(path, f"cannot read: {exc.strerror}") from None


def _record(dst: str, manifest: Dict[str, object], rel: str, out: str,
            tensors: Optional[List[Dict[str, object]]], name: str = MANIFEST) -> None:
    """Add an output file to the manifest and save it (atomically) as `name`."""
    entry: Dict[str, object] = {"size": _size(out), "sha256": sha256_of(out)}
    if tensors is not None:
        entry["tensor_count"] = len(tensors)
        entry["tensors"] = tensors
    manifest["files"][rel] = entry  # type: ignore[index]
    _save(dst, name, manifest)


def _save(dst: str, name: str, manifest: Dict[str, object]) -> None:
    # Compact, so that json's C encoder does it: a run saves the whole manifest after each
    # shard, and with indentation (pure Python) 200 000 tensor entries took 1.1 s a save.
    write_bytes_atomic(os.path.join(dst, name),
                       json.dumps(manifest, separators=(",", ":")).encode())


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise OutputError(path, f"cannot remove: {exc.strerror}") from None


def _rewrite_index(src: str, dst: str, rel: str, manifest: Dict[str, object]) -> None:
    write_bytes_atomic(os.path.join(dst, rel),
                       rewritten_index(src, rel, manifest["files"]))  # type: ignore[arg-type]


def rewritten_index(src: str, rel: str, files: Dict[str, Dict[str, object]]) -> bytes:
    """The index `rel` with every output tensor pointing at its shard (from the manifest
    `files`' tensor lists); total_size becomes the output's tensor bytes. A `.ckpt` shard's
    settings record is not a tensor to look up: it is left out."""
    path = os.path.join(src, rel)
    index, old_map = _read_index(path)
    holders: Dict[str, Dict[str, int]] = {}  # output tensor -> {shard: its bytes}
    for shard in sorted(set(old_map.values())):
        entry = files.get(os.path.normpath(os.path.join(os.path.dirname(rel), shard)))
        if entry is None or "tensors" not in entry:
            raise FormatError(path, f"weight_map names {shard!r}, which is not a converted shard")
        for tensor in entry["tensors"]:  # type: ignore[union-attr]
            if tensor["name"] != SETTINGS_NAME:
                holders.setdefault(tensor["name"], {})[shard] = tensor["nbytes"]
    # A tensor copied into several shards (the input held it twice) stays where the index
    # pointed: a loader reads that copy, which may hold other values than the rest.
    weight_map = {name: old_map[name] if old_map.get(name) in shards else min(shards)
                  for name, shards in holders.items()}
    total = sum(holders[name][shard] for name, shard in weight_map.items())
    index["weight_map"] = dict(sorted(weight_map.items()))
    metadata = index.get("metadata")
    index["metadata"] = {**(metadata if isinstance(metadata, dict) else {}), "total_size": total}
    return json.dumps(index, indent=2).encode() + b"\n"


def _read_index(path: str) -> Tuple[Dict[str, object], Dict[str, str]]:
    """An index JSON and its weight_map (tensor name -> shard file), checked."""
    index = untrusted_json.load_file(path, "index", max_size=_MAX_INDEX_SIZE)
    old_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(old_map, dict):
        raise FormatError(path, "weight_map is not a JSON object (tensor name -> shard file)")
    for name, shard in old_map.items():
        if not isinstance(shard, str):
            raise FormatError(path, f"weight_map gives tensor {untrusted_json.brief(name)} the "
                              f"shard {untrusted_json.brief(shard)}, which is not a file name")
    assert isinstance(index, dict)
    return index, old_map


def _check_indexes(src: str, layout: SourceTree) -> None:
    """Refuse an index naming a shard that SRC does not hold before anything is written: its
    rewrite, after every shard is converted, would fail, and so would every --resume."""
    shards = set(layout.shards)
    for rel in layout.indexes:
        path = os.path.join(src, rel)
        for shard in sorted(set(_read_index(path)[1].values())):
            if os.path.normpath(os.path.join(os.path.dirname(rel), shard)) in shards:
                continue
            if shard.lower().endswith(_FOREIGN_SUFFIXES):  # beside its weights: a snapshot
                raise UnsupportedError(path, f"indexes weights of another framework "  # of both
                                       f"({shard!r}), {_FOREIGN_ADVICE}")
            raise FormatError(path, f"weight_map names {shard!r}, which is not a "
                              ".safetensors or .ckpt file of this directory")


def _remove_dead_temp_files(dst: str) -> None:
    """Temporary files of killed runs: never valid output. One whose PID is alive stays: no
    live run writes here while this one holds the lock, but its PID may have been reused."""
    for root, _, _ in os.walk(dst):
        remove_dead_temp_files(root)


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(16 * 1024 * 1024), b""):
                digest.update(block)
    except OSError as exc:
        raise OutputError(path, f"cannot read: {exc.strerror}") from None
    return digest.hexdigest()
