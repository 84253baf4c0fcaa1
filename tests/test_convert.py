"""End to end: MindSpore-saved Llama checkpoints -> ckpt-rtn convert -> mindspore.load_checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np
import pytest
from click.testing import CliRunner

import mindspore as ms

from ckpt_rtn import converter
from ckpt_rtn.cli import main
from ckpt_rtn.numerics import FloatFormat
from ckpt_rtn.rules import load_rules
from ckpt_rtn.settings import NAME as SETTINGS, Settings

from conftest import llama_weights, ms_bytes, ms_load, ms_save
from test_rtn import golden_stick_reference

LINEARS = ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def run(*args: str) -> None:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output


def assert_same_tensors(a_path: Path, b_path: Path) -> None:
    """MindSpore loads the same names and bytes from both files (the .ckpt settings record,
    which MindSpore returns as a str, aside)."""
    a, b = ms_load(a_path), ms_load(b_path)
    a.pop(SETTINGS, None), b.pop(SETTINGS, None)
    assert a.keys() == b.keys()
    for name in a:
        assert ms_bytes(a[name]) == ms_bytes(b[name]), name


def expected_names(weights: Dict[str, np.ndarray]) -> Dict[str, str]:
    """Golden Stick's output tensor set: name -> dtype name (for an fp16 model)."""
    out = {}
    for name in weights:
        layer = name[:-len(".weight")]
        if any(layer.endswith(l) for l in LINEARS):
            out[layer + "._handler.weight"] = "Int8"
            out[layer + "._weight_quantizer.scale"] = "Float16"
            out[layer + "._weight_quantizer.zp_neg"] = "Float16"
        else:
            out[name] = "Float16"
    return out


