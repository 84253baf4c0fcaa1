"""Load a model directory into one of MindFormers' own Mcore networks and dump what it loaded.

Run as a script, in a process of its own: MindFormers' Mcore networks need its
global context with `use_legacy: False` and RUN_MODE=predict, which the legacy
Llama of the other tests must not see. Builds the tiny NETWORK (CPU,
`quantization: golden-stick`, so MODEL_DIR's quant_model_description.json
picks each layer's method), loads MODEL_DIR with the network's own loader,
and saves every parameter to OUT (npz; bfloat16 as float32, which holds it
exactly; qint4x2 as the int8 bytes the loader copied) for the test to compare
with what ckpt-rtn wrote (conftest.mcore_load).

- qwen3: InferenceQwen3ForCausalLM and its `load_weights`; test_hf_families'
  Qwen3 (hidden 64, 2 layers, 4 query heads of 32, 2 KV heads, tied head).
- deepseek-v3: InferenceDeepseekV3ForCausalLM, the MoE network of MindFormers
  1.9 that takes a quantized checkpoint (InferenceQwen3MoeForCausalLM builds
  no quant_config and does not rename `.weight_scale`); test_w4a8's model:
  hidden 256, 2 layers (layer 0 dense), MLA with 4 heads, 4 routed experts
  and 1 shared of intermediate size 256. `load_weights` ends with
  process_weights_after_loading, whose A8W4 step (a8dynw4.py: gmm_bias from
  the unpacked codes and scales) fails on CPU ("The kernel RepeatInterleaveInt
  unregistered"), so the same GPTModel.load_weights call is made without that
  step and the test computes gmm_bias as a8dynw4.py does.

    python mcore_load.py NETWORK MODEL_DIR PARAMS_DTYPE OUT.npz
"""
import os
import sys

os.environ["RUN_MODE"] = "predict"

import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402
from mindformers import build_context  # noqa: E402


def qwen3(model_dir: str, params_dtype: str):
    from mindformers.models.qwen3.configuration_qwen3 import Qwen3Config
    from mindformers.models.qwen3.modeling_qwen3_infer import InferenceQwen3ForCausalLM

    config = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, max_position_embeddings=64, tie_word_embeddings=True,
                         compute_dtype=params_dtype, params_dtype=params_dtype,
                         quantization="golden-stick", pretrained_model_dir=model_dir)
    net = InferenceQwen3ForCausalLM(config)
    net.load_weights(model_dir)
    return net


def deepseek_v3(model_dir: str, params_dtype: str):
    from mindformers.models.deepseek3.configuration_deepseek_v3 import DeepseekV3Config
    from mindformers.models.deepseek3.modeling_deepseek_v3_infer import (
        InferenceDeepseekV3ForCausalLM)

    config = DeepseekV3Config(
        vocab_size=128, hidden_size=256, intermediate_size=256, moe_intermediate_size=256,
        num_hidden_layers=2, num_nextn_predict_layers=0, num_attention_heads=4,
        num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4, kv_lora_rank=32,
        q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, n_group=1,
        topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        max_position_embeddings=64, compute_dtype=params_dtype, params_dtype=params_dtype,
        quantization="golden-stick", pretrained_model_dir=model_dir)
    net = InferenceDeepseekV3ForCausalLM(config)
    files = net.get_weights_files(model_dir)
    net.model.load_weights(net._safetensors_weights_iterator(files),  # pylint: disable=W0212
                           net.generate_mapping(), net.check_hf_weight(weights_files=files))
    return net


NETWORKS = {"qwen3": qwen3, "deepseek-v3": deepseek_v3}


def main(network: str, model_dir: str, params_dtype: str, out: str) -> None:
    build_context({"use_legacy": False, "parallel": {},
                   "context": {"mode": ms.GRAPH_MODE, "device_target": "CPU"}})
    net = NETWORKS[network](model_dir, params_dtype)
    arrays = {}
    for name, param in net.parameters_and_names():
        value = param.float() if param.dtype == ms.bfloat16 else param
        arrays[name] = value.asnumpy()
    np.savez(out, **arrays)


if __name__ == "__main__":
    main(*sys.argv[1:])
