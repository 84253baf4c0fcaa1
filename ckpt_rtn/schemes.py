"""Quantization schemes: which RTN variant, and how its tensors are named and stored.

    w8a16      Golden Stick v0.5.0 RoundToNearest (the default): int8 per output
               channel, `<p>._handler.weight` + `_weight_quantizer.{scale,zp_neg}`.
    w8a16-ptq  the same codes under the PTQ framework's names (GS v1.0+):
               `<p>._layer.weight` + `_layer.matmul.{weight_scale,weight_zp}`,
               scale computed in float64 as that framework does.
    w4a16      PTQ int4 per group of `group_size` consecutive input channels:
               codes in [-8, 7], scale 2*max|w|/15 per group, stored as qint4x2
               [in, out/2] (transposed, two codes per byte along the output axis,
               even index in the low nibble) with scale and zp [in/group, out].
    w8a8-dynamic
               MindFormers' Mcore layout (its golden_stick A8W8DynamicLinearMethod,
               activations quantized per token at run time): the w8a16-ptq codes and
               scale under Hugging Face names, `<p>.weight` int8 [out, in] +
               `<p>.weight_scale` [out], float32 (bfloat16 for a bfloat16 weight, as
               the loader's w_scale parameter is); no zero point, so symmetric only.
               A `quant_model_description.json` (description.py) goes beside it.
    w4a8-dynamic
               w8a8-dynamic, except for the routed experts of a MoE model
               (`mlp.experts.N.{gate,up,down}_proj`), which take MindFormers' A8W4
               layout (its golden_stick A8W4DynamicLinearMethod, MoE only): int4 codes in
               [-8, 7] per group of `group_size` input channels, scale 2*max|w|/15 (the
               w4a16 codes), stored under Hugging Face names and shapes as one expert of
               Golden Stick's stacked [E, in, out/2] qint4x2 weight transposed:
               `<p>.weight` int8 [out/2, in] (output rows 2j, 2j+1 share a byte, 2j in
               the low nibble) and `<p>.weight_scale` int64 [out, in/group] holding each
               float32 scale's bits in its low 32 bits. See mcore_int4 below for the
               sources.

The two PTQ schemes can also be asymmetric (Golden Stick's
`weight_symmetric=False`, as its AWQ W4 recipe sets): each row or group
then gets a zero point, stored negated in `weight_zp`, and its codes span
its own [min, max] instead of [-max|w|, max|w|]. The tensors keep their
names, shapes and dtypes, so the same deploy cells load either kind.

Selected weights always reach a scheme as [out, in]; the scheme returns the
arrays to store, in the order of `outputs`.
"""
from __future__ import annotations

import re
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import Callable, Dict, Iterable, Optional, Sequence, Set, Tuple

import numpy as np

from . import dtypes
from .formats.tensor import TensorInfo
from .golden_stick import QuantNames, legacy_names, mcore_names, ptq_names
from .numerics import FloatFormat, to_storage, to_work
from .buffers import BufferPool
from .packing import Int4Layout
from .rtn import W8, ErrorStats, RowBounds, RtnSpec, quantize_rtn

GROUP_SIZES = (64, 128)


@dataclass(frozen=True)
class Quantized:
    arrays: Tuple[np.ndarray, ...]
    stats: Optional[ErrorStats]


def float32_unless_bfloat16(dtype: dtypes.DType) -> dtypes.DType:
    """MindFormers' A8W8DynamicLinearMethod: w_scale is bfloat16 in a bfloat16 model,
    float32 otherwise."""
    return dtype if dtype is dtypes.BFLOAT16 else dtypes.FLOAT32


