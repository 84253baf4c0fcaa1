"""Greedy generation without a KV cache, as a CPU can run MindFormers Llama.

MindFormers' incremental path (`use_past`) needs Ascend kernels
(ApplyRotaryPosEmb, paged attention), so every new token re-runs the
whole window the network was built for, padded after the prompt; the
causal mask makes the padding invisible to the position read. That makes
a step cost a full window, so answers are generated on the smallest window
that holds them (a network per window size, built when first needed).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from ..errors import ConfigError
from ..models import ModelConfig
from .deploy import load_checkpoint_into
from .network import TimedForward, build_llama

#: Stop when the tokens generated so far satisfy this (EOS, a newline...).
StopFn = Callable[[List[int]], bool]
#: Windows answers are generated on: the smallest that holds prompt + new tokens.
MIN_WINDOW = 128


def generate_greedy(forward: TimedForward, prompt: Sequence[int], max_new_tokens: int,
                    pad_token_id: int = 0, eos_token_id: Optional[int] = None,
                    stop: Optional[StopFn] = None) -> List[int]:
    """Greedy continuation of `prompt`: at most `max_new_tokens`, ending at EOS or `stop`."""
    tokens = list(prompt)
    if not tokens or len(tokens) + max_new_tokens > forward.seq_length:
        raise ValueError(f"prompt ({len(tokens)} tokens) + {max_new_tokens} new tokens must be "
                         f"non-empty and fit in seq_length {forward.seq_length}")
    window = np.full(forward.seq_length, pad_token_id, dtype=np.int32)
    window[:len(tokens)] = tokens
    generated: List[int] = []
    for _ in range(max_new_tokens):
        token = int(forward(window)[len(tokens) - 1].argmax())
        generated.append(token)
        window[len(tokens)] = token
        tokens.append(token)
        if token == eos_token_id or (stop is not None and stop(generated)):
            break
    return generated


def window_for(length: int, max_window: int) -> int:
    """The smallest power-of-two window (at least MIN_WINDOW) holding `length` tokens,
    or `max_window` when none below it does."""
    window = MIN_WINDOW
    while window < length and window < max_window:
        window *= 2
    return min(window, max_window)


class Generator:
    """One checkpoint answering prompts greedily, on networks built per window size.

    `decode_tokens` and `decode_seconds` add up the timed steps of every
    window's network (see TimedForward: each network's first, compiling,
    step is not timed).
    """

    def __init__(self, config: ModelConfig, checkpoint: "os.PathLike[str] | str",
                 max_window: int, mode: str = "graph") -> None:
        self.config, self.checkpoint = config, checkpoint
        self.max_window, self.mode = max_window, mode
        self.forwards: Dict[int, TimedForward] = {}

    def adopt(self, net: Any, window: int) -> None:
        """Generate on `net` (built for `window`, this checkpoint loaded) instead of building
        another: a compiled network costs GBs of host memory on CPU."""
        self.forwards[window] = TimedForward(net, window)

    def forward(self, window: int) -> TimedForward:
        if window not in self.forwards:
            net = build_llama(self.config, seq_length=window, mode=self.mode)
            load_checkpoint_into(net, self.checkpoint, upcast=True)
            self.forwards[window] = TimedForward(net, window)
        return self.forwards[window]

    def generate(self, prompt: Sequence[int], max_new_tokens: int,
                 stop: Optional[StopFn] = None) -> List[int]:
        length = len(prompt) + max_new_tokens
        if length > self.max_window:
            raise ConfigError(None, f"a prompt of {len(prompt)} tokens and {max_new_tokens} new "
                              f"tokens do not fit in --seq-len {self.max_window}")
        model = self.config.model
        return generate_greedy(self.forward(window_for(length, self.max_window)), prompt,
                               max_new_tokens, pad_token_id=model.get("pad_token_id", 0),
                               eos_token_id=model.get("eos_token_id"), stop=stop)

    @property
    def decode_tokens(self) -> int:
        return sum(forward.calls for forward in self.forwards.values())

    @property
    def decode_seconds(self) -> float:
        return sum(forward.seconds for forward in self.forwards.values())
