"""Run ckpt-rtn checkpoints in a MindFormers network (needs the [mindspore] extra).

This is the deploy half of Golden Stick's RoundToNearest flow, without
Golden Stick: `quantize_network` swaps each selected MindFormers `Linear`
for a weight-only quantized cell whose parameters carry exactly the names
`ckpt-rtn convert` writes, chosen by the same `configs/*.yaml` rules; then
`load_quantized` loads the converted checkpoint into it and refuses any
mismatch. On Ascend the cell calls the fused WeightQuantBatchMatmul kernel,
as Golden Stick does; elsewhere (CPU, GPU) it dequantizes (q + zp_neg) * scale
to the compute dtype and runs a MatMul, with identical parameters.

MindSpore and MindFormers are imported here only; the converter never is.
"""
from __future__ import annotations

import os
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import mindspore as ms
import numpy as np
from mindspore import Parameter, Tensor, nn, ops
from mindspore.ops.auto_generate import WeightQuantBatchMatmul

from . import dtypes
from .errors import CkptRtnError, UnsupportedError
from .formats import detect_format
from .formats.tensor import TensorInfo
from .rules import Rules, load_rules

# MindFormers logs to ./output/log of whatever directory it is imported from;
# send that to a scratch directory unless the user chose one.
os.environ.setdefault("LOCAL_DEFAULT_PATH",
                      os.path.join(tempfile.gettempdir(), "ckpt-rtn-mindformers"))
from mindformers.modules.layers import Linear  # noqa: E402  (after the line above)


class DeployError(CkptRtnError):
    """A checkpoint does not fit the network it is loaded into."""


def use_fused_kernel() -> bool:
    """The fused W8A16 matmul exists on Ascend only."""
    return ms.get_context("device_target") == "Ascend"


class WeightQuantizer(nn.Cell):
    """Holds Golden Stick's per-channel `scale` and `zp_neg` (negated zero point)."""

    def __init__(self, out_channels: int, dtype: ms.Type) -> None:
        super().__init__()
        self.scale = Parameter(Tensor(np.ones(out_channels), dtype), name="scale")
        self.zp_neg = Parameter(Tensor(np.zeros(out_channels), dtype), name="zp_neg")


class W8A16Linear(nn.Cell):
    """A MindFormers Linear with an int8 weight, computing x @ ((q + zp_neg) * scale).T.

    The original Linear stays as `_handler` (its bias, activation and shapes
    are reused) and the quantizer as `_weight_quantizer`, so the parameters
    are named `<p>._handler.weight`, `<p>._weight_quantizer.scale`,
    `<p>._weight_quantizer.zp_neg` and `<p>._handler.bias`, as in Golden
    Stick's deployed networks.
    """

    def __init__(self, linear: Linear, fused: bool) -> None:
        super().__init__()
        if linear.expert_flag or not linear.transpose_b:
            raise UnsupportedError(None, "only dense Linear layers with [out, in] weights "
                                   "(transpose_b=True) can be quantized per output channel")
        out_channels, in_channels = linear.out_channels, linear.in_channels
        linear.weight = Parameter(Tensor(np.ones((out_channels, in_channels), np.int8)),
                                  name="weight")
        self._handler = linear
        self._weight_quantizer = WeightQuantizer(out_channels, linear.dtype)
        self.fused = fused
        self.compute_dtype = linear.dtype
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.has_bias = linear.has_bias
        self.activation_flag = linear.activation_flag
        if fused:
            self.weight_quant_matmul = WeightQuantBatchMatmul(transpose_x=False,
                                                              transpose_weight=True)
        else:
            self.matmul = ops.MatMul(transpose_b=True)
        self.cast = ops.Cast()
        self.reshape = ops.Reshape()
        self.shape = ops.Shape()

    def construct(self, x: Tensor) -> Tensor:
        out_shape = self.shape(x)[:-1] + (self.out_channels,)
        x = self.reshape(x, (-1, self.in_channels))
        ori_dtype = x.dtype
        x = self.cast(x, self.compute_dtype)
        quantizer = self._weight_quantizer
        if self.fused:
            x = self.weight_quant_matmul(x, self._handler.weight, quantizer.scale,
                                         quantizer.zp_neg, None, None, None)
        else:
            weight = self.cast(self._handler.weight, self.compute_dtype)
            weight = (weight + quantizer.zp_neg.reshape((-1, 1))) * quantizer.scale.reshape((-1, 1))
            x = self.matmul(x, weight)
        if self.has_bias:
            x = self._handler.bias_add(x, self.cast(self._handler.bias, self.compute_dtype))
        if self.activation_flag:
            x = self._handler.activation(x)
        x = self.cast(x, ori_dtype)
        return self.reshape(x, out_shape)


