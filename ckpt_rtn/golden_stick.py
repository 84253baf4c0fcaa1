"""Golden Stick's checkpoint naming for a RoundToNearest W8A16 Linear.

Golden Stick wraps each Linear `<p>` in a quant cell whose first attribute is
the original Linear (`_handler`) and whose weight quantizer holds the
per-channel scale and negated zero point. After `update_parameters_name()`
the deployed network's parameters, and so the checkpoint, are named:

    <p>._handler.weight            int8   [out, in]
    <p>._weight_quantizer.scale    float  [out]   (the weight's float dtype)
    <p>._weight_quantizer.zp_neg   float  [out]
    <p>._handler.bias              unchanged, only if the Linear has a bias
"""
from __future__ import annotations

from typing import NamedTuple

WEIGHT = "._handler.weight"
BIAS = "._handler.bias"
SCALE = "._weight_quantizer.scale"
ZP_NEG = "._weight_quantizer.zp_neg"


class W8A16Names(NamedTuple):
    weight: str
    scale: str
    zp_neg: str
    bias: str


def w8a16_names(layer: str) -> W8A16Names:
    """The quantized tensor names of Linear layer `layer`."""
    return W8A16Names(layer + WEIGHT, layer + SCALE, layer + ZP_NEG, layer + BIAS)
