"""One checkpoint in, one quantized checkpoint out, a tensor at a time.

The converter joins the pieces that know nothing of each other: a format
reader indexes the input, the rules pick the Linear weights, the scheme's
RTN math quantizes them, and a format writer streams the result. The whole
output is planned from the input's headers before any data moves, which
lets the safetensors writer lay out its header first, lets `--dry-run`
report the exact output size, and refuses unsupported input before anything
is written. Tensors then flow through a read-ahead / quantize / write-behind
pipeline that holds a few of them at most, whatever the model's size.
"""
from __future__ import annotations

import contextlib
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import __version__, description, dtypes, formats, fp8, paths
from .errors import (CkptRtnError, ConfigError, FormatError, OutputError, QuantizationError,
                     UnsupportedError)
from .buffers import BufferPool, empty
from .description import is_description, others_beside
from .formats.atomic import held
from .formats.tensor import TensorInfo, TensorReader
from .numerics import FloatFormat
from .options import ConvertOptions
from .pipeline import run_pipeline
from .rtn import NonFiniteWeightError, RowBounds, kernel_name
from .rules import IN_OUT, MINDFORMERS, OUT_IN, RuleChoice, Rules, Selection
from .packing import transpose_into, transposed
from .schemes import Quantized, Scheme, detect_scheme, get_scheme
from .settings import NAME as SETTINGS_NAME, Settings

_FLOAT_FORMATS = {
    dtypes.FLOAT16: FloatFormat.FLOAT16,
    dtypes.BFLOAT16: FloatFormat.BFLOAT16,
    dtypes.FLOAT32: FloatFormat.FLOAT32,
    dtypes.FLOAT64: FloatFormat.FLOAT64,
}

DEFAULT_SCHEME = get_scheme()

#: Called as progress(advance, total) with input bytes done since the last call.
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class Step:
    """What becomes of one input tensor: copied/renamed, or quantized into the scheme's tensors.

    An FP8 source carries its block scales (`scale`): it is dequantized to
    bfloat16 as it is read (fp8.py), and copied or quantized as that.
    """

    source: TensorInfo
    outputs: Tuple[TensorInfo, ...]
    selection: Optional[Selection] = None
    scale: Optional[TensorInfo] = None

    @property
    def quantized(self) -> bool:
        return self.selection is not None

    @property
    def dtype(self) -> dtypes.DType:
        """The dtype of the values the step works on: an FP8 source's is bfloat16."""
        return self.source.dtype if self.scale is None else dtypes.BFLOAT16

    @property
    def layer(self) -> Optional[str]:
        return None if self.selection is None else self.selection.layer


@dataclass
class Plan:
    """The complete output of a conversion, known before any tensor is read."""

    steps: List[Step]
    out_format: str
    metadata: Dict[str, str]
    crc: bool
    rules: Rules
    scheme: Scheme
    settings: Settings
    dropped: List[TensorInfo] = field(default_factory=list)
    #: The input file the plan was made from.
    source: str = ""
    #: Block scales of FP8 weights: read into their weights' steps (here or in another
    #: shard), not written.
    consumed: List[TensorInfo] = field(default_factory=list)
    #: The block scales of this file's FP8 weights that lie in other shards.
    others: fp8.OtherShards = fp8.NONE

    @property
    def records(self) -> List[Tuple[TensorInfo, np.ndarray]]:
        """str records written after the tensors, as append_dict does: a `.ckpt`'s settings
        (safetensors holds them in its metadata)."""
        if self.out_format != "ckpt":
            return []
        text = np.array(self.settings.to_json())
        return [(TensorInfo(SETTINGS_NAME, dtypes.STRING, (), text.nbytes), text)]

    @property
    def outputs(self) -> List[TensorInfo]:
        """Every tensor and record of the output file, in the order they are written."""
        return [out for step in self.steps for out in step.outputs] + [
            info for info, _ in self.records]

    @property
    def quantized(self) -> List[Step]:
        return [s for s in self.steps if s.quantized]

    @property
    def dequantized(self) -> List[Step]:
        """The steps of FP8 weights (quantized or written as bfloat16)."""
        return [s for s in self.steps if s.scale is not None]

    @property
    def output_size(self) -> int:
        """Exact size in bytes of the file this plan writes."""
        return formats.planned_size(self.outputs, format=self.out_format,
                                    metadata=self.metadata, crc=self.crc)


