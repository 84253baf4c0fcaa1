"""The MindFormers Llama a model.yaml describes, built for a run on this machine.

One network serves perplexity, generation and the deploy tests; it is
built in eval mode with random weights, then a checkpoint is loaded into it
(`deploy.load_checkpoint_into`). See shared/specs/mindformers-cpu.md for why
each run-time value is what it is.
"""
from __future__ import annotations

import time
from typing import Any

import mindspore as ms
import numpy as np
from mindformers import LlamaConfig, LlamaForCausalLM

from ..errors import ConfigError
from ..models import ModelConfig, check_architecture

#: Values that make MindFormers Llama run on CPU: no fused RmsNorm kernel on CPU,
#: and the sliced rotary avoids a BatchMatMul broadcast the CPU backend lacks. The
#: KV cache (`use_past`) needs ApplyRotaryPosEmb and paged attention, which are
#: Ascend kernels ("The kernel ApplyRotaryPosEmb unregistered" on CPU).
#: Harmless on other devices.
CPU_SAFE = {"batch_size": 1, "use_past": False, "use_rope_slice": True, "fused_rms_norm": False}
COMPUTE_DTYPES = ("float32", "float16", "bfloat16")
#: MindSpore's two execution modes, by the names the command line takes.
MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}
#: The KV-cache decode path is not available on CPU (see CPU_SAFE).
USES_KV_CACHE = CPU_SAFE["use_past"]


def set_mode(mode: str) -> None:
    """Run what follows in MindSpore's graph (compiled) or PyNative (eager) mode.

    Both work on CPU with CPU_SAFE's values; the mode is process-wide, so
    it is set before a network is built and left as it is.
    """
    if mode not in MODES:
        raise ConfigError(None, f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    ms.set_context(mode=MODES[mode])


def build_llama(config: ModelConfig, seq_length: int, compute_dtype: str = "float32",
                mode: str = "graph") -> Any:
    """A MindFormers LlamaForCausalLM for `config`, in eval mode, with random weights.

    Every float type (compute, parameters, norms, softmax, rotary) is
    `compute_dtype`, so weights are loaded into parameters of that dtype.
    """
    if compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(None, f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, "
                          f"not {compute_dtype!r}")
    check_architecture(None, config.model)
    set_mode(mode)
    dtypes = dict.fromkeys(("compute_dtype", "param_init_type", "layernorm_compute_type",
                            "softmax_compute_type", "rotary_dtype"), compute_dtype)
    llama_config = LlamaConfig(seq_length=seq_length, **CPU_SAFE, **dtypes, **config.model)
    net = LlamaForCausalLM(llama_config)
    net.set_train(False)
    return net


class TimedForward:
    """A network's forward pass on one window of token ids, timed for throughput.

    The first call is not timed: in graph mode it compiles the network
    (tens of seconds), which is a one-off cost, not a rate. `calls` and
    `seconds` count the timed calls, each of which processes the whole
    window: `seq_length` tokens of prefill, or one new token when decoding
    without a KV cache.
    """

    def __init__(self, net: Any, seq_length: int) -> None:
        self.net, self.seq_length = net, seq_length
        self.calls, self.seconds = 0, 0.0
        self._warm = False

    def __call__(self, window: np.ndarray) -> np.ndarray:
        """[seq_length, vocab] float32 logits of one [seq_length] window."""
        started = time.perf_counter()
        logits = self.net(ms.Tensor(window[None, :].astype(np.int32)))[0].asnumpy()
        if self._warm:
            self.calls += 1
            self.seconds += time.perf_counter() - started
        self._warm = True
        return logits.reshape(self.seq_length, -1)
