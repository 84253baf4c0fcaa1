"""The bytes a checkpoint file spends on its Linear layers (MindSpore-free).

Embeddings dominate a small model's size and are never quantized, so the
whole file shrinks less than the part RTN works on; `compare` reports both.
"""
from __future__ import annotations

import os

from .formats import open_reader
from .rules import load_rules
from .schemes import detect_scheme


def linear_weight_bytes(checkpoint: "os.PathLike[str] | str", family: str) -> int:
    """FP weights of every Linear layer the family's rules select (the blacklist aside), or,
    in a quantized checkpoint, the codes, scales and zero points of its quantized layers."""
    rules = load_rules(family).with_overrides(keep_default_blacklist=False)
    with open_reader(checkpoint, verify_crc=False) as reader:
        found = detect_scheme(reader.tensors)
        quantized = {name for layer in found.layers for name in found.names(layer)[:3]} \
            if found is not None else set()
        return sum(t.nbytes for t in reader.tensors
                   if t.name in quantized or rules.select(t) is not None)
