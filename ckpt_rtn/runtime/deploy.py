"""Run ckpt-rtn checkpoints in a MindFormers network (needs the [mindspore] extra).

This is the deploy half of Golden Stick's RoundToNearest flow, without
Golden Stick: `quantize_network` swaps each selected MindFormers `Linear`
for a weight-only quantized cell whose parameters carry exactly the names
`ckpt-rtn convert` writes, chosen by the same `configs/*.yaml` rules; then
`load_quantized` loads the converted checkpoint into it and refuses any
mismatch. On Ascend the cell calls the fused WeightQuantBatchMatmul kernel,
as Golden Stick does; elsewhere (CPU, GPU) it dequantizes (q + zp_neg) * scale
to the compute dtype and runs a MatMul, with identical parameters.

Part of ckpt_rtn.runtime: the converter never imports it.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.ops.auto_generate import WeightQuantBatchMatmul
from mindformers.modules.layers import Linear

from .. import dtypes
from ..errors import CkptRtnError, UnsupportedError
from ..formats import detect_format, open_reader
from ..formats.tensor import TensorInfo
from ..packing import unpack_int4
from ..schemes import CheckpointScheme, detect_scheme, get_scheme, mismatch_summary
from ..rules import Rules, load_rules



class DeployError(CkptRtnError):
    """A checkpoint does not fit the network it is loaded into."""


def use_fused_kernel() -> bool:
    """The fused W8A16 matmul exists on Ascend only."""
    return ms.get_context("device_target") == "Ascend"


class QuantLinear(nn.Cell):
    """The forward pass a quantized Linear shares with MindFormers' Linear.

    Subclasses keep the original Linear under Golden Stick's attribute name
    and supply `_matmul` (x @ dequantized weight.T) and `_bias`.
    """

    def __init__(self, linear: Linear) -> None:
        super().__init__()
        if linear.expert_flag or not linear.transpose_b:
            raise UnsupportedError(None, "only dense Linear layers with [out, in] weights "
                                   "(transpose_b=True) can be quantized per output channel")
        self.compute_dtype = linear.dtype
        self.in_channels = linear.in_channels
        self.out_channels = linear.out_channels
        self.has_bias = linear.has_bias
        self.activation_flag = linear.activation_flag
        self.cast = ops.Cast()
        self.reshape = ops.Reshape()
        self.shape = ops.Shape()
        self.bias_add = ops.Add()

    def construct(self, x: Tensor) -> Tensor:
        out_shape = self.shape(x)[:-1] + (self.out_channels,)
        x = self.reshape(x, (-1, self.in_channels))
        ori_dtype = x.dtype
        x = self._matmul(self.cast(x, self.compute_dtype))
        if self.has_bias:
            x = self.bias_add(x, self.cast(self._bias(), self.compute_dtype))
        if self.activation_flag:
            x = self._activation(x)
        x = self.cast(x, ori_dtype)
        return self.reshape(x, out_shape)


class WeightQuantizer(nn.Cell):
    """Holds Golden Stick's per-channel `scale` and `zp_neg` (negated zero point)."""

    def __init__(self, out_channels: int, dtype: ms.Type) -> None:
        super().__init__()
        self.scale = Parameter(Tensor(np.ones(out_channels), dtype), name="scale")
        self.zp_neg = Parameter(Tensor(np.zeros(out_channels), dtype), name="zp_neg")


class W8A16Linear(QuantLinear):
    """Golden Stick v0.5 RoundToNearest deploy cell: x @ ((q + zp_neg) * scale).T.

    The original Linear stays as `_handler` (its bias and activation are
    reused) and the quantizer as `_weight_quantizer`, so the parameters are
    named `<p>._handler.weight` (int8 [out, in]), `<p>._weight_quantizer.scale`,
    `<p>._weight_quantizer.zp_neg` and `<p>._handler.bias`.
    """

    def __init__(self, linear: Linear, fused: bool) -> None:
        super().__init__(linear)
        linear.weight = Parameter(Tensor(np.ones((self.out_channels, self.in_channels), np.int8)),
                                  name="weight")
        self._handler = linear
        self._weight_quantizer = WeightQuantizer(self.out_channels, linear.dtype)
        self.fused = fused
        if fused:
            self.weight_quant_matmul = WeightQuantBatchMatmul(transpose_x=False,
                                                              transpose_weight=True)
        else:
            self.matmul = ops.MatMul(transpose_b=True)

    def _matmul(self, x: Tensor) -> Tensor:
        quantizer = self._weight_quantizer
        if self.fused:
            return self.weight_quant_matmul(x, self._handler.weight, quantizer.scale,
                                            quantizer.zp_neg, None, None, None)
        weight = self.cast(self._handler.weight, self.compute_dtype)
        weight = (weight + quantizer.zp_neg.reshape((-1, 1))) * quantizer.scale.reshape((-1, 1))
        return self.matmul(x, weight)

    def _bias(self) -> Parameter:
        return self._handler.bias

    def _activation(self, x: Tensor) -> Tensor:
        return self._handler.activation(x)


