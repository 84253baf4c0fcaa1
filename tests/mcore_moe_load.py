"""Load a model directory into MindFormers' own Mcore DeepSeek-V3 and dump what it loaded.

Run as a script, in a process of its own (see mcore_qwen3_load.py for why).
DeepSeek-V3 is the MoE network of MindFormers 1.9 that takes a quantized
checkpoint: InferenceQwen3MoeForCausalLM builds no quant_config (it never calls
get_quant_config) and does not rename `.weight_scale`, so its experts stay
bfloat16. Builds InferenceDeepseekV3ForCausalLM (tiny, CPU, `quantization:
golden-stick`, so MODEL_DIR's quant_model_description.json picks each layer's
method and gives A8W4 its group_size), loads MODEL_DIR as its `load_weights`
does, and saves every parameter to OUT (npz; bfloat16 as float32, which holds
it exactly; qint4x2 as the int8 bytes the loader copied).

`load_weights` itself ends with process_weights_after_loading, whose A8W4
step (a8dynw4.py: gmm_bias from the unpacked codes and scales) fails on CPU
with "RuntimeError: The kernel RepeatInterleaveInt unregistered"; so this
script makes the same GPTModel.load_weights call without that step, and the
test computes gmm_bias the way a8dynw4.py does.

    python mcore_moe_load.py MODEL_DIR PARAMS_DTYPE OUT.npz
"""
import os
import sys

os.environ["RUN_MODE"] = "predict"

import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402
from mindformers import build_context  # noqa: E402
from mindformers.models.deepseek3.configuration_deepseek_v3 import DeepseekV3Config  # noqa: E402
from mindformers.models.deepseek3.modeling_deepseek_v3_infer import (  # noqa: E402
    InferenceDeepseekV3ForCausalLM)

#: tests/test_w4a8.py's DeepSeek-V3: hidden 256, 2 layers (layer 0 dense), MLA with 4 heads,
#: 4 routed experts and 1 shared, all of intermediate size 256.
DIMS = dict(vocab_size=128, hidden_size=256, intermediate_size=256, moe_intermediate_size=256,
            num_hidden_layers=2, num_nextn_predict_layers=0, num_attention_heads=4,
            num_key_value_heads=4, n_shared_experts=1, n_routed_experts=4, kv_lora_rank=32,
            q_lora_rank=48, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=16, n_group=1,
            topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
            max_position_embeddings=64)


def main(model_dir: str, params_dtype: str, out: str) -> None:
    build_context({"use_legacy": False, "parallel": {},
                   "context": {"mode": ms.GRAPH_MODE, "device_target": "CPU"}})
    config = DeepseekV3Config(**DIMS, compute_dtype=params_dtype, params_dtype=params_dtype,
                              quantization="golden-stick", pretrained_model_dir=model_dir)
    net = InferenceDeepseekV3ForCausalLM(config)
    files = net.get_weights_files(model_dir)
    net.model.load_weights(net._safetensors_weights_iterator(files),  # pylint: disable=W0212
                           net.generate_mapping(), net.check_hf_weight(weights_files=files))
    arrays = {}
    for name, param in net.parameters_and_names():
        value = param.float() if param.dtype == ms.bfloat16 else param
        arrays[name] = value.asnumpy()
    np.savez(out, **arrays)


if __name__ == "__main__":
    main(*sys.argv[1:])