@dataclass(frozen=True)
class LayerError:
    """Dequantization error of one quantized Linear (see rtn.ErrorStats)."""

    layer: str
    shape: Tuple[int, ...]
    dtype: str
    max_abs: float
    mean_abs: float
    relative: float


@dataclass(frozen=True)
class Stages:
    """Seconds the read, quantize and write stages were busy during a conversion.

    They overlap (see pipeline.py), so the wall time is at least the largest
    of them, and close to it when the pipeline keeps every stage fed; the one
    that is close to the wall time is the one that bounds the run. `write`
    includes committing the output (flush, fsync, rename). `kernels` is the
    time the quantize stage waited, before its first weight, for the compiled
    kernels to load (numba's set-up, a fixed cost per process): not counted
    in `quantize`, since nothing was quantized meanwhile.
    """
    read: float
    quantize: float
    write: float
    kernels: float = 0.0

    def to_json(self) -> Dict[str, float]:
        return {"read_s": round(self.read, 3), "quantize_s": round(self.quantize, 3),
                "write_s": round(self.write, 3), "kernels_s": round(self.kernels, 3)}

    def __add__(self, other: "Stages") -> "Stages":
        return Stages(self.read + other.read, self.quantize + other.quantize,
                      self.write + other.write, self.kernels + other.kernels)


@dataclass(frozen=True)
class Result:
    plan: Plan
    input_size: int
    output_size: int
    seconds: float
    workers: int
    errors: List[LayerError]
    stages: Stages

    def to_json(self) -> Dict[str, object]:
        """The --report document."""
        plan = self.plan
        return {
            "tool": "ckpt-rtn", "version": __version__, "scheme": plan.scheme.name,
            "group_size": plan.scheme.group_size,
            "symmetric": plan.scheme.spec.symmetric, "family": plan.rules.family,
            "format": plan.out_format, "workers": self.workers, "kernel": kernel_name(),
            "input_bytes": self.input_size, "output_bytes": self.output_size,
            "ratio": self.output_size / self.input_size if self.input_size else None,
            "tensors_quantized": len(plan.quantized),
            "tensors_copied": len(plan.steps) - len(plan.quantized),
            "tensors_dropped": [t.name for t in plan.dropped],
            "seconds": round(self.seconds, 3), "stages": self.stages.to_json(),
            "throughput_gb_per_s": round(self.input_size / self.seconds / 1e9, 4)
            if self.seconds else None,
            "layers": [{"layer": e.layer, "shape": list(e.shape), "dtype": e.dtype,
                        "max_abs_error": e.max_abs, "mean_abs_error": e.mean_abs,
                        "relative_error": e.relative} for e in self.errors],
        }


