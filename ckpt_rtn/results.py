"""The results table of `eval` and `compare`: one record per checkpoint, and its layout.

Golden Stick's RTN table puts metrics in rows and checkpoints in columns,
each beside its change against the FP16 baseline; `compare` prints that,
and `--json` writes the records themselves, so a pipeline can read any
figure by a stable key. Every key is always present: null means the
metric was not asked for (or, for a rate, that too little ran to time it).
MindSpore-free: the runtime fills the records, this module only lays them out.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

#: The keys of one checkpoint's record, in the order `--json` writes them.
KEYS = ("path", "size_bytes", "linear_checkpoint_bytes", "wikitext2_ppl", "wikitext2_tokens",
        "text_ppl", "squad_f1", "squad_em", "squad_f1_official", "squad_em_official",
        "squad_samples", "prefill_tokens_per_s", "decode_tokens_per_s", "decode_uses_kv_cache",
        "weight_memory_bytes", "weight_memory_dtypes", "linear_weight_memory_bytes",
        "linear_weight_memory_dtypes", "peak_rss_bytes", "mode", "seq_len",
        "squad_predictions")

Record = Dict[str, Any]


def empty_record(path: str, mode: str, seq_len: int) -> Record:
    record: Record = dict.fromkeys(KEYS)
    record.update(path=path, mode=mode, seq_len=seq_len, size_bytes=os.path.getsize(path))
    return record


def _mb(value: float) -> str:
    return f"{value / 1e6:,.1f} MB"


def _relative(value: float, base: float) -> str:
    return f"{(value - base) / base:+.2%}" if base else ""


def _points(value: float, base: float) -> str:
    return f"{value - base:+.2f} pt"


def _dtypes(by_dtype: Dict[str, int]) -> str:
    return " + ".join(sorted(by_dtype, key=lambda d: -by_dtype[d]))


#: (row label, how to read the value from a record, format, change against the baseline).
Row = Tuple[str, Callable[[Record], Any], Callable[[Any], str], Optional[Callable[[Any, Any], str]]]


def _rows(records: Sequence[Record]) -> List[Row]:
    def key(name: str) -> Callable[[Record], Any]:
        return lambda record: record[name]

    def text(name: str) -> Callable[[Record], Any]:
        return lambda record: (record["text_ppl"] or {}).get(name)

    kv_cache = any(r["decode_uses_kv_cache"] for r in records)
    texts = sorted({name for r in records for name in (r["text_ppl"] or {})})
    ppl, score, rate = "{:.3f}".format, "{:.2f}".format, "{:,.1f}".format
    return [
        ("checkpoint size", key("size_bytes"), _mb, _relative),
        ("Linear weights in the file", key("linear_checkpoint_bytes"), _mb, _relative),
        ("WikiText-2 PPL", key("wikitext2_ppl"), ppl, _relative),
        *((f"PPL {name}", text(name), ppl, _relative) for name in texts),
        ("SQuAD F1 (EmF1Metric)", key("squad_f1"), score, _points),
        ("SQuAD EM (EmF1Metric)", key("squad_em"), score, _points),
        ("SQuAD F1 (official v1.1)", key("squad_f1_official"), score, _points),
        ("SQuAD EM (official v1.1)", key("squad_em_official"), score, _points),
        ("prefill tokens/s", key("prefill_tokens_per_s"), rate, _relative),
        (f"decode tokens/s ({'KV cache' if kv_cache else 'no KV cache'})",
         key("decode_tokens_per_s"), rate, _relative),
        ("weight memory", key("weight_memory_bytes"), _mb, _relative),
        ("  Linear layers", key("linear_weight_memory_bytes"), _mb, _relative),
        ("  Linear held as", key("linear_weight_memory_dtypes"), _dtypes, None),
        ("peak RSS", key("peak_rss_bytes"), _mb, _relative),
    ]


def table(records: Sequence[Record]) -> Tuple[List[str], List[List[str]]]:
    """Header and rows: a metric per row; per checkpoint its value, and from the second
    on its change against the first. Metrics no record has are left out."""
    names = [os.path.basename(r["path"]) for r in records]
    header = ["metric", names[0]] + [cell for name in names[1:] for cell in (name, "change")]
    rows = []
    base = records[0]
    for label, read, fmt, change in _rows(records):
        values = [read(r) for r in records]
        if all(v is None for v in values):
            continue
        cells = [label, "-" if values[0] is None else fmt(values[0])]
        for value in values[1:]:
            cells.append("-" if value is None else fmt(value))
            ok = change is not None and value is not None and read(base) is not None
            cells.append(change(value, read(base)) if ok else "")  # type: ignore[misc]
        rows.append(cells)
    return header, rows


def footnote(records: Sequence[Record]) -> str:
    """How the figures were measured, for the line under the table."""
    first = records[0]
    parts = [f"mode {first['mode']}", f"seq_len {first['seq_len']}"]
    if first["wikitext2_tokens"] is not None:
        parts.append(f"WikiText-2 {first['wikitext2_tokens']} predicted tokens")
    if first["squad_samples"] is not None:
        parts.append(f"SQuAD {first['squad_samples']} paragraphs")
    if first["decode_tokens_per_s"] is not None and not first["decode_uses_kv_cache"]:
        parts.append("decode re-runs the window per token: MindFormers' KV cache needs Ascend")
    return "(" + "; ".join(parts) + ")"
