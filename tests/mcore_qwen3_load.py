"""Load a model directory into MindFormers' own Mcore Qwen3 and dump what it loaded.

Run as a script, in a process of its own: MindFormers' Mcore networks need its
global context with `use_legacy: False` and RUN_MODE=predict, which the legacy
Llama of the other tests must not see. Builds InferenceQwen3ForCausalLM (tiny,
CPU, `quantization: golden-stick`, so the quant_model_description.json of
MODEL_DIR picks each layer's method), loads MODEL_DIR with its own
`load_weights`, and saves every parameter to OUT (npz; bfloat16 as float32,
which holds it exactly) for the test to compare with what ckpt-rtn wrote.

    python mcore_qwen3_load.py MODEL_DIR PARAMS_DTYPE OUT.npz
"""
import os
import sys

os.environ["RUN_MODE"] = "predict"

import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402
from mindformers import build_context  # noqa: E402
from mindformers.models.qwen3.configuration_qwen3 import Qwen3Config  # noqa: E402
from mindformers.models.qwen3.modeling_qwen3_infer import InferenceQwen3ForCausalLM  # noqa: E402

#: tests/test_hf_families.py's Qwen3: hidden 64, 2 layers, 4 query heads of 32, 2 KV heads,
#: the head tied to the embedding.
DIMS = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            max_position_embeddings=64, tie_word_embeddings=True)


def main(model_dir: str, params_dtype: str, out: str) -> None:
    build_context({"use_legacy": False, "parallel": {},
                   "context": {"mode": ms.GRAPH_MODE, "device_target": "CPU"}})
    config = Qwen3Config(**DIMS, compute_dtype=params_dtype, params_dtype=params_dtype,
                         quantization="golden-stick", pretrained_model_dir=model_dir)
    net = InferenceQwen3ForCausalLM(config)
    net.load_weights(model_dir)
    arrays = {}
    for name, param in net.parameters_and_names():
        value = param.float() if param.dtype == ms.bfloat16 else param
        arrays[name] = value.asnumpy()
    np.savez(out, **arrays)


if __name__ == "__main__":
    main(*sys.argv[1:])