@pytest.fixture(scope="module")
def fp16_llama(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("llama")
    weights = llama_weights()
    ms_save(root / "llama.ckpt", weights, ms_dtype=ms.float16)
    return root, {k: v.astype(np.float16) for k, v in weights.items()}


@pytest.mark.parametrize("out_name", ["w8a16.ckpt", "w8a16.safetensors"])
def test_mindspore_llama_converts_to_golden_stick_tensor_set(fp16_llama, tmp_path: Path,
                                                             out_name: str) -> None:
    root, weights = fp16_llama
    out = tmp_path / out_name
    run("convert", str(root / "llama.ckpt"), str(out), "-q")
    loaded = ms_load(out)
    if out_name.endswith(".ckpt"):  # the settings record comes back as a str
        assert Settings.from_json(loaded.pop(SETTINGS), out).summary.endswith(
            "w8a16, llama2 rules, blacklist lm_head")
    assert {k: str(v.dtype) for k, v in loaded.items()} == expected_names(weights)
    for name, w in weights.items():
        layer = name[:-len(".weight")]
        if any(layer.endswith(l) for l in LINEARS):
            q = loaded[layer + "._handler.weight"]
            scale = loaded[layer + "._weight_quantizer.scale"]
            zp = loaded[layer + "._weight_quantizer.zp_neg"]
            assert tuple(q.shape) == w.shape and tuple(scale.shape) == tuple(zp.shape) == w.shape[:1]
            q_ref, scale_ref = golden_stick_reference(w, FloatFormat.FLOAT16)
            np.testing.assert_array_equal(q.asnumpy(), q_ref)
            assert ms_bytes(scale) == scale_ref.tobytes()
            assert not zp.asnumpy().any()
        else:  # embeddings, norms, blacklisted lm_head: bit for bit
            assert ms_bytes(loaded[name]) == w.tobytes(), name


def test_ckpt_and_safetensors_outputs_hold_the_same_tensors(fp16_llama, tmp_path: Path) -> None:
    root, _ = fp16_llama
    run("convert", str(root / "llama.ckpt"), str(tmp_path / "a.ckpt"), "-q")
    run("convert", str(root / "llama.ckpt"), str(tmp_path / "b.safetensors"), "-q")
    run("convert", str(root / "llama.ckpt"), str(tmp_path / "c.ckpt"), "-q")
    assert_same_tensors(tmp_path / "a.ckpt", tmp_path / "b.safetensors")
    assert (tmp_path / "a.ckpt").read_bytes() == (tmp_path / "c.ckpt").read_bytes()


def test_safetensors_input_and_mixed_formats(fp16_llama, tmp_path: Path) -> None:
    root, weights = fp16_llama
    ms_save(tmp_path / "llama.safetensors", weights)
    run("convert", str(tmp_path / "llama.safetensors"), str(tmp_path / "from_st.ckpt"), "-q")
    run("convert", str(root / "llama.ckpt"), str(tmp_path / "from_ckpt.ckpt"), "-q")
    assert_same_tensors(tmp_path / "from_st.ckpt", tmp_path / "from_ckpt.ckpt")


@pytest.mark.parametrize("ms_dtype,fmt,scale_dtype", [
    (ms.bfloat16, FloatFormat.BFLOAT16, "BFloat16"),
    (ms.float32, FloatFormat.FLOAT32, "Float32"),
])
def test_bf16_and_fp32_models_keep_their_scale_dtype(tmp_path: Path, ms_dtype, fmt,
                                                     scale_dtype: str) -> None:
    weights = llama_weights(layers=1)
    ms_save(tmp_path / "in.ckpt", weights, ms_dtype=ms_dtype)
    run("convert", str(tmp_path / "in.ckpt"), str(tmp_path / "out.ckpt"), "-q", "--crc")
    loaded = ms_load(tmp_path / "out.ckpt", crc_check=True)
    source = ms_load(tmp_path / "in.ckpt")
    scale = loaded["model.layers.0.attention.wq._weight_quantizer.scale"]
    assert str(scale.dtype) == scale_dtype
    raw = np.frombuffer(ms_bytes(source["model.layers.0.attention.wq.weight"]), fmt.storage)
    q_ref, scale_ref = golden_stick_reference(raw.reshape(64, 64), fmt)
    np.testing.assert_array_equal(loaded["model.layers.0.attention.wq._handler.weight"].asnumpy(),
                                  q_ref)
    assert ms_bytes(scale) == scale_ref.tobytes()


def test_fused_qkv_and_gate_hidden_are_quantized(tmp_path: Path) -> None:
    weights = llama_weights(layers=1, qkv_concat=True)
    ms_save(tmp_path / "in.ckpt", weights, ms_dtype=ms.float16)
    run("convert", str(tmp_path / "in.ckpt"), str(tmp_path / "out.ckpt"), "-q")
    loaded = ms_load(tmp_path / "out.ckpt")
    assert tuple(loaded["model.layers.0.attention.w_qkv._handler.weight"].shape) == (128, 64)
    assert tuple(loaded["model.layers.0.feed_forward.w_gate_hidden._weight_quantizer.scale"]
                 .shape) == (256,)


def test_bias_of_a_quantized_linear_moves_under_handler(tmp_path: Path) -> None:
    weights = llama_weights(layers=1)
    weights["model.layers.0.attention.wq.bias"] = np.arange(64, dtype=np.float32)
    ms_save(tmp_path / "in.ckpt", weights, ms_dtype=ms.float16)
    run("convert", str(tmp_path / "in.ckpt"), str(tmp_path / "out.ckpt"), "-q")
    loaded = ms_load(tmp_path / "out.ckpt")
    assert "model.layers.0.attention.wq.bias" not in loaded
    bias = loaded["model.layers.0.attention.wq._handler.bias"]
    assert bias.asnumpy().tolist() == list(range(64))


def test_blacklist_is_golden_stick_substring_match(tmp_path: Path) -> None:
    weights = llama_weights(layers=12, hidden=8, kv=8, ffn=16, vocab=10)
    ms_save(tmp_path / "in.ckpt", weights, ms_dtype=ms.float16)
    rules = load_rules("llama2").with_overrides(blacklist=["layers.1"])
    with converter.formats.open_reader(tmp_path / "in.ckpt") as reader:
        plan = converter.make_plan(reader, rules, "ckpt")
    quantized_layers = {s.layer.split(".")[2] for s in plan.quantized}
    assert quantized_layers == {"0", "2", "3", "4", "5", "6", "7", "8", "9"}  # 1, 10, 11 skipped
    everything = load_rules("llama2").with_overrides(keep_default_blacklist=False)
    with converter.formats.open_reader(tmp_path / "in.ckpt") as reader:
        plan = converter.make_plan(reader, everything, "ckpt")
    assert "lm_head" in {s.layer for s in plan.quantized}


def test_safetensors_metadata_is_kept_but_stale_crc_dropped(fp16_llama, tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.numpy import save_file
    _, weights = fp16_llama
    save_file(weights, str(tmp_path / "in.safetensors"),
              metadata={"crc_num": "123", "remove_redundancy": "False"})
    # 123 is not the content's CRC: only --no-verify-crc reads the file
    run("convert", str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors"), "-q",
        "--no-verify-crc")
    with safe_open(str(tmp_path / "out.safetensors"), framework="numpy") as f:
        metadata = f.metadata()
    assert Settings.from_json(metadata.pop(SETTINGS), "metadata").format == "safetensors"
    assert metadata == {"format": "ms", "remove_redundancy": "False"}


@pytest.mark.parametrize("suffix", ["ckpt", "safetensors"])
def test_output_is_byte_identical_for_any_number_of_workers(tmp_path: Path, suffix: str) -> None:
    """Workers share rows and, from 2 on, several threads write tensors at their planned
    offsets (converter.writer_threads): 2 and 5 workers write with 2 threads, 8 with 4, in
    any order. The writes go around the page cache where the filesystem allows it
    (formats/direct.py); --page-cache writes the same bytes through it."""
    weights = llama_weights(layers=2, hidden=512, kv=128, ffn=1024, vocab=300)
    ms_save(tmp_path / "in.ckpt", weights, ms_dtype=ms.float16)
    outputs = []
    for workers, *more in ((1,), (2,), (5,), (8,), (2, "--page-cache"), (8, "--page-cache")):
        out = tmp_path / f"out{workers}{''.join(more)}.{suffix}"
        run("convert", str(tmp_path / "in.ckpt"), str(out), "-q", "--crc", "--workers",
            str(workers), *more)
        outputs.append(out.read_bytes())
    assert all(output == outputs[0] for output in outputs)
    if suffix == "ckpt":  # the CRC chained from per-tensor pieces is MindSpore's
        assert ms_load(tmp_path / "out8.ckpt", crc_check=True)


def test_a_conversion_leaves_no_thread_behind(fp16_llama, tmp_path: Path) -> None:
    """convert loads the kernels in a thread of its own (converter.warm_up) beside the
    pipeline's; none outlives it, on success or when a weight is refused mid-pipeline."""
    import threading
    from ckpt_rtn.errors import QuantizationError
    root, weights = fp16_llama
    broken = dict(weights)
    name = next(n for n in weights if "feed_forward.w2" in n)
    broken[name] = weights[name].copy()
    broken[name][3, 5] = np.nan
    ms_save(tmp_path / "nan.ckpt", broken, ms_dtype=ms.float16)
    converter.convert(root / "llama.ckpt", tmp_path / "out.ckpt")
    with pytest.raises(QuantizationError, match="inf or NaN"):
        converter.convert(tmp_path / "nan.ckpt", tmp_path / "nan_out.ckpt")
    assert not [t for t in threading.enumerate() if t.name.startswith("ckpt-rtn")]
    assert not (tmp_path / "nan_out.ckpt").exists()


@pytest.mark.parametrize("suffix,crc", [("ckpt", False), ("safetensors", True), ("ckpt", True)])
def test_copies_go_first_where_the_reader_takes_any_order(fp16_llama, tmp_path: Path,
                                                          suffix: str, crc: bool) -> None:
    """convert streams the tensors only copied before the weights (they are written while
    the kernels load), except from a .ckpt whose CRC is checked as it is read, in file order:
    reading out of it would read the file twice."""
    from ckpt_rtn import formats
    from ckpt_rtn.options import ConvertOptions
    _, weights = fp16_llama
    src = tmp_path / f"in.{suffix}"
    ms_save(src, weights, ms_dtype=ms.float16, crc_check=crc)
    with formats.open_reader(src, defer_crc=True) as reader:
        plan = converter.make_plan(reader, converter.resolve_rules(ConvertOptions().rules,
                                                                   reader), "ckpt")
        in_any_order = reader.any_order
        seen = []
        converter.stream(reader, plan, lambda info, array: seen.append(info.name),
                         copies_first=True)
    assert in_any_order is not (suffix == "ckpt" and crc)
    planned = [info.name for info in plan.outputs]
    copied = {out.name for step in plan.steps if not step.quantized for out in step.outputs}
    if in_any_order:
        assert set(seen[:len(copied)]) == copied
        assert sorted(seen) == sorted(planned)
    else:
        assert seen == planned


def test_the_wait_for_the_kernels_is_not_counted_as_quantizing(
        fp16_llama, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first weight waits for the kernels to load: that is numba's set-up, reported as
    `kernels_s`, not quantizing."""
    import json
    import time
    warm_up = converter.warm_up

    def slow(plan: converter.Plan, stats: bool) -> None:
        time.sleep(1.0)
        warm_up(plan, stats)

    monkeypatch.setattr(converter, "warm_up", slow)
    root, _ = fp16_llama
    report = tmp_path / "report.json"
    result = CliRunner().invoke(main, ["convert", str(root / "llama.ckpt"),
                                       str(tmp_path / "out.ckpt"), "--report", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    stages = data["stages"]
    assert stages["kernels_s"] >= 0.5  # less the copies, which go first and take milliseconds
    assert stages["quantize_s"] < data["seconds"] - stages["kernels_s"]


def test_the_copies_do_not_wait_for_the_kernels(fp16_llama, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The tensors only copied are written while the kernels load; only weights wait."""
    import time
    from ckpt_rtn import formats, pipeline
    from ckpt_rtn.options import ConvertOptions
    # Each tensor travels alone, as a real model's copied tensors (hundreds of MB) do: a batch
    # is processed whole, so a copy batched with a weight goes when the weight does.
    monkeypatch.setattr(pipeline, "BATCH_BYTES", 1)
    warm_up = converter.warm_up
    loaded = []

    def slow(plan: converter.Plan, stats: bool) -> None:
        time.sleep(1.0)
        warm_up(plan, stats)
        loaded.append(time.perf_counter())

    monkeypatch.setattr(converter, "warm_up", slow)
    root, _ = fp16_llama
    written: Dict[str, float] = {}
    with formats.open_reader(root / "llama.ckpt") as reader:
        plan = converter.make_plan(reader, converter.resolve_rules(ConvertOptions().rules,
                                                                   reader), "ckpt")
        in_any_order = reader.any_order
        converter.stream(reader, plan,
                         lambda info, array: written.setdefault(info.name, time.perf_counter()),
                         copies_first=True)
    copied = [out.name for step in plan.steps if not step.quantized for out in step.outputs]
    quantized = [out.name for step in plan.quantized for out in step.outputs]
    assert copied and quantized and in_any_order
    assert all(written[name] < loaded[0] for name in copied)
    assert all(written[name] > loaded[0] for name in quantized)


def test_report_has_sizes_counts_and_layer_errors(fp16_llama, tmp_path: Path) -> None:
    import json
    root, weights = fp16_llama
    out, report = tmp_path / "out.ckpt", tmp_path / "report.json"
    result = CliRunner().invoke(main, ["convert", str(root / "llama.ckpt"), str(out),
                                       "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "dequantization error" in result.output and "GB/s" in result.output
    data = json.loads(report.read_text())
    assert data["input_bytes"] == (root / "llama.ckpt").stat().st_size
    assert data["output_bytes"] == out.stat().st_size
    assert data["tensors_quantized"] == 14 and data["tensors_copied"] == 7
    assert len(data["layers"]) == 14
    stages = data["stages"]  # busy seconds per stage, which overlap: each within the wall time
    assert set(stages) == {"read_s", "quantize_s", "write_s", "kernels_s"}
    assert all(0 <= stages[key] <= data["seconds"] for key in stages)
    assert stages["quantize_s"] > 0  # 14 weights are quantized: that takes measurable time
    wq = next(l for l in data["layers"] if l["layer"] == "model.layers.0.attention.wq")
    w = weights["model.layers.0.attention.wq.weight"].astype(np.float64)
    loaded = ms_load(out)
    q = loaded["model.layers.0.attention.wq._handler.weight"].asnumpy().astype(np.float64)
    scale = loaded["model.layers.0.attention.wq._weight_quantizer.scale"].asnumpy()
    error = np.abs(q * scale.astype(np.float64)[:, None] - w)
    assert wq["max_abs_error"] == pytest.approx(error.max(), rel=1e-4)
    assert wq["mean_abs_error"] == pytest.approx(error.mean(), rel=1e-4)
    assert 0 < wq["relative_error"] < 0.02
