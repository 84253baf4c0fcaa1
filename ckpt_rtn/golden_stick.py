"""Golden Stick's checkpoint naming for weight-only quantized Linear layers.

The legacy RoundToNearest (v0.4-v0.5, the W8A16 target) wraps each Linear
`<p>` in a quant cell whose first attribute is the original Linear
(`_handler`) and whose weight quantizer holds the per-channel scale and
negated zero point. After `update_parameters_name()` a deployed network's
parameters, and so its checkpoint, are named:

    <p>._handler.weight            int8   [out, in]
    <p>._weight_quantizer.scale    float  [out]   (the weight's float dtype)
    <p>._weight_quantizer.zp_neg   float  [out]
    <p>._handler.bias              unchanged, only if the Linear has a bias

The PTQ framework (v1.0+, which adds int4 and per-group scales) wraps the
Linear as `_layer` and replaces its matmul by a quantized one:

    <p>._layer.weight                int8 [out, in], or qint4x2 [in, out/2]
    <p>._layer.matmul.weight_scale   float [out], or [in/group, out]
    <p>._layer.matmul.weight_zp      float, shaped like the scale (negated zero point)
    <p>._layer.bias

MindFormers' Mcore networks (1.6+: Qwen3, Qwen3-MoE, DeepSeek-V3...) load
Hugging Face-named safetensors, their quantized Linear layers included:
MindFormers' own `weight_mapping` renames `.weight_scale` to the `w_scale`
parameter of its golden_stick A8W8DynamicLinearMethod, and there is no zero
point (symmetric only):

    <p>.weight          int8 [out, in]
    <p>.weight_scale    float32 [out], bfloat16 for a bfloat16 model
    <p>.bias            unchanged
"""
from __future__ import annotations

from typing import NamedTuple, Optional


class QuantNames(NamedTuple):
    weight: str
    scale: str
    #: None where the layout stores no zero point.
    zp_neg: Optional[str]
    bias: str


def legacy_names(layer: str) -> QuantNames:
    """RoundToNearest (GS v0.5.0) names for Linear layer `layer`."""
    return QuantNames(f"{layer}._handler.weight", f"{layer}._weight_quantizer.scale",
                      f"{layer}._weight_quantizer.zp_neg", f"{layer}._handler.bias")


def ptq_names(layer: str) -> QuantNames:
    """PTQ framework (GS v1.0+) names for Linear layer `layer`."""
    return QuantNames(f"{layer}._layer.weight", f"{layer}._layer.matmul.weight_scale",
                      f"{layer}._layer.matmul.weight_zp", f"{layer}._layer.bias")


def mcore_names(layer: str) -> QuantNames:
    """MindFormers Mcore (Hugging Face) names for Linear layer `layer`: no zero point."""
    return QuantNames(f"{layer}.weight", f"{layer}.weight_scale", None, f"{layer}.bias")
