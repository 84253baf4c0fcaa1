"""Greedy decoding without a KV cache: windows, stopping, and what each step sees."""
from __future__ import annotations

from typing import List

import numpy as np
import pytest

from ckpt_rtn.runtime.generation import MIN_WINDOW, generate_greedy, window_for


class ScriptedForward:
    """Stands in for a TimedForward: logits that make `script[i]` the argmax after i
    generated tokens, and a record of every window it was given."""

    def __init__(self, seq_length: int, prompt_length: int, script: List[int],
                 vocab: int = 50) -> None:
        self.seq_length, self.prompt_length, self.script, self.vocab = \
            seq_length, prompt_length, script, vocab
        self.windows: List[np.ndarray] = []

    def __call__(self, window: np.ndarray) -> np.ndarray:
        self.windows.append(window.copy())
        step = len(self.windows) - 1
        logits = np.zeros((self.seq_length, self.vocab), np.float32)
        logits[self.prompt_length + step - 1, self.script[step]] = 1.0
        return logits


@pytest.mark.parametrize("length, limit, window", [
    (1, 1024, MIN_WINDOW), (128, 1024, 128), (129, 1024, 256), (300, 1024, 512),
    (513, 1024, 1024), (535, 640, 640), (100, 64, 64)])
def test_the_window_is_the_smallest_power_of_two_that_holds_the_tokens(
        length: int, limit: int, window: int) -> None:
    assert window_for(length, limit) == window


def test_each_step_sees_the_prompt_and_what_came_before_padded_after() -> None:
    forward = ScriptedForward(16, 3, [7, 8, 9, 10])
    assert generate_greedy(forward, [1, 2, 3], 4, pad_token_id=0) == [7, 8, 9, 10]
    assert [list(w[:7]) for w in forward.windows] == [
        [1, 2, 3, 0, 0, 0, 0], [1, 2, 3, 7, 0, 0, 0], [1, 2, 3, 7, 8, 0, 0],
        [1, 2, 3, 7, 8, 9, 0]]


def test_generation_ends_at_eos_or_when_stop_says_so() -> None:
    assert generate_greedy(ScriptedForward(16, 2, [5, 2, 6]), [1, 1], 3, eos_token_id=2) == [5, 2]
    seen = []

    def stop(tokens: List[int]) -> bool:
        seen.append(list(tokens))
        return tokens[-1] == 6

    assert generate_greedy(ScriptedForward(16, 2, [5, 6, 7]), [1, 1], 3, stop=stop) == [5, 6]
    assert seen == [[5], [5, 6]]


def test_a_prompt_that_does_not_fit_is_refused() -> None:
    with pytest.raises(ValueError, match="must be non-empty and fit in seq_length 8"):
        generate_greedy(ScriptedForward(8, 6, [1, 1, 1]), [1] * 6, 3)
    with pytest.raises(ValueError):
        generate_greedy(ScriptedForward(8, 0, [1]), [], 1)
