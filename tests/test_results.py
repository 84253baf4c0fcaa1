"""The results table's layout and records (MindSpore-free)."""
from __future__ import annotations

from pathlib import Path

from ckpt_rtn import results


def _record(path: Path, **values: object) -> results.Record:
    path.write_bytes(b"x" * 1000)
    record = results.empty_record(str(path), "graph", 1024)
    record.update(values)
    return record


def test_a_record_has_every_key_and_null_for_what_was_not_asked(tmp_path: Path) -> None:
    record = _record(tmp_path / "fp.ckpt")
    assert tuple(record) == results.KEYS
    assert record["size_bytes"] == 1000 and record["mode"] == "graph"
    for key in ("wikitext2_ppl", "squad_f1", "squad_em", "squad_f1_official",
                "squad_em_official", "prefill_tokens_per_s", "decode_tokens_per_s",
                "decode_uses_kv_cache", "weight_memory_bytes", "peak_rss_bytes"):
        assert record[key] is None


def test_metrics_are_rows_and_each_checkpoint_a_column_with_its_change(tmp_path: Path) -> None:
    fp = _record(tmp_path / "fp.ckpt", wikitext2_ppl=10.0, squad_f1=60.0,
                 linear_weight_memory_dtypes={"float32": 400})
    w8 = _record(tmp_path / "w8.ckpt", wikitext2_ppl=10.1, squad_f1=61.5,
                 linear_weight_memory_dtypes={"int8": 100, "float32": 4})
    header, rows = results.table([fp, w8])
    assert header == ["metric", "fp.ckpt", "w8.ckpt", "change"]
    by_label = {row[0]: row[1:] for row in rows}
    assert by_label["WikiText-2 PPL"] == ["10.000", "10.100", "+1.00%"]
    assert by_label["SQuAD F1 (EmF1Metric)"] == ["60.00", "61.50", "+1.50 pt"]
    assert by_label["checkpoint size"] == ["0.0 MB", "0.0 MB", "+0.00%"]
    assert by_label["  Linear held as"] == ["float32", "int8 + float32", ""]
    # Nothing measured the decode rate or SQuAD EM: no rows for them.
    assert not any(label.startswith(("decode", "SQuAD EM")) for label in by_label)


def test_a_value_missing_for_one_checkpoint_shows_a_dash(tmp_path: Path) -> None:
    fp = _record(tmp_path / "fp.ckpt", prefill_tokens_per_s=None)
    w8 = _record(tmp_path / "w8.ckpt", prefill_tokens_per_s=250.0)
    _, rows = results.table([fp, w8])
    assert ["prefill tokens/s", "-", "250.0", ""] in rows


def test_the_footnote_says_how_it_was_measured(tmp_path: Path) -> None:
    record = _record(tmp_path / "fp.ckpt", wikitext2_tokens=250000, squad_samples=100,
                     decode_tokens_per_s=3.5, decode_uses_kv_cache=False)
    note = results.footnote([record])
    assert "mode graph" in note and "seq_len 1024" in note and "250000" in note
    assert "SQuAD 100 paragraphs" in note and "KV cache needs Ascend" in note