def make_plan(reader: TensorReader, rules: Rules, out_format: str, *, crc: bool = False,
              scheme: Scheme = DEFAULT_SCHEME, others: fp8.OtherShards = fp8.NONE) -> Plan:
    """Decide every output tensor from the input's index, the rules and the scheme; `others`:
    what this file's FP8 weights and scales have in a directory's other shards."""
    if not reader.tensors:
        raise FormatError(reader.path, "contains no tensors")
    if scheme.mcore and out_format != "safetensors":
        raise UnsupportedError(reader.path, f"--scheme {scheme.name} writes safetensors, the only "
                               "format MindFormers' Mcore networks load, not "
                               f"{out_format} (name a single output .safetensors; a directory's "
                               ".ckpt shards would stay .ckpt)")
    if scheme.mcore and rules.naming == MINDFORMERS:
        raise UnsupportedError(reader.path, f"--scheme {scheme.name} writes for MindFormers' "
                               "Mcore networks, which load Hugging Face names; the "
                               f"{rules.family} rules select MindFormers-style names, which no "
                               "Mcore network loads: use --scheme w8a16, w8a16-ptq or w4a16")
    selections = {info.name: rules.select(info) for info in reader.tensors}
    quantized = {s.layer for s in selections.values() if s is not None}
    scales, consumed = fp8.pair_scales(reader.tensors, reader.path, others)
    steps, dropped = [], []
    for info in reader.tensors:
        selection = selections[info.name]
        if info.name in consumed:
            continue
        scale = scales.get(info.name)
        if scale is not None:  # planned as the bfloat16 weight it is read as
            work = TensorInfo.of(info.name, dtypes.BFLOAT16, info.shape)
            outputs = ((work,) if selection is None
                       else _quantized_outputs(reader.path, scheme, selection, work))
            steps.append(Step(info, outputs, selection, scale))
            continue
        if info.name == SETTINGS_NAME:
            if info.dtype is not dtypes.STRING:
                raise UnsupportedError(reader.path, f"tensor {info.name!r} has the name of the "
                                       "str record ckpt-rtn writes its settings to")
            continue  # the settings of the conversion that made this input: replaced
        if out_format == "safetensors" and info.dtype.safetensors is None:
            if info.dtype is not dtypes.STRING:
                raise UnsupportedError(reader.path, f"tensor {info.name!r} is {info.dtype}, which "
                                       "safetensors cannot store; write a .ckpt instead")
            dropped.append(info)  # append_dict strings: training metadata safetensors cannot hold
            continue
        if selection is not None:
            outputs = _quantized_outputs(reader.path, scheme, selection, info)
            steps.append(Step(info, outputs, selection))
        elif info.name.endswith(".bias") and info.name[:-len(".bias")] in quantized:
            renamed = scheme.names(info.name[:-len(".bias")]).bias
            steps.append(Step(info, (TensorInfo(renamed, info.dtype, info.shape, info.nbytes),)))
        else:
            steps.append(Step(info, (info,)))
    _check_unique_outputs(reader.path, steps, scheme)
    written = {out.name for step in steps for out in step.outputs}
    # A stale CRC, and the per-tensor marks (Int4) of the input's tensors and of any
    # tensor written: a mark named as an output tensor would retype it (int8 codes as Int4).
    metadata = {k: v for k, v in reader.metadata.items()
                if k != "crc_num" and k not in selections and k not in written}
    metadata["format"] = "ms"
    settings = Settings.of(rules, scheme, crc=crc, out_format=out_format)
    if out_format == "safetensors":
        metadata[SETTINGS_NAME] = settings.to_json()
    return Plan(steps, out_format, metadata, crc, rules, scheme, settings, dropped, reader.path,
                [t for t in reader.tensors if t.name in consumed], others)


def _check_unique_outputs(path: str, steps: Sequence[Step], scheme: Scheme) -> None:
    """Refuse a plan that writes one name twice: a tensor the input already holds under a
    name the scheme gives a quantized layer's new tensors (`q_proj.weight_scale`,
    `_handler.bias`), which a loader would take for either."""
    made_by: Dict[str, str] = {}
    for step in steps:
        for out in step.outputs:
            first = made_by.setdefault(out.name, step.source.name)
            if first != step.source.name:
                raise UnsupportedError(path, output_clash(out.name, repr(first),
                                                          repr(step.source.name), scheme))


def output_clash(name: str, first: str, second: str, scheme: Scheme) -> str:
    """Why two input tensors (as the reason names them) cannot both be written."""
    return (f"tensors {first} and {second} would both be written as {name!r}, a name "
            f"--scheme {scheme.name} gives a quantized layer's tensor (is the input partly "
            "quantized already?)")


