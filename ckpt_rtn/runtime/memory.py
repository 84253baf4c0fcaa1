"""What a deployed network holds in memory: its parameters by dtype, and the process's peak.

Golden Stick's table reports the device memory of the deployed network;
on a CPU that is the host memory of the network's parameters as they are
held at run time, which is not the checkpoint's bytes: an FP16 checkpoint
evaluated in float32 is held at twice its size, and the CPU W4A16 cells also
hold a dequantized copy of each weight (int4 codes cannot be cast on CPU;
Ascend's fused kernel reads them directly). So the bytes are counted from
the network's parameters, with their dtypes, never from the file.
"""
from __future__ import annotations

import resource
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Dict

from mindspore import nn
from mindformers.modules.layers import Linear

from .deploy import QuantLinear


@dataclass(frozen=True)
class WeightMemory:
    """Bytes of a network's parameters: all of them, by dtype, and those of its Linear layers."""
    total_bytes: int
    by_dtype: Dict[str, int]
    linear_bytes: int
    linear_by_dtype: Dict[str, int]


def weight_memory(net: nn.Cell) -> WeightMemory:
    """Parameter bytes as `net` holds them (quantized cells: codes, scales, zero points, and
    on CPU any dequantized copy; MindFormers' Linear: its weight and bias)."""
    linear_prefixes = tuple(f"{name}." for name, cell in net.cells_and_names()
                            if isinstance(cell, (Linear, QuantLinear)))
    total: Counter = Counter()
    linear: Counter = Counter()
    for name, param in net.parameters_and_names():
        dtype, size = str(param.dtype).lower(), int(param.nbytes)
        total[dtype] += size
        if name.startswith(linear_prefixes):
            linear[dtype] += size
    return WeightMemory(total_bytes=sum(total.values()), by_dtype=dict(sorted(total.items())),
                        linear_bytes=sum(linear.values()),
                        linear_by_dtype=dict(sorted(linear.items())))


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (getrusage; kB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
