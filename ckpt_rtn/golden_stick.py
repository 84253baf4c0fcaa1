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
"""
from __future__ import annotations

from typing import NamedTuple


class QuantNames(NamedTuple):
    weight: str
    scale: str
    zp_neg: str
    bias: str


def legacy_names(layer: str) -> QuantNames:
    """RoundToNearest (GS v0.5.0) names for Linear layer `layer`."""
    return QuantNames(f"{layer}._handler.weight", f"{layer}._weight_quantizer.scale",
                      f"{layer}._weight_quantizer.zp_neg", f"{layer}._handler.bias")


def ptq_names(layer: str) -> QuantNames:
    """PTQ framework (GS v1.0+) names for Linear layer `layer`."""
    return QuantNames(f"{layer}._layer.weight", f"{layer}._layer.matmul.weight_scale",
                      f"{layer}._layer.matmul.weight_zp", f"{layer}._layer.bias")