def _quantized_outputs(path: str, scheme: Scheme, selection: Selection,
                       info: TensorInfo) -> Tuple[TensorInfo, ...]:
    if selection.layout is None:
        raise QuantizationError(path, f"tensor {info.name!r}: the rules do not say whether it is "
                                "stored [out, in] or [in, out]; give it a layout in a config "
                                "YAML (--config FILE) instead of --include")
    if scheme.mcore and selection.layout == IN_OUT:
        raise QuantizationError(path, f"tensor {info.name!r} is stored [in, out]; --scheme "
                                f"{scheme.name} writes Hugging Face [out, in] weights, which is "
                                "what MindFormers' Mcore networks load")
    out_channels, in_channels = info.shape if selection.layout == OUT_IN else info.shape[::-1]
    scheme = scheme.for_layer(selection.layer)
    reason = scheme.check(out_channels, in_channels)
    if reason is not None:
        raise QuantizationError(path, f"tensor {info.name!r} {list(info.shape)}: {reason}")
    return scheme.stored_outputs(selection.layer, info, selection.layout == IN_OUT)


def output_format(dst: "os.PathLike[str] | str", requested: Optional[str], crc: bool) -> str:
    """--format if given, else the output's suffix; never one the suffix contradicts."""
    named = formats.format_from_suffix(dst)
    if requested is not None and named not in (None, requested):
        raise OutputError(dst, f"--format {requested} would write a {requested} file under a "
                          f".{named} name, which readers (ckpt-rtn's too) take for {named}: "
                          f"name it .{requested}")
    fmt = requested or named
    if fmt is None:
        raise OutputError(dst, "cannot tell the output format from the file name: "
                          "name it .ckpt or .safetensors, or pass --format")
    return fmt


def check_output(src: "os.PathLike[str] | str", dst: "os.PathLike[str] | str",
                 overwrite: bool, report: "os.PathLike[str] | str | None" = None, *,
                 description: "os.PathLike[str] | str | None" = None) -> None:
    """Refuse an output path (or a --report path, or the quantization description written
    beside the output) that would clobber the input, each other, an existing file without
    --overwrite, or anything but a regular file (a directory, a device, a FIFO, a symbolic
    link)."""
    claims = paths.Claims()
    claims.read(src, "the input file")
    claims.write(dst, "the output")
    claims.write_in_place(paths.lock_path(dst), "the output's lock file")
    paths.check_destination(dst, overwrite=overwrite)
    if report is not None:
        claims.write(report, "the report")
        claims.write_in_place(paths.lock_path(report), "the report's lock file")
        paths.check_destination(report, overwrite=True)
        paths.check_json(report, "the report")
    if description is not None:
        claims.write(description, "the quantization description")
        claims.write_in_place(paths.lock_path(description), "the description's lock file")
        paths.check_destination(description, overwrite=overwrite)
        others = others_beside(dst)
        if others:
            raise OutputError(others[0], "is a quantization description too, and MindFormers "
                              f"refuses a folder holding two: remove it, or write {dst} to "
                              "another folder")
        if report is not None and is_description(os.path.basename(report)) and \
                paths.resolved(os.path.dirname(os.path.abspath(report))) == \
                paths.resolved(os.path.dirname(os.path.abspath(dst))):
            raise OutputError(report, "MindFormers would take a report of this name beside the "
                              "output for a second quantization description: name it "
                              "otherwise, or write it elsewhere")


@contextlib.contextmanager
def claimed_output(src: "os.PathLike[str] | str", dst: "os.PathLike[str] | str",
                   overwrite: bool, report: "os.PathLike[str] | str | None" = None, *,
                   description: "os.PathLike[str] | str | None" = None) -> Iterator[None]:
    """Hold `dst`, `report` and `description` for one run: checked, locked against other
    ckpt-rtn runs (two outputs in one folder share its description), cleared of the
    temporary files dead runs left for them.

    Checked again once locked: another run may have written them meanwhile.
    """
    check_output(src, dst, overwrite, report, description=description)
    with contextlib.ExitStack() as holding:
        for path in (dst, report, description):
            if path is not None:
                holding.enter_context(held(path, keep=[src]))
        check_output(src, dst, overwrite, report, description=description)
        yield


def plan_conversion(src: "os.PathLike[str] | str", dst: "os.PathLike[str] | str",
                    options: ConvertOptions = ConvertOptions()) -> Plan:
    """The plan `convert` would follow, after the same checks, writing nothing (--dry-run)."""
    check_output(src, dst, options.overwrite, description=description_path(dst, options.scheme))
    fmt = output_format(dst, options.format, options.crc)
    with formats.open_reader(src, verify_crc=options.verify_crc) as reader:
        return make_plan(reader, resolve_rules(options.rules, reader), fmt, crc=options.crc,
                         scheme=options.scheme)