@dataclass(frozen=True)
class Scheme:
    name: str
    spec: RtnSpec
    names: Callable[[str], QuantNames]
    #: The scale's stored dtype for a weight's; None: the weight's own.
    scale_dtype: Optional[Callable[[dtypes.DType], dtypes.DType]] = None
    #: The scheme for the routed experts' weights (w4a8-dynamic's A8W4); None: this one.
    experts: Optional["Scheme"] = None

    def for_layer(self, layer: str) -> "Scheme":
        """The scheme that quantizes Linear layer `layer` (a routed expert's or any other)."""
        if self.experts is not None and ROUTED_EXPERT.search(layer):
            return self.experts
        return self

    @property
    def group_size(self) -> Optional[int]:
        """The group size of whichever layers have groups; None if none do."""
        if self.spec.group_size:
            return self.spec.group_size
        return self.experts.group_size if self.experts is not None else None

    @property
    def mcore(self) -> bool:
        """MindFormers' Mcore layout: Hugging Face names, [out, in] weights, safetensors,
        and a quant_model_description.json beside them (description.py)."""
        return self.names is mcore_names

    @property
    def zero_point(self) -> bool:
        """Whether a zero point is stored beside the scale."""
        return self.names("").zp_neg is not None

    @property
    def packs_int4(self) -> bool:
        return self.spec.bits == 4

    @property
    def int4_layout(self) -> Optional[Int4Layout]:
        """How the int4 codes of a [out, in] weight are packed; None for int8 codes."""
        if not self.packs_int4:
            return None
        return Int4Layout.ROWS if self.mcore_int4 else Int4Layout.TRANSPOSED

    @property
    def mcore_int4(self) -> bool:
        """MindFormers' A8W4 expert layout (w4a8-dynamic's routed experts).

        What MindFormers 1.9 loads (parallel_core/inference/): a8dynw4.py's
        A8W4DynamicLinearMethod (MoE only; it raises for any other Linear)
        gives GroupedMLP a qint4x2 `weight1`/`weight2` [E, in, out/2] and each
        grouped linear a uint64 `w_scale` [E, in/group, out], group the
        description's top-level `group_size`. gpt_model.load_weights hands
        each expert's `mlp.experts.N.{gate,up,down}_proj.weight` and
        `.weight_scale` (renamed `.w_scale` by DeepSeek-V3's convert_name) to
        grouped_layers.py's Column/RowParallelGroupedLinear.weight_loader,
        which transposes the 2-D tensor and copies it into expert N's slice
        (gate into the first half of weight1's columns, up into the second),
        so a checkpoint holds [out/2, in] codes and [out, in/group] scales,
        and the scale's integer value lands unconverted in the uint64
        parameter. process_weights_after_loading reads it back with
        `.astype(np.uint32).view(np.float32)` and unpacks each byte low
        nibble first (two's complement: >7 minus 16), then computes
        gmm_bias = 8 * sum(codes * scale) over the input channels, the
        compensation GroupedMatmulV4 needs for the kernel's +8 offset of the
        codes; the checkpoint stores no offset and no gmm_bias.

        Golden Stick writes the same (mindspore_gs/ptq/models/mindformers_models/
        param_processor.py, MoeParamProcessor: each expert of the stacked
        qint4x2 weight, weight_scale and weight_offset transposed to [out, ...];
        basic_quant_func.convert_fp32_to_int64: the float32 bits as uint32,
        widened to int64), its A8W4 being GPTQ's int4 weight (codes in
        [-8, 7], narrow_range False, scale 2*max|w|/15 symmetric, as w4a16)
        with activations quantized per token at run time
        (ptq/wrappers/mindformers/linear_gptq_dynamic_quant_wrappers.py).
        """
        return self.packs_int4 and self.mcore

    @property
    def label(self) -> str:
        """The scheme as messages and reports name it, e.g. 'w4a16 g64 asymmetric'."""
        parts = [self.name]
        if self.group_size:
            parts.append(f"g{self.group_size}")
        if not self.spec.symmetric:
            parts.append("asymmetric")
        return " ".join(parts)

    def check(self, out_channels: int, in_channels: int) -> Optional[str]:
        """Why a [out, in] weight cannot be quantized by this scheme, or None."""
        if not out_channels or not in_channels:
            return "has no elements: a zero dimension leaves nothing to quantize"
        group = self.spec.group_size
        if group and (in_channels % group or in_channels == group):
            other = [g for g in GROUP_SIZES if g != group and in_channels % g == 0
                     and in_channels > g]
            hint = f"try --group-size {other[0]}, or " if other else ""
            return (f"{in_channels} input channels do not split into two or more groups of "
                    f"{group} ({hint}blacklist this layer)")
        if self.packs_int4 and out_channels % 2:
            return f"{out_channels} output channels cannot be packed two int4 codes per byte"
        return None

    def outputs(self, layer: str, dtype: dtypes.DType, out_channels: int,
                in_channels: int) -> Tuple[TensorInfo, ...]:
        """The tensors that replace `<layer>.weight` (a [out, in] weight of `dtype`)."""
        names = self.names(layer)
        group = self.spec.group_size
        if self.mcore_int4:
            weight = TensorInfo.of(names.weight, dtypes.INT8, (out_channels // 2, in_channels))
            scale = TensorInfo.of(names.scale, dtypes.INT64, (out_channels, in_channels // group))
            return weight, scale
        if self.packs_int4:
            weight = TensorInfo.of(names.weight, dtypes.INT4, (in_channels, out_channels // 2))
        else:
            weight = TensorInfo.of(names.weight, dtypes.INT8, (out_channels, in_channels))
        scale_shape = (in_channels // group, out_channels) if group else (out_channels,)
        scale_dtype = dtype if self.scale_dtype is None else self.scale_dtype(dtype)
        scale = TensorInfo.of(names.scale, scale_dtype, scale_shape)
        if names.zp_neg is None:
            return weight, scale
        return weight, scale, TensorInfo.of(names.zp_neg, dtype, scale_shape)

    def stored_outputs(self, layer: str, info: TensorInfo,
                       in_out: bool) -> Tuple[TensorInfo, ...]:
        """`outputs` for the weight `info`, stored [in, out] if `in_out` (else [out, in]), as
        convert writes them: int8 codes keep the weight's layout; int4 ones are packed."""
        out_channels, in_channels = info.shape[::-1] if in_out else info.shape
        outputs = self.outputs(layer, info.dtype, out_channels, in_channels)
        if in_out and not self.packs_int4:
            outputs = (replace(outputs[0], shape=info.shape),) + outputs[1:]
        return outputs

    def quantize(self, weight: np.ndarray, fmt: FloatFormat, *, pool: Optional[Executor],
                 stats: bool, bounds: Optional[RowBounds] = None,
                 buffers: Optional[BufferPool] = None) -> Quantized:
        """The stored arrays for a [out, in] weight of raw `fmt` values (see quantize_rtn);
        the codes' arrays come from `buffers` when given."""
        result = quantize_rtn(weight, fmt, self.spec, pool=pool, stats=stats, bounds=bounds,
                              buffers=buffers, int4=self.int4_layout,
                              # [in/g, out], as WeightQuantBatchMatmul reads it
                              groups_first=not self.mcore_int4)
        q, scale, zp_neg = result.q, result.scale, result.zp_neg
        if self.mcore_int4:  # scale [out, in/g], as float32 bits
            return Quantized((q, float32_bits(scale, fmt)), result.stats)
        if not self.zero_point:
            return Quantized((q, self._stored_scale(scale, fmt)), result.stats)
        return Quantized((q, scale, zp_neg), result.stats)

    def warm_up(self, fmt: FloatFormat, stats: bool) -> None:
        """Quantize a weight of two groups (or two 2-wide rows) of `fmt`, so that the kernels
        `quantize` runs are compiled, or loaded from numba's disk cache, before a real weight
        waits for them (about half a second in a fresh process, mostly numba's own set-up)."""
        width = 2 * (self.spec.group_size or 1)  # rows that are not constant: no second pass
        tiny = to_storage(np.tile(np.arange(width, dtype=fmt.work), (2, 1)), fmt)
        self.quantize(tiny, fmt, pool=None, stats=stats)

    def _stored_scale(self, scale: np.ndarray, fmt: FloatFormat) -> np.ndarray:
        """The scale the codes were rounded against, in the dtype `scale_dtype` stores:
        a float16 one widens to float32 exactly, bfloat16 stays, float64 is rounded."""
        if self.scale_dtype is None or fmt is FloatFormat.BFLOAT16:
            return scale
        return to_work(scale, fmt).astype(np.float32)


def float32_bits(scale: np.ndarray, fmt: FloatFormat) -> np.ndarray:
    """A scale of raw `fmt` values as int64 holding its float32 bits (exact: float16 and
    bfloat16 widen exactly, float64 is rounded), Golden Stick's convert_fp32_to_int64."""
    return to_work(scale, fmt).astype(np.float32).view(np.uint32).astype(np.int64)


SCHEME_NAMES = ("w8a16", "w8a16-ptq", "w4a16", "w8a8-dynamic", "w4a8-dynamic")
#: A routed expert's Linear layer under Hugging Face names (Qwen3-MoE, DeepSeek-V3,
#: Qwen2-MoE): not `mlp.shared_experts.*` / `mlp.shared_expert.*`, which MindFormers builds
#: as plain Linear layers, and not the router `mlp.gate`.
ROUTED_EXPERT = re.compile(r"\.experts\.\d+\.(gate|up|down)_proj$")


def get_scheme(name: str = "w8a16", group_size: Optional[int] = None,
               symmetric: bool = True) -> Scheme:
    """A scheme by its CLI name; `group_size` applies to w4a16 and w4a8-dynamic's experts
    (default 128), `symmetric` False to the PTQ schemes."""
    if name not in ("w4a16", "w4a8-dynamic") and group_size is not None:
        raise ValueError("--group-size applies to --scheme w4a16 and w4a8-dynamic only")
    group = 128 if group_size is None else group_size
    if group not in GROUP_SIZES:
        raise ValueError(f"--group-size must be one of {GROUP_SIZES} (Golden Stick's)")
    if name == "w8a16":
        if not symmetric:
            raise ValueError("--asymmetric needs a PTQ scheme (w8a16-ptq or w4a16): Golden "
                             "Stick's RoundToNearest class is symmetric only (its asymmetric "
                             "path clamps to the wrong range)")
        return Scheme(name, W8, legacy_names)
    if name == "w8a16-ptq":
        return Scheme(name, RtnSpec(bits=8, float64_scale=True, symmetric=symmetric), ptq_names)
    if name == "w8a8-dynamic":
        if not symmetric:
            raise ValueError("--asymmetric does not apply to --scheme w8a8-dynamic: "
                             "MindFormers' A8W8DynamicLinearMethod has no zero point")
        # Golden Stick quantizes the weight of its W8A8 dynamic cell as that of its
        # weight-only one (DynamicQuantLinearCell.quant is WeightQuantLinearCell's): symmetric,
        # full range, scale 2*max|w|/255 in float64. Hence w8a16-ptq's spec.
        return Scheme(name, RtnSpec(bits=8, float64_scale=True), mcore_names,
                      float32_unless_bfloat16)
    if name == "w4a8-dynamic":
        if not symmetric:
            raise ValueError("--asymmetric does not apply to --scheme w4a8-dynamic: "
                             "MindFormers' A8W4 and A8W8 dynamic methods have no zero point")
        experts = Scheme(name, RtnSpec(bits=4, group_size=group, float64_scale=True),
                         mcore_names, lambda _: dtypes.INT64)
        return Scheme(name, RtnSpec(bits=8, float64_scale=True), mcore_names,
                      float32_unless_bfloat16, experts)
    if name == "w4a16":
        return Scheme(name, RtnSpec(bits=4, group_size=group, float64_scale=True,
                                    symmetric=symmetric), ptq_names)
    raise ValueError(f"unknown scheme {name!r}; choose from {', '.join(SCHEME_NAMES)}")


@dataclass(frozen=True)
class CheckpointScheme:
    """How a quantized checkpoint was quantized, read from its tensor names and shapes."""

    scheme: str
    group_size: Optional[int]
    layers: Tuple[str, ...]

    @property
    def names(self) -> Callable[[str], QuantNames]:
        return {"w8a16": legacy_names, "w8a8-dynamic": mcore_names,
                "w4a8-dynamic": mcore_names}.get(self.scheme, ptq_names)

    @property
    def label(self) -> str:
        """Like Scheme.label, for any group size found (not only those we write)."""
        return f"{self.scheme} g{self.group_size}" if self.group_size else self.scheme


def detect_scheme(tensors: Iterable[TensorInfo]) -> Optional[CheckpointScheme]:
    """The scheme and quantized layers of a checkpoint's tensors; None if it has none.

    Golden Stick's two naming schemes tell w8a16 from the PTQ ones; an Int4
    weight makes it w4a16, whose group size is its input channels over the
    scale's rows (packed [in, out/2], scale [in/g, out]). An Int8 `<p>.weight`
    beside a `<p>.weight_scale` is MindFormers' Mcore layout (w8a8-dynamic;
    an FP8 checkpoint's weights are not Int8, and its scales `weight_scale_inv`),
    w4a8-dynamic where some scale is Int64 (an A8W4 expert's [out, in/group]
    float32 bits beside its [out/2, in] codes).
    """
    by_name = {t.name: t for t in tensors}
    for names, scheme in ((legacy_names, "w8a16"), (ptq_names, "w8a16-ptq")):
        suffix = names("").weight
        layers = tuple(sorted(n[:-len(suffix)] for n in by_name if n.endswith(suffix)))
        if not layers:
            continue
        weight = by_name[names(layers[0]).weight]
        if weight.dtype is not dtypes.INT4:
            return CheckpointScheme(scheme, None, layers)
        scale = by_name.get(names(layers[0]).scale)  # None, or odd, in a damaged file
        groups = scale.shape[0] if scale is not None and scale.shape else 0
        group = weight.shape[0] // groups if groups and weight.shape else None
        return CheckpointScheme("w4a16", group, layers)
    suffix = mcore_names("").scale
    layers = tuple(sorted(
        layer for layer in (n[:-len(suffix)] for n in by_name if n.endswith(suffix))
        if getattr(by_name.get(mcore_names(layer).weight), "dtype", None) is dtypes.INT8))
    if not layers:
        return None
    for layer in layers:  # an int64 scale holds float32 bits: an A8W4 expert's
        names = mcore_names(layer)
        scale, weight = by_name[names.scale], by_name[names.weight]
        if scale.dtype is dtypes.INT64 and len(scale.shape) == len(weight.shape) == 2 \
                and scale.shape[1]:
            group = weight.shape[1] // scale.shape[1]
            return CheckpointScheme("w4a8-dynamic", group, layers)
    return CheckpointScheme("w8a8-dynamic", None, layers)


def model_mismatch(baseline: Sequence[TensorInfo], other: Sequence[TensorInfo]) -> Optional[str]:
    """Why `other` is not `baseline`'s model, as it is or with Linear layers quantized by
    any scheme above; None if it can be (or `baseline` is itself quantized: no reference).

    From headers alone, names and shapes (dtypes are the loader's to judge), so that a
    command measuring several checkpoints of one model refuses a stranger before it spends
    minutes measuring the others. A quantized layer `<p>` differs only where the scheme
    puts its tensors: `<p>.weight` becomes the codes, scale and zero point the scheme makes
    of a weight of that shape, stored [out, in] or [in, out], and a bias takes the scheme's
    name.
    """
    if detect_scheme(baseline) is not None:
        return None
    expected = {t.name: t for t in baseline if t.dtype is not dtypes.STRING}
    theirs = {t.name: t.shape for t in other if t.dtype is not dtypes.STRING}
    found = detect_scheme(other)
    try:
        scheme = None if found is None else get_scheme(found.scheme, found.group_size)
    except ValueError:  # a group size ckpt-rtn does not write: its shapes are not known here
        scheme = None
    made: Set[str] = set()  # the quantized layers' tensors, their shapes checked per layer
    reshaped = []
    for layer in found.layers if found is not None else ():
        weight = expected.pop(f"{layer}.weight", None)
        if weight is None:
            return f"it quantizes {layer!r}, whose weight {layer}.weight the baseline lacks"
        names = found.names(layer)
        bias = expected.pop(f"{layer}.bias", None)
        if bias is not None:
            expected[names.bias] = bias
        made.update(name for name in (names.weight, names.scale, names.zp_neg) if name)
        if scheme is None:  # names alone
            continue
        fits = next((outputs for outputs in (_quantized_as(scheme, layer, weight, in_out)
                                             for in_out in (False, True))
                     if outputs is not None
                     and all(theirs.get(name) == shape for name, shape in outputs.items())),
                    None)
        if fits is None:
            reshaped.append(f"{layer} (not what {found.label} makes of the baseline's "
                            f"{list(weight.shape)} {layer}.weight)")
    reshaped += [f"{name} {tuple(theirs[name])} (baseline {tuple(expected[name].shape)})"
                 for name in sorted(set(expected) & set(theirs))
                 if tuple(theirs[name]) != tuple(expected[name].shape)]
    return mismatch_summary(sorted(set(expected) - set(theirs)),
                            sorted(set(theirs) - set(expected) - made), reshaped)


def _quantized_as(scheme: Scheme, layer: str, weight: TensorInfo,
                  in_out: bool) -> Optional[Dict[str, Tuple[int, ...]]]:
    """The names and shapes `scheme` writes for `weight`, read as [in, out] or [out, in];
    None where it cannot quantize such a weight."""
    if len(weight.shape) != 2:
        return None
    out_channels, in_channels = weight.shape[::-1] if in_out else weight.shape
    chosen = scheme.for_layer(layer)
    if chosen.check(out_channels, in_channels) is not None:
        return None
    return {t.name: tuple(t.shape) for t in chosen.stored_outputs(layer, weight, in_out)}


def mismatch_summary(missing: Sequence[str], unexpected: Sequence[str],
                     mismatched: Sequence[str]) -> Optional[str]:
    """'missing 2: a, b; unexpected 1: c' (five names of each at most); None if all empty."""
    problems = [f"{label} {len(items)}: {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected),
                                     ("mismatched", mismatched)) if items]
    return "; ".join(problems) or None