class PtqMatmul(nn.Cell):
    """Golden Stick PTQ's quantized matmul (`<p>._layer.matmul`): weight_scale, weight_zp.

    On Ascend it calls WeightQuantBatchMatmul (int4: untransposed [in, out/2]
    weight and antiquant_group_size). Elsewhere int8 codes are dequantized in
    the graph; int4 codes cannot even be cast on CPU, so `load_quantized`
    unpacks and dequantizes them once into `dequantized_weight`.
    """

    def __init__(self, out_channels: int, in_channels: int, group_size: int, int4: bool,
                 dtype: ms.Type, fused: bool) -> None:
        super().__init__()
        shape = (in_channels // group_size, out_channels) if group_size else (out_channels,)
        self.weight_scale = Parameter(Tensor(np.ones(shape), dtype), name="weight_scale")
        self.weight_zp = Parameter(Tensor(np.zeros(shape), dtype), name="weight_zp")
        self.group_size = group_size
        self.int4 = int4
        self.fused = fused
        self.cast = ops.Cast()
        if fused:
            self.weight_quant_matmul = WeightQuantBatchMatmul(
                transpose_x=False, transpose_weight=not int4, antiquant_group_size=group_size)
        else:
            self.matmul = ops.MatMul(transpose_b=True)
            if int4:
                self.dequantized_weight = Parameter(
                    Tensor(np.zeros((out_channels, in_channels)), dtype),
                    name="dequantized_weight", requires_grad=False)

    def construct(self, x: Tensor, weight: Tensor) -> Tensor:
        if self.fused:
            return self.weight_quant_matmul(x, weight, self.weight_scale, self.weight_zp,
                                            None, None, None)
        if self.int4:
            return self.matmul(x, self.dequantized_weight)
        dequantized = (self.cast(weight, x.dtype) + self.weight_zp.reshape((-1, 1))) \
            * self.weight_scale.reshape((-1, 1))
        return self.matmul(x, dequantized)


class PtqLinear(QuantLinear):
    """Golden Stick PTQ deploy cell (w8a16-ptq, w4a16): the Linear as `_layer`.

    Parameters: `<p>._layer.weight` (int8 [out, in], or qint4x2 [in, out/2]),
    `<p>._layer.matmul.weight_scale` and `.weight_zp` ([out], or
    [in/group, out]), `<p>._layer.bias`.
    """

    def __init__(self, linear: Linear, int4: bool, group_size: int, fused: bool) -> None:
        super().__init__(linear)
        out_channels, in_channels = self.out_channels, self.in_channels
        if int4:
            packed = np.zeros((in_channels, out_channels // 2), np.int8)
            linear.weight = Parameter(Tensor(packed, ms.qint4x2), name="weight")
        else:
            linear.weight = Parameter(Tensor(np.ones((out_channels, in_channels), np.int8)),
                                      name="weight")
        linear.matmul = PtqMatmul(out_channels, in_channels, group_size, int4, linear.dtype, fused)
        self._layer = linear

    def _matmul(self, x: Tensor) -> Tensor:
        return self._layer.matmul(x, self._layer.weight)

    def _bias(self) -> Parameter:
        return self._layer.bias

    def _activation(self, x: Tensor) -> Tensor:
        return self._layer.activation(x)


def quantize_network(net: nn.Cell, config: str = "llama2",
                     blacklist: Optional[Sequence[str]] = None,
                     fused: Optional[bool] = None,
                     layers: Optional[Iterable[str]] = None,
                     scheme: str = "w8a16", group_size: Optional[int] = None) -> List[str]:
    """Replace the selected Linear layers of `net` by quantized cells, in place.

    The layers are chosen by the same rules as `ckpt-rtn convert --config`;
    `blacklist` replaces the family's blacklist (None, the default, keeps it:
    llama2's is lm_head). Like Golden
    Stick, only cells whose type is exactly MindFormers' Linear are matched.
    `layers` instead names the layers outright (see `checkpoint_scheme`).
    `scheme` and `group_size` are those given to `ckpt-rtn convert`.
    Returns the quantized layer paths.
    """
    fused = use_fused_kernel() if fused is None else fused
    chosen_scheme = get_scheme(scheme, group_size)
    if chosen_scheme.mcore:
        raise DeployError(None, f"{scheme} checkpoints load into MindFormers' Mcore networks "
                          "(pretrained_model_dir with quant_model_description.json, quantization: "
                          "golden-stick), which run them on Ascend; ckpt-rtn's deploy cells serve "
                          "the legacy Llama's w8a16, w8a16-ptq and w4a16")
    linears = {name: cell for name, cell in net.cells_and_names() if type(cell) is Linear}
    if layers is not None:
        chosen = sorted(set(layers))
        unknown = [name for name in chosen if name not in linears]
        if unknown:
            raise DeployError(None, f"no MindFormers Linear named {', '.join(unknown[:5])} in "
                              "the network")
    else:
        rules = load_rules(config)
        if blacklist is not None:
            rules = rules.with_overrides(blacklist=blacklist, keep_default_blacklist=False)
        chosen = [name for name, cell in linears.items() if _selected(rules, name, cell)]
    for name in chosen:
        parent, attr = _parent_of(net, name)
        linear = getattr(parent, attr)
        if chosen_scheme.name == "w8a16":
            cell: nn.Cell = W8A16Linear(linear, fused)
        else:
            cell = PtqLinear(linear, chosen_scheme.packs_int4, chosen_scheme.spec.group_size, fused)
        setattr(parent, attr, cell)
    for name, param in net.parameters_and_names():
        param.name = name  # full paths, as Golden Stick's update_parameters_name() gives
    return chosen
def _selected(rules: Rules, name: str, linear: Linear) -> bool:
    dtype = dtypes.from_mindspore_name(str(linear.weight.dtype))
    info = TensorInfo.of(f"{name}.weight", dtype, tuple(linear.weight.shape))
    return rules.layer_of(info) == name


def _parent_of(net: nn.Cell, path: str) -> Tuple[nn.Cell, str]:
    *parents, attr = path.split(".")
    cell = net
    for part in parents:
        cell = cell._cells[part]  # pylint: disable=protected-access
    return cell, attr


def load_quantized(net: nn.Cell, path: "os.PathLike[str] | str", *, upcast: bool = False) -> None:
    """Load a `ckpt-rtn convert` output into a `quantize_network`-ed net; refuse mismatches.

    `upcast` lets float tensors load into wider float parameters (fp16/bf16
    into fp32: exact), e.g. to evaluate an FP16 model in float32 on a CPU.
    """
    _load_exactly(net, path, upcast)


def load_fp(net: nn.Cell, path: "os.PathLike[str] | str", *, upcast: bool = False) -> None:
    """Load an unquantized checkpoint into `net` with the same strict checks."""
    _load_exactly(net, path, upcast)


def checkpoint_scheme(path: "os.PathLike[str] | str") -> Optional[CheckpointScheme]:
    """The scheme and quantized layers of a checkpoint; None for an FP checkpoint. A CRC the
    file carries (.ckpt trailer, safetensors crc_num) is checked too: MindSpore's loader
    does not check it unless asked, and measured a corrupted checkpoint as if whole."""
    with open_reader(path, verify_crc=True) as reader:
        return detect_scheme(reader.tensors)


def load_checkpoint_into(net: nn.Cell, path: "os.PathLike[str] | str", *,
                         upcast: bool = False) -> List[str]:
    """Load an FP or ckpt-rtn quantized checkpoint: quantize exactly the layers the
    checkpoint quantized, the way it did, then load it. Returns those layers."""
    found = checkpoint_scheme(path)
    if found is None:
        _load_exactly(net, path, upcast)
        return []
    try:
        quantize_network(net, layers=found.layers, scheme=found.scheme,
                         group_size=found.group_size)
    except ValueError as exc:  # e.g. a group size Golden Stick does not deploy
        raise DeployError(path, f"a {found.label} checkpoint: {exc}") from None
    except DeployError as exc:  # the scheme or layers it names: the checkpoint's
        if exc.path is not None:
            raise
        raise DeployError(path, exc.reason) from None
    _load_exactly(net, path, upcast)
    return list(found.layers)


_WIDER = {(ms.float16, ms.float32), (ms.bfloat16, ms.float32)}


def _load_exactly(net: nn.Cell, path: "os.PathLike[str] | str", upcast: bool) -> None:
    """Every network parameter, and nothing else, with its exact dtype and shape.

    The CPU int4 cells' `dequantized_weight` is derived from the loaded codes.
    """
    path = os.fspath(path)
    try:
        loaded = ms.load_checkpoint(path, format=detect_format(path))
    except Exception as exc:  # a file ckpt-rtn reads that MindSpore does not (a dtype it
        # lacks, such as F8_E4M3; __metadata__ naming a tensor with a type other than Int4)
        reason = str(exc).strip().splitlines()
        raise DeployError(path, f"MindSpore cannot load it: {type(exc).__name__}"
                          f"{': ' + reason[-1] if reason else ''}") from None
    # str values (append_dict's, and the settings record ckpt-rtn writes) are no parameters.
    params: Dict[str, Parameter] = {name: value for name, value in loaded.items()
                                    if not isinstance(value, str)}
    _refuse_non_finite(path, params)
    expected = {p.name: p for p in net.get_parameters()
                if not p.name.endswith(".dequantized_weight")}
    if upcast:
        for name, param in params.items():
            if name in expected and (param.dtype, expected[name].dtype) in _WIDER:
                params[name] = Parameter(ops.cast(param, expected[name].dtype), name=name)
    missing = sorted(set(expected) - set(params))
    unexpected = sorted(set(params) - set(expected))
    mismatched = [f"{name} (network {expected[name].dtype} {tuple(expected[name].shape)}, "
                  f"checkpoint {params[name].dtype} {tuple(params[name].shape)})"
                  for name in sorted(set(expected) & set(params))
                  if params[name].dtype != expected[name].dtype
                  or tuple(params[name].shape) != tuple(expected[name].shape)]
    problems = mismatch_summary(missing, unexpected, mismatched)
    if problems is not None:
        raise DeployError(path, "does not match the network: " + problems)
    ms.load_param_into_net(net, params, strict_load=True)
    for _, cell in net.cells_and_names():
        if isinstance(cell, PtqLinear) and cell._layer.matmul.int4 \
                and not cell._layer.matmul.fused:  # noqa: SLF001
            _dequantize_int4_into(cell)


def _refuse_non_finite(path: str, params: Dict[str, Parameter]) -> None:
    """A float tensor holding inf or NaN, a scale above all: the network computes NaN from
    it, and greedy decoding then emits nothing (`generate` printed the prompt alone, and
    SQuAD scored 0, both with exit 0)."""
    for name, param in params.items():
        if param.dtype not in (ms.float16, ms.bfloat16, ms.float32, ms.float64):
            continue
        # MindSpore 2.9 has no bfloat16 IsFinite on CPU; widening to float32 is exact.
        values = ops.cast(param, ms.float32) if param.dtype == ms.bfloat16 else param
        if not bool(ops.isfinite(values).all()):
            raise DeployError(path, f"tensor {name!r} holds inf or NaN")


def _dequantize_int4_into(layer: PtqLinear) -> None:
    """Unpack a W4 cell's loaded qint4x2 codes and dequantize them, once."""
    linear = layer._layer  # noqa: SLF001
    matmul = linear.matmul
    codes = unpack_int4(linear.weight.asnumpy().view(np.int8)).T  # [out, in]
    scale = matmul.weight_scale.asnumpy().astype(np.float32).T  # [out, in / group]
    zp = matmul.weight_zp.asnumpy().astype(np.float32).T
    group = matmul.group_size
    weight = (codes.astype(np.float32) + np.repeat(zp, group, axis=1)) * np.repeat(scale, group,
                                                                                    axis=1)
    matmul.dequantized_weight.set_data(Tensor(weight, matmul.dequantized_weight.dtype))

