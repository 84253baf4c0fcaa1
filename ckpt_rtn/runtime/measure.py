"""One checkpoint's row of the results table: everything `eval` and `compare` measure.

A `Request` says what to measure, once for all checkpoints; `measure`
runs it on one checkpoint and fills a `ckpt_rtn.results` record. `compare`
runs each checkpoint in a fresh process (see `in_fresh_process`), so the
peak RSS it records is that checkpoint's alone.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence

from tqdm import tqdm

from .. import footprint, results
from ..errors import FormatError
from ..models import ModelConfig, load_text_codec
from ..tasks.squad import Sample
from .evaluate import Corpus, Evaluator
from .generation import Generator
from .memory import WeightMemory, peak_rss_bytes, weight_memory
from .network import USES_KV_CACHE
from .qa import answer_squad


@dataclass(frozen=True)
class Request:
    """What to measure on each checkpoint; one picklable value for the child processes.

    `texts` and `wikitext` are prepared windows (perplexity, and prefill
    throughput from the same passes); `squad` are the paragraphs to answer
    (scores, and decode throughput), `squad_prompts` their prompts' token ids
    (tokenized once, where the parent checks that each fits).
    """
    config: ModelConfig
    seq_len: int
    mode: str = "graph"
    texts: Dict[str, Corpus] = field(default_factory=dict)
    wikitext: Optional[Corpus] = None
    squad: Sequence[Sample] = ()
    squad_prompts: Sequence[Sequence[int]] = ()
    max_new_tokens: int = 32
    quiet: bool = False

    def progress(self, total: int, desc: str, unit: str) -> tqdm:
        return tqdm(total=total, desc=desc, unit=unit, leave=False,
                    disable=True if self.quiet or sys.stderr is None else None)


def measure(checkpoint: str, request: Request) -> results.Record:
    """The checkpoint's record: size, perplexities, SQuAD scores, throughput, memory."""
    record = results.empty_record(checkpoint, request.mode, request.seq_len)
    record["linear_checkpoint_bytes"] = footprint.linear_weight_bytes(checkpoint,
                                                                     request.config.family)
    label = os.path.basename(checkpoint)
    memory: Optional[WeightMemory] = None
    generator = Generator(request.config, checkpoint, request.seq_len, request.mode)
    if request.wikitext is not None or request.texts:
        evaluator = Evaluator(request.config, checkpoint, request.seq_len, request.mode)
        memory = weight_memory(evaluator.net)
        _perplexities(evaluator, request, label, record)
        record["prefill_tokens_per_s"] = evaluator.prefill_tokens_per_second
        generator.adopt(evaluator.net, request.seq_len)
    if request.squad:
        _, decode = load_text_codec(request.config)
        with request.progress(len(request.squad), f"{label} SQuAD", "question") as bar:
            scores = answer_squad(generator, request.squad_prompts, decode, request.squad,
                                  request.max_new_tokens, progress=bar.update)
        record.update(squad_f1=scores.f1, squad_em=scores.em, squad_f1_official=scores.f1_official,
                      squad_em_official=scores.em_official, squad_samples=len(request.squad),
                      squad_predictions=list(scores.predictions),
                      decode_uses_kv_cache=USES_KV_CACHE,
                      decode_tokens_per_s=(generator.decode_tokens / generator.decode_seconds
                                           if generator.decode_tokens else None))
        if memory is None:
            memory = weight_memory(next(iter(generator.forwards.values())).net)
    if memory is not None:
        record.update(weight_memory_bytes=memory.total_bytes, weight_memory_dtypes=memory.by_dtype,
                      linear_weight_memory_bytes=memory.linear_bytes,
                      linear_weight_memory_dtypes=memory.linear_by_dtype)
    record["peak_rss_bytes"] = peak_rss_bytes()
    return record


def _perplexities(evaluator: Evaluator, request: Request, label: str,
                  record: results.Record) -> None:
    runs = [("WikiText-2", request.wikitext)] if request.wikitext is not None else []
    runs += list(request.texts.items())
    for name, corpus in runs:
        with request.progress(len(corpus.windows), f"{label} {name}", "window") as bar:
            result = evaluator.measure(corpus, progress=bar.update)
        if not math.isfinite(result.ppl):  # no measurement: a table row "nan", exit 0
            raise FormatError(label, f"perplexity on {name} is {result.ppl}: the "
                              "network's outputs are not finite (a NaN or infinite "
                              "weight in the checkpoint?)")
        if corpus is request.wikitext:
            record.update(wikitext2_ppl=result.ppl, wikitext2_tokens=result.tokens)
        else:
            record["text_ppl"] = {**(record["text_ppl"] or {}), name: result.ppl}