def quantize_network(net: nn.Cell, config: str = "llama2",
                     blacklist: Optional[Sequence[str]] = ("lm_head",),
                     fused: Optional[bool] = None) -> List[str]:
    """Replace the selected Linear layers of `net` by W8A16Linear cells, in place.

    The layers are chosen by the same rules as `ckpt-rtn convert --config`;
    `blacklist` replaces the family's blacklist (None keeps it). Like Golden
    Stick, only cells whose type is exactly MindFormers' Linear are matched.
    Returns the quantized layer paths.
    """
    rules = load_rules(config)
    if blacklist is not None:
        rules = rules.with_overrides(blacklist=blacklist, keep_default_blacklist=False)
    fused = use_fused_kernel() if fused is None else fused
    chosen = [name for name, cell in net.cells_and_names()
              if type(cell) is Linear and _selected(rules, name, cell)]
    for name in chosen:
        parent, attr = _parent_of(net, name)
        setattr(parent, attr, W8A16Linear(getattr(parent, attr), fused))
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


def load_quantized(net: nn.Cell, path: "os.PathLike[str] | str") -> None:
    """Load a `ckpt-rtn convert` output into a `quantize_network`-ed net; refuse mismatches."""
    _load_exactly(net, path)


def load_fp(net: nn.Cell, path: "os.PathLike[str] | str") -> None:
    """Load an unquantized checkpoint into `net` with the same strict checks."""
    _load_exactly(net, path)


def _load_exactly(net: nn.Cell, path: "os.PathLike[str] | str") -> None:
    """Every network parameter, and nothing else, with its exact dtype and shape."""
    path = os.fspath(path)
    params: Dict[str, Parameter] = ms.load_checkpoint(path, format=detect_format(path))
    expected = {p.name: p for p in net.get_parameters()}
    missing = sorted(set(expected) - set(params))
    unexpected = sorted(set(params) - set(expected))
    mismatched = [f"{name} (network {expected[name].dtype} {tuple(expected[name].shape)}, "
                  f"checkpoint {params[name].dtype} {tuple(params[name].shape)})"
                  for name in sorted(set(expected) & set(params))
                  if params[name].dtype != expected[name].dtype
                  or tuple(params[name].shape) != tuple(expected[name].shape)]
    problems = [f"{label} {len(items)}: {', '.join(items[:5])}{', ...' if len(items) > 5 else ''}"
                for label, items in (("missing", missing), ("unexpected", unexpected),
                                     ("mismatched", mismatched)) if items]
    if problems:
        raise DeployError(path, "does not match the network: " + "; ".join(problems))
    ms.load_param_into_net(net, params, strict_load=True)


def generate_greedy(net: nn.Cell, prompt: Sequence[int], max_new_tokens: int, seq_length: int,
                    pad_token_id: int = 0, eos_token_id: Optional[int] = None) -> List[int]:
    """Greedy continuation of `prompt` by a MindFormers causal LM without a KV cache.

    Every step runs the full window padded to `seq_length`, so the graph is
    compiled once; this is for checking a model on a CPU, not for serving.
    """
    tokens = list(prompt)
    if not tokens or len(tokens) + max_new_tokens > seq_length:
        raise ValueError(f"prompt ({len(tokens)} tokens) + {max_new_tokens} new tokens must be "
                         f"non-empty and fit in seq_length {seq_length}")
    generated: List[int] = []
    for _ in range(max_new_tokens):
        window = np.full((1, seq_length), pad_token_id, dtype=np.int32)
        window[0, :len(tokens)] = tokens
        logits = net(Tensor(window))[0].asnumpy().reshape(seq_length, -1)
        token = int(logits[len(tokens) - 1].argmax())
        generated.append(token)
        tokens.append(token)
        if token == eos_token_id:
            break
    return generated