def description_path(dst: "os.PathLike[str] | str", scheme: Scheme) -> Optional[str]:
    """Where a single output file's quant_model_description.json goes; None for a scheme that
    writes none."""
    return description.path_beside(dst) if scheme.mcore else None


def resolve_rules(rules: "Rules | RuleChoice", reader: TensorReader) -> Rules:
    """Rules as given, or chosen from this file's tensor names (see rules_for)."""
    return rules_for(rules, reader.tensors, reader.path)


def rules_for(rules: "Rules | RuleChoice", tensors: Sequence[TensorInfo],
              where: "os.PathLike[str] | str") -> Rules:
    """Rules as given, or chosen from a checkpoint's tensor names (family detection):
    those of one file, or of every shard of a directory; `where` names it in errors.

    An already quantized checkpoint is named as such rather than as one of
    no known family: its Linear weights are integer codes, so converting it
    only copies it, which needs an explicit --config.
    """
    if isinstance(rules, Rules):
        return rules
    found = detect_scheme(tensors) if rules.config is None else None
    if found is not None:
        count = len(found.layers)
        raise UnsupportedError(where, f"is already quantized ({found.label}, {count} "
                               f"Linear layer{'' if count == 1 else 's'}): convert the "
                               "floating-point checkpoint it was made from (or pass --config "
                               "FAMILY to copy it into another format)")
    try:
        return rules.resolve(t.name for t in tensors)
    except ConfigError as exc:
        raise ConfigError(where, exc.reason) from None


