"""SQuAD 1.1 answered by a checkpoint, and scored twice.

The prompts, the answer cut and the official SQuAD v1.1 score come from
`ckpt_rtn.tasks.squad` (MindSpore-free). The score behind Golden Stick's
table is MindFormers' own `EmF1Metric`, called here rather than rewritten,
so the two cannot drift apart.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

from ..tasks import squad
from . import LOG_DIR
from .generation import Generator


@dataclass(frozen=True)
class SquadScores:
    """F1 and EM in percent: by MindFormers' EmF1Metric, and by the official v1.1 script."""
    f1: float
    em: float
    f1_official: float
    em_official: float
    predictions: Tuple[str, ...]


def golden_stick_scores(predictions: Sequence[str],
                        samples: Sequence[squad.Sample]) -> Tuple[float, float]:
    """(F1, EM) by MindFormers' EmF1Metric against each paragraph's first gold answer.

    `evaluate_pairs` is the metric's scoring without `update`'s per-sample
    printing; the answers are already cut as `update` cuts them.
    """
    import jieba  # EmF1Metric segments words with it
    from mindformers.core.metric.metric import EmF1Metric

    jieba.setLogLevel(logging.WARNING)  # not its dictionary-loading chatter
    jieba.dt.tmp_dir = LOG_DIR  # its dictionary cache beside our logs, not loose in /tmp
    result, _ = EmF1Metric().evaluate_pairs(list(predictions), [s.answer for s in samples])
    return float(result["F1"]), float(result["Em"])


def answer_squad(generator: Generator, prompts: Sequence[Sequence[int]],
                 decode: Callable[[List[int]], str], samples: Sequence[squad.Sample],
                 max_new_tokens: int,
                 progress: Optional[Callable[[int], None]] = None) -> SquadScores:
    """Each sample's prompt (its token ids in `prompts`) continued greedily until its answer
    line ends, EOS, or `max_new_tokens`."""
    predictions = []
    for prompt in prompts:
        new = generator.generate(list(prompt), max_new_tokens,
                                 stop=lambda tokens: squad.answered(decode(tokens)))
        predictions.append(squad.answer(decode(new)))
        if progress is not None:
            progress(1)
    f1, em = golden_stick_scores(predictions, samples)
    em_official, f1_official = squad.official_scores(predictions, samples)
    return SquadScores(f1=f1, em=em, f1_official=f1_official, em_official=em_official,
                       predictions=tuple(predictions))
