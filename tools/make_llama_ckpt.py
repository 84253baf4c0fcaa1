#!/usr/bin/env python3
"""Write a Llama2-shaped FP16 checkpoint with random weights, for benchmarks.

Real Llama2 tensor shapes and MindFormers names (`--naming hf`: Hugging Face's,
as a downloaded Llama's safetensors name them); `--layers` sets the size
(7b: ~0.4 GB per layer, 70b: ~1.7 GB per layer, plus embeddings and head).
By default the file is streamed out with ckpt-rtn's own writer, so even a
20 GB file needs little memory; `--writer mindspore` builds it in memory and
saves it with mindspore.save_checkpoint instead, as a user's training run
would.

    python tools/make_llama_ckpt.py --preset 7b --layers 2 /tmp/llama_1gb.ckpt
    python tools/make_llama_ckpt.py --preset 70b --layers 1 --naming hf /tmp/hf70b.safetensors
"""
from __future__ import annotations

import argparse
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Tuple

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ckpt_rtn import dtypes  # noqa: E402
from ckpt_rtn.formats import format_from_suffix, open_writer  # noqa: E402
from ckpt_rtn.formats.tensor import TensorInfo  # noqa: E402

#: hidden, ffn, query heads, kv heads, vocab (Llama2 papers / HF configs).
PRESETS = {
    "7b": (4096, 11008, 32, 32, 32000),
    "13b": (5120, 13824, 40, 40, 32000),
    "70b": (8192, 28672, 64, 8, 32000),
}


def llama2_shapes(preset: str, layers: int) -> Dict[str, Tuple[int, ...]]:
    hidden, ffn, heads, kv_heads, vocab = PRESETS[preset]
    kv = hidden // heads * kv_heads
    shapes: Dict[str, Tuple[int, ...]] = {"model.tok_embeddings.embedding_weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "attention_norm.weight": (hidden,),
            p + "attention.wq.weight": (hidden, hidden),
            p + "attention.wk.weight": (kv, hidden),
            p + "attention.wv.weight": (kv, hidden),
            p + "attention.wo.weight": (hidden, hidden),
            p + "ffn_norm.weight": (hidden,),
            p + "feed_forward.w1.weight": (ffn, hidden),
            p + "feed_forward.w3.weight": (ffn, hidden),
            p + "feed_forward.w2.weight": (hidden, ffn),
        })
    shapes["model.norm_out.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


#: MindFormers' Llama names -> Hugging Face's (transformers' LlamaForCausalLM).
HF_NAMES = [("model.tok_embeddings.embedding_weight", "model.embed_tokens.weight"),
            ("attention_norm.", "input_layernorm."), ("attention.wq.", "self_attn.q_proj."),
            ("attention.wk.", "self_attn.k_proj."), ("attention.wv.", "self_attn.v_proj."),
            ("attention.wo.", "self_attn.o_proj."), ("ffn_norm.", "post_attention_layernorm."),
            ("feed_forward.w1.", "mlp.gate_proj."), ("feed_forward.w3.", "mlp.up_proj."),
            ("feed_forward.w2.", "mlp.down_proj."), ("model.norm_out.", "model.norm.")]


def hf_name(name: str) -> str:
    for ours, theirs in HF_NAMES:
        name = name.replace(ours, theirs)
    return name


#: Rows drawn per task: float32 temporaries of a few MB, and enough tasks to keep every core busy.
_BAND = 256


def random_fp16(seed: int, index: int, shape: Tuple[int, ...],
                pool: ThreadPoolExecutor) -> np.ndarray:
    """Normal(0, 0.02) values, drawn in bands of rows on every core.

    Each band has its own generator seeded by (seed, tensor, band), so the file
    is the same whatever the number of cores; numpy draws without the GIL.
    """
    if len(shape) == 1:
        return np.ones(shape, np.float16)
    out = np.empty(shape, np.float16)

    def band(start: int) -> None:
        rng = np.random.default_rng([seed, index, start // _BAND])
        block = rng.standard_normal((min(_BAND, shape[0] - start),) + shape[1:], np.float32)
        out[start:start + len(block)] = block * np.float32(0.02)

    list(pool.map(band, range(0, shape[0], _BAND)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help=".ckpt or .safetensors path")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="7b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--writer", choices=("ckpt-rtn", "mindspore"), default="ckpt-rtn")
    parser.add_argument("--naming", choices=("mindformers", "hf"), default="mindformers")
    args = parser.parse_args()
    shapes = llama2_shapes(args.preset, args.layers)
    if args.naming == "hf":
        shapes = {hf_name(name): shape for name, shape in shapes.items()}
    pool = ThreadPoolExecutor(len(os.sched_getaffinity(0)))
    if args.writer == "mindspore":
        import mindspore as ms
        fmt = "safetensors" if args.output.endswith(".safetensors") else "ckpt"
        ms.save_checkpoint([{"name": k, "data": ms.Tensor(random_fp16(args.seed, i, s, pool))}
                            for i, (k, s) in enumerate(shapes.items())], args.output, format=fmt)
    else:
        infos = [TensorInfo.of(k, dtypes.FLOAT16, s) for k, s in shapes.items()]
        fmt = format_from_suffix(args.output) or "ckpt"
        with open_writer(args.output, infos, format=fmt, metadata={"format": "ms"}) as writer:
            for i, (name, shape) in enumerate(shapes.items()):
                writer.write(name, random_fp16(args.seed, i, shape, pool))
    pool.shutdown()
    print(f"{args.output}: {len(shapes)} tensors, {os.path.getsize(args.output)} bytes")


if __name__ == "__main__":
    main()
