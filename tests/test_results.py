"""The results table's layout and records (MindSpore-free)."""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
from safetensors.numpy import save_file

from ckpt_rtn import results
from ckpt_rtn.formats import TensorInfo, open_reader
from ckpt_rtn.schemes import model_mismatch

from conftest import cli, llama_weights, needs_mindspore


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


def test_compare_refuses_another_model_from_the_headers(tmp_path: Path) -> None:
    """`compare` reads every checkpoint's header first: one that is not the baseline's model,
    as it is or quantized by any scheme, was refused by its network only once the
    checkpoints before it had been measured, minutes later."""
    weights = {name: value.astype(np.float16)
               for name, value in llama_weights(hidden=256, kv=64, ffn=512).items()}
    weights["model.layers.0.attention.wq.bias"] = np.zeros(256, np.float16)  # renamed by w8a16
    fp = tmp_path / "fp.safetensors"
    save_file(weights, str(fp))
    header = _header(fp)
    for scheme in ("w8a16", "w8a16-ptq", "w4a16"):
        out = tmp_path / f"{scheme}.safetensors"
        assert cli("convert", fp, out, "--scheme", scheme, "-q").exit_code == 0
        assert model_mismatch(header, _header(out)) is None, scheme
    assert model_mismatch(header, header) is None
    assert model_mismatch(_header(tmp_path / "w8a16.safetensors"), header) is None  # no reference

    larger = {**weights, "model.norm_out.weight": np.ones(512, np.float16)}
    del larger["lm_head.weight"]
    save_file(larger, str(tmp_path / "other.safetensors"))
    assert model_mismatch(header, _header(tmp_path / "other.safetensors")) == (
        "missing 1: lm_head.weight; mismatched 1: model.norm_out.weight (512,) (baseline (256,))")
    wider = {name: value.astype(np.float16)  # only the MLP's size differs: its Linear layers
             for name, value in llama_weights(hidden=256, kv=64, ffn=1024).items()}
    wider["model.layers.0.attention.wq.bias"] = weights["model.layers.0.attention.wq.bias"]
    save_file(wider, str(tmp_path / "wider.safetensors"))
    for scheme, label in (("w8a16", "w8a16"), ("w4a16", "w4a16 g128")):
        out = tmp_path / f"wider-{scheme}.safetensors"
        assert cli("convert", tmp_path / "wider.safetensors", out, "--scheme", scheme,
                   "-q").exit_code == 0
        problem = model_mismatch(header, _header(out))  # None, when only names were checked
        assert problem is not None and problem.startswith(
            f"mismatched 6: model.layers.0.feed_forward.w1 (not what {label} makes of the "
            "baseline's [512, 256] model.layers.0.feed_forward.w1.weight)"), problem
    quantized = _header(tmp_path / "w8a16.safetensors")
    assert model_mismatch([t for t in header if t.name != "model.layers.1.attention.wo.weight"],
                          quantized) == ("it quantizes 'model.layers.1.attention.wo', whose "
                                         "weight model.layers.1.attention.wo.weight the "
                                         "baseline lacks")
    bias = "model.layers.0.attention.wq._handler.bias"
    assert model_mismatch([t for t in header if t.name != "model.layers.0.attention.wq.bias"],
                          quantized) == f"unexpected 1: {bias}"


def test_compare_refuses_another_model_before_measuring(tmp_path: Path) -> None:
    needs_mindspore()  # compare refuses to start without it
    fp, w8, other = (tmp_path / f"{name}.safetensors" for name in ("fp", "w8", "other"))
    save_file(llama_weights(), str(fp))
    assert cli("convert", fp, w8, "-q").exit_code == 0
    save_file(llama_weights(vocab=200), str(other))
    text = tmp_path / "t.txt"
    text.write_text("x")
    result = cli("compare", "--config", tmp_path / "no-model.yaml", "--text", text, fp, w8,
                 other)
    assert result.exit_code == 2
    assert result.stderr == (
        f"error: {other}: not the model of the baseline {fp}, as it is or quantized: "
        "mismatched 2: lm_head.weight (200, 64) (baseline (100, 64)), "
        "model.tok_embeddings.embedding_weight (200, 64) (baseline (100, 64))\n")


def _header(path: Path) -> List[TensorInfo]:
    with open_reader(path, verify_crc=False) as reader:
        return list(reader.tensors)