def writer_threads(workers: int) -> int:
    """Threads that write the output for `workers` quantizing ones (see stream): one per
    two workers, at least two from two workers on, at most 4.

    Two on 2 cores: a weight's codes, placed for a direct write, then need
    no copy, and go out beside a copied tensor being staged instead of
    after it (with one writer, the quantize stage of a one-layer W4A16
    conversion waited 0.1-0.3 s for `lm_head`'s write). Alternating fresh
    one-layer conversions: W4A16 median 1.37-1.45 s against 1.56-1.62,
    W8A16 1.31 against 1.46. (Through the page cache, before direct writes,
    a second writer's copy competed with quantizing and measured no faster.)
    """
    return min(4, max(min(workers, 2), workers // 2))


def default_workers() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def convert(src: "os.PathLike[str] | str", dst: "os.PathLike[str] | str",
            options: ConvertOptions = ConvertOptions(), *,
            row_bounds: Optional[Mapping[str, RowBounds]] = None,
            progress: Optional[ProgressFn] = None,
            others: fp8.OtherShards = fp8.NONE) -> Result:
    """Convert `src` to a quantized checkpoint at `dst`; returns what was done.

    Tensors stream through a read-ahead / quantize / write-behind pipeline;
    `options.workers` threads share each weight's rows (the output does not
    depend on their number). `options.stats` measures each layer's
    dequantization error. `row_bounds` gives, by tensor name, the
    per-output-channel (min, max) of the whole weight a tensor is an
    input-channel slice of (sharded checkpoints). `progress` is called after
    each tensor with its input bytes and the total. `others`: what the FP8
    weights and scales of a directory's shard have in the other shards.
    """
    started = time.perf_counter()
    check_output(src, dst, options.overwrite)
    fmt = output_format(dst, options.format, options.crc)
    workers = options.workers or default_workers()
    with formats.open_reader(src, verify_crc=options.verify_crc, defer_crc=True) as reader, \
            ThreadPoolExecutor(workers, thread_name_prefix="ckpt-rtn-rtn") as pool:
        plan = make_plan(reader, resolve_rules(options.rules, reader), fmt, crc=options.crc,
                         scheme=options.scheme, others=others)
        with formats.open_writer(dst, plan.outputs, format=fmt, metadata=plan.metadata,
                                 crc=options.crc, direct=not options.page_cache) as writer:
            # A bad CRC fails here, so the output is discarded before it is committed.
            errors, stages = stream(reader, plan,
                                    lambda info, array: writer.write(info.name, array),
                                    pool=pool if workers > 1 else None, stats=options.stats,
                                    row_bounds=row_bounds, progress=progress,
                                    writers=writer_threads(workers), copies_first=True,
                                    placement=writer.data_offset)
            committing = time.perf_counter()
        stages = replace(stages, write=stages.write + time.perf_counter() - committing)
    return Result(plan, os.path.getsize(src), plan.output_size,  # dst may not be renamed yet
                  time.perf_counter() - started, workers, errors, stages)


def stream(reader: TensorReader, plan: Plan, sink: Callable[[TensorInfo, np.ndarray], None], *,
           pool: Optional[ThreadPoolExecutor] = None, stats: bool = False,
           row_bounds: Optional[Mapping[str, RowBounds]] = None,
           progress: Optional[ProgressFn] = None,
           writers: int = 1, copies_first: bool = False,
           placement: Optional[Callable[[str], int]] = None) -> Tuple[List[LayerError], Stages]:
    """Hand `sink` every output tensor and record of `plan` (in order when `writers` is 1 and
    not `copies_first`; the records always last), computed from `reader`'s tensors through
    the read-ahead / quantize / write-behind pipeline; then run the reader's deferred checks
    (its CRC). `convert` writes what `sink` gets, `verify` compares it. Returns each layer's
    error when `stats`, and how busy each stage was (`write` without a commit: the caller's).
    `progress` is called from the writing threads one at a time.

    The kernels are loaded in a thread meanwhile (warm_up), which the first weight waits
    for (`Stages.kernels`). For a sink that writes each tensor at its planned place (the
    formats' writers), `writers` threads call it at once, and `copies_first` sends the
    tensors only copied through first (each kind in plan order, where the reader allows any
    order): they are written while the kernels load, instead of the last of them after the
    last weight. `placement` gives the file offset an output tensor goes to: each weight's
    codes are then made at an address that lets them be written around the page cache
    without a copy (BufferPool.placed).
    """
    errors: List[LayerError] = []
    total = reader.nbytes
    # Code arrays given back are kept for reuse (see buffers.py), up to twice the largest
    # weight's bytes: four of its int8 code arrays for a 16-bit weight, eight for float32.
    buffers = BufferPool(2 * max((step.source.nbytes for step in plan.quantized), default=0))

    waited = 0.0  # for the kernels, before the first weight

    def quantize(step: Step, data: np.ndarray) -> Tuple[np.ndarray, ...]:
        nonlocal waited
        if step.quantized and warming.is_alive():  # a copy goes on: it needs no kernel
            started = time.perf_counter()
            warming.join()
            waited += time.perf_counter() - started
        lender = buffers
        if placement is not None and step.quantized:  # the codes come first in its outputs
            lender = buffers.placed(placement(step.outputs[0].name))
        result = convert_step(reader.path, step, data, plan.scheme, pool=pool, stats=stats,
                              row_bounds=row_bounds, buffers=lender)
        if result.stats is not None:
            errors.append(LayerError(step.layer or "", step.source.shape, step.dtype.name,
                                     result.stats.max_abs, result.stats.mean_abs,
                                     result.stats.relative))
        return result.arrays

    reporting = threading.Lock()

    def store(step: Step, arrays: Tuple[np.ndarray, ...]) -> None:
        for info, array in zip(step.outputs, arrays):
            sink(info, array)
        buffers.give(arrays)
        if progress is not None:
            with reporting:
                progress(step.source.nbytes, total)

    # The kernels load while the first tensors are read and the ones copied are written.
    warming = threading.Thread(target=warm_up, args=(plan, stats), name="ckpt-rtn-warm-up",
                               daemon=True)
    warming.start()
    try:
        steps = plan.steps
        if copies_first and reader.any_order:
            steps = sorted(steps, key=lambda step: step.quantized)
        busy = run_pipeline(steps, lambda step: load_step(reader, plan, step), quantize,
                            store, size=lambda step: step.source.nbytes, writers=writers)
        for info, value in plan.records:
            sink(info, value)
    except CkptRtnError:
        reader.finish()  # a CRC mismatch explains the failure better than its symptom
        raise
    finally:
        warming.join()
    reader.finish()
    if progress is not None and (plan.dropped or plan.consumed):
        progress(sum(t.nbytes for t in plan.dropped + plan.consumed), total)
    return errors, Stages(read=busy.load, quantize=busy.process - waited, write=busy.store,
                          kernels=waited)


def warm_up(plan: Plan, stats: bool) -> None:
    """Get the kernels ready that quantizing `plan`'s weights runs (see Scheme.warm_up)."""
    ready = set()
    for step in plan.quantized:
        assert step.selection is not None
        scheme, fmt = plan.scheme.for_layer(step.selection.layer), float_format(step.dtype)
        if (scheme, fmt) not in ready:
            ready.add((scheme, fmt))
            try:
                scheme.warm_up(fmt, stats)
            except Exception:  # pragma: no cover - the weight itself then fails, and says why
                return


def load_step(reader: TensorReader, plan: Plan, step: Step) -> np.ndarray:
    """A step's source data as `convert_step` takes it: an FP8 weight dequantized to bfloat16
    with its block scales (from this file or, in `plan.others`, another shard)."""
    data = reader.read(step.source)
    if step.scale is None:
        return data
    held = plan.others.scales.get(step.scale.name)
    scale = held[1] if held is not None else reader.read(step.scale)
    problem = fp8.scale_problem(scale)
    if problem is not None:
        raise FormatError(reader.path, f"tensor {step.scale.name!r}: {problem}")
    return fp8.dequantize_bf16(data, scale)


def convert_step(path: str, step: Step, data: np.ndarray, scheme: Scheme, *,
                 pool: Optional[ThreadPoolExecutor] = None, stats: bool = False,
                 row_bounds: Optional[Mapping[str, RowBounds]] = None,
                 buffers: Optional[BufferPool] = None) -> Quantized:
    """The arrays `convert` writes for one step, in the order of `step.outputs`, from its
    source tensor's data as `load_step` gives it (`verify` recomputes them the same way);
    the codes' arrays come from `buffers` when given."""
    if not step.quantized:
        return Quantized((data,), None)
    return _quantize(path, step, data, scheme, pool, stats,
                     (row_bounds or {}).get(step.source.name), buffers)


def float_format(dtype: dtypes.DType) -> FloatFormat:
    """The RTN float format of a selected (float) weight's dtype."""
    return _FLOAT_FORMATS[dtype]


def out_in_view(data: np.ndarray, selection: Selection) -> np.ndarray:
    """A selected weight as [out, in], whatever its stored layout (a view)."""
    return data.T if selection.layout == IN_OUT else data


def _quantize(path: str, step: Step, data: np.ndarray, scheme: Scheme,
              pool: Optional[ThreadPoolExecutor], stats: bool,
              bounds: Optional[RowBounds], buffers: Optional[BufferPool]) -> Quantized:
    """The scheme's arrays for a selected weight, given in its stored layout."""
    assert step.selection is not None
    scheme = scheme.for_layer(step.selection.layer)
    in_out = step.selection.layout == IN_OUT
    # [in, out] turned tile by tile: numpy copying the transposed view took 2.4x as long
    weight = transposed(data) if in_out else np.ascontiguousarray(data)
    try:
        result = scheme.quantize(weight, float_format(step.dtype), pool=pool,
                                 stats=stats, bounds=bounds, buffers=buffers)
    except NonFiniteWeightError as exc:
        raise QuantizationError(path, f"tensor {step.source.name!r}: {exc}") from None
    if in_out and not scheme.packs_int4:
        q, *rest = result.arrays
        turned = empty(q.shape[::-1], np.int8, buffers)  # placed for the write, as q was
        transpose_into(q, turned)
        if buffers is not None:
            buffers.give([q])
        return Quantized((turned, *rest), result.stats)
    return result
