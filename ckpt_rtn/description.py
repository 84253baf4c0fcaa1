"""`quant_model_description.json`: how MindFormers' Mcore networks learn each layer's method.

What MindFormers 1.9 reads (parallel_core/inference/quantization/): with
`quantization: golden-stick` in the model config, `utils.get_quant_config`
globs the model directory (`pretrained_model_dir`) for `*.json` files whose
path contains `quant_model_description` or `quantization_description`,
refuses none or several, and loads the one it finds as a flat JSON object.
`golden_stick/config.py` (GoldenStickConfig) renames its keys with the
network's `weight_mapping` (Hugging Face names to Mcore ones) and, for each
Linear or embedding layer, takes the value of the *first* key that contains
the layer's prefix: "FLOAT" (unquantized), "W8A8", "W8A8_DYNAMIC" or
"W4A8_DYNAMIC". A layer no key matches fails the network's construction, so
every tensor is listed. No other top-level key is required; A8W4DynamicLinearMethod
reads "group_size" (the int4 codes' group of input channels) and refuses a
network without it, so a w4a8-dynamic description carries it, and nothing else
is written. (Its key matching is safe: no layer prefix is contained in
"group_size".)

Because the first matching key decides, every tensor of a quantized layer
(its bias too, which sorts before its weight) carries the layer's method.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Iterable, List, Set

from . import dtypes
from .dtypes import from_mindspore_name
from .formats import untrusted_json
from .formats.tensor import TensorInfo
from .golden_stick import mcore_names
from .schemes import detect_scheme

#: The file name; MindFormers accepts any *.json whose path contains its stem.
NAME = "quant_model_description.json"
#: Stems whose presence in a *.json path MindFormers takes as a description.
STEMS = ("quant_model_description", "quantization_description")
FLOAT = "FLOAT"
W8A8_DYNAMIC = "W8A8_DYNAMIC"
W4A8_DYNAMIC = "W4A8_DYNAMIC"
#: The top-level key of a W4A8_DYNAMIC checkpoint's group size.
GROUP_SIZE = "group_size"


def methods(tensors: Iterable[TensorInfo]) -> Dict[str, str]:
    """Each tensor's method, by name, sorted: W4A8_DYNAMIC for the weight, scale and bias
    of each A8W4 expert (an int64 scale), W8A8_DYNAMIC for those of each other layer
    quantized in MindFormers' Mcore layout, FLOAT for everything else."""
    tensors = list(tensors)
    by_name = {t.name: t for t in tensors}
    found = detect_scheme(tensors)
    quantized: Dict[str, str] = {}
    if found is not None and found.scheme in ("w8a8-dynamic", "w4a8-dynamic"):
        for layer in found.layers:
            names = mcore_names(layer)
            method = (W4A8_DYNAMIC if by_name[names.scale].dtype is dtypes.INT64
                      else W8A8_DYNAMIC)
            quantized.update((name, method) for name in (names.weight, names.scale, names.bias))
    return {t.name: quantized.get(t.name, FLOAT) for t in sorted(tensors, key=lambda t: t.name)}


def render(tensors: Iterable[TensorInfo]) -> bytes:
    """The description's bytes for a checkpoint holding `tensors` (all its shards'), with
    the group size where some layer is W4A8_DYNAMIC."""
    tensors = list(tensors)
    described: Dict[str, object] = dict(methods(tensors))
    found = detect_scheme(tensors)
    if found is not None and found.scheme == "w4a8-dynamic":
        described[GROUP_SIZE] = found.group_size
    return json.dumps(described, indent=2).encode() + b"\n"


def read_methods(path: "os.PathLike[str] | str") -> Set[str]:
    """The methods a description written by ckpt-rtn gives its tensors ("FLOAT", ...); none
    where there is none."""
    if not os.path.isfile(path):
        return set()
    described = untrusted_json.load_file(path, "quantization description")
    return {v for v in described.values() if isinstance(v, str)} \
        if isinstance(described, dict) else set()


def path_beside(output: "os.PathLike[str] | str") -> str:
    """Where a single output file's description goes: its directory, which is what
    MindFormers' `pretrained_model_dir` names."""
    return os.path.join(os.path.dirname(os.path.abspath(output)), NAME)


def others_beside(output: "os.PathLike[str] | str") -> List[str]:
    """The files in a single output's directory, other than its own description, that
    MindFormers would also take for one (and so refuse the directory)."""
    folder = os.path.dirname(path_beside(output))
    try:
        names = sorted(os.listdir(folder))
    except OSError:  # no directory yet: the output's own checks say so
        return []
    return [os.path.join(folder, name) for name in names
            if name != NAME and is_description(name)]


def is_description(rel: str) -> bool:
    """Whether MindFormers would take the file `rel` (relative to a model directory) for a
    quantization description."""
    return rel.endswith(".json") and any(stem in rel for stem in STEMS)


def manifest_tensors(entries: Iterable[Dict[str, object]]) -> List[TensorInfo]:
    """TensorInfos from a manifest's tensor lists (directory.manifest_tensors' entries)."""
    return [TensorInfo(str(e["name"]), from_mindspore_name(str(e["dtype"])),
                       tuple(int(d) for d in e["shape"]), int(e["nbytes"]))  # type: ignore
            for e in entries]
