"""W4A16 per-group RTN and the PTQ-named W8A16 scheme (Golden Stick v1.0+ layout)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, ops

from ckpt_rtn import __version__
from ckpt_rtn.numerics import FloatFormat, to_storage, to_work
from ckpt_rtn.rtn import RtnSpec, dequantize_rtn, quantize_rtn
from ckpt_rtn.packing import pack_int4, transposed, unpack_int4
from ckpt_rtn.schemes import get_scheme

from conftest import cli, llama_weights, ms_bytes, ms_load, ms_save

W4_G128 = RtnSpec(bits=4, group_size=128, float64_scale=True)


def ms_reference_w4(w16: np.ndarray, group: int):
    """Per-group int4 RTN with MindSpore ops: scale = (a - (-a)) / 15 in float64, the
    division in fp16, round half to even, clip to [-8, 7]; then the PTQ layout, packed
    with plain loops."""
    out_channels, in_channels = w16.shape
    weight = Tensor(w16.reshape(-1, group))
    wf = ops.cast(weight, ms.float32)
    a = ops.cast(ops.maximum(ops.abs(ops.amax(wf, axis=1)), ops.abs(ops.amin(wf, axis=1))),
                 ms.float64)
    scale = ops.cast(ops.div(ops.sub(a, ops.neg(a)), 15.0), ms.float16)
    q = ops.clip_by_value(ops.round(ops.cast(ops.div(weight, ops.expand_dims(scale, 1)),
                                             ms.float32)), -8.0, 7.0)
    zero = ops.broadcast_to(ops.expand_dims(ops.equal(ops.cast(scale, ms.float32), 0.0), 1), q.shape)
    q = ops.select(zero, ops.zeros_like(q), q)  # zero groups: q = 0, as documented
    q = ops.cast(q, ms.int8).asnumpy().reshape(out_channels, in_channels)
    scale = scale.asnumpy().reshape(out_channels, -1)
    packed = np.zeros((in_channels, out_channels // 2), np.uint8)
    for k in range(in_channels):           # [in, out]; out pairs share a byte, even index low
        for j in range(out_channels // 2):
            packed[k, j] = (int(q[2 * j, k]) & 0xF) | ((int(q[2 * j + 1, k]) & 0xF) << 4)
    return q, scale.T.copy(), packed


def test_w4_matches_mindspore_ops_and_packs_like_golden_stick() -> None:
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((16, 256)) * rng.uniform(0.01, 1, (16, 1))).astype(np.float16)
    w[3, :128] = 0  # a zero group
    scheme = get_scheme("w4a16", 128)
    packed, scale, zp = scheme.quantize(w, FloatFormat.FLOAT16, pool=None, stats=False).arrays
    q_ref, scale_ref, packed_ref = ms_reference_w4(w, 128)
    assert packed.dtype == np.int8 and packed.shape == (256, 8)
    np.testing.assert_array_equal(packed.view(np.uint8), packed_ref)
    np.testing.assert_array_equal(scale, scale_ref)
    assert scale.shape == zp.shape == (2, 16) and not zp.any()
    np.testing.assert_array_equal(unpack_int4(packed).T, q_ref)


def test_pack_unpack_round_trip_and_nibble_order() -> None:
    codes = np.random.default_rng(0).integers(-8, 8, (5, 12)).astype(np.int8)
    np.testing.assert_array_equal(unpack_int4(pack_int4(codes)), codes)
    assert pack_int4(np.array([[1, 2, 3, 4]], np.int8)).view(np.uint8).tolist() == [[0x21, 0x43]]
    assert pack_int4(np.array([[-1, -8]], np.int8)).view(np.uint8).tolist() == [[0x8F]]


@pytest.mark.parametrize("fmt", [FloatFormat.FLOAT16, FloatFormat.BFLOAT16])
def test_per_group_error_bound_and_dequantization(fmt: FloatFormat) -> None:
    rng = np.random.default_rng(9)
    w = to_storage((rng.standard_normal((64, 512)) * 0.05).astype(np.float32), fmt)
    result = quantize_rtn(w, fmt, W4_G128, stats=True)
    assert result.scale.shape == (64, 4) and result.q.min() >= -8 and result.q.max() <= 7
    wf = to_work(w, fmt).astype(np.float64)
    s = np.repeat(to_work(result.scale, fmt).astype(np.float64), 128, axis=1)
    error = np.abs(dequantize_rtn(result, fmt).astype(np.float64) - wf)
    # half a step, plus the rounding of w/s to the weight's precision (see test_rtn)
    assert (error <= {FloatFormat.FLOAT16: 0.5 + 2**-7, FloatFormat.BFLOAT16: 0.5 + 2**-4}[fmt]
            * s + 1e-12).all()
    quotient = to_work(to_storage((wf / s).astype(fmt.work), fmt), fmt)
    inside = (quotient > -8.5) & (quotient < 7.5)
    assert (np.abs(result.q - quotient)[inside] <= 0.5).all()
    assert result.stats is not None and result.stats.max_abs == pytest.approx(error.max(), rel=1e-5)


def test_convert_w4a16_loads_in_mindspore(tmp_path: Path) -> None:
    weights = llama_weights(layers=1, hidden=256, kv=128, ffn=512, vocab=64)
    ms_save(tmp_path / "in.ckpt", weights, ms_dtype=ms.float16)
    for name in ("w4.ckpt", "w4.safetensors"):
        result = cli("convert", tmp_path / "in.ckpt", tmp_path / name, "--scheme", "w4a16")
        assert result.exit_code == 0, result.stderr
        loaded = ms_load(tmp_path / name)
        p = "model.layers.0.feed_forward.w1"
        assert str(loaded[p + "._layer.weight"].dtype) == "Int4"
        assert tuple(loaded[p + "._layer.weight"].shape) == (256, 256)  # [in, out / 2]
        assert tuple(loaded[p + "._layer.matmul.weight_scale"].shape) == (2, 512)  # [in/g, out]
        assert str(loaded[p + "._layer.matmul.weight_zp"].dtype) == "Float16"
        w = weights[p + ".weight"].astype(np.float16)
        _, scale_ref, packed_ref = ms_reference_w4(w, 128)
        assert ms_bytes(loaded[p + "._layer.weight"]) == packed_ref.tobytes()
        assert ms_bytes(loaded[p + "._layer.matmul.weight_scale"]) == scale_ref.tobytes()
        assert "lm_head.weight" in loaded and "model.tok_embeddings.embedding_weight" in loaded


def test_w4a16_size_target(tmp_path: Path) -> None:
    """int4 g128 Linear weights take at most 0.3x their FP16 bytes."""
    weights = llama_weights(layers=1, hidden=512, kv=256, ffn=1024, vocab=64)
    ms_save(tmp_path / "in.ckpt", weights, ms_dtype=ms.float16)
    assert cli("convert", tmp_path / "in.ckpt", tmp_path / "w4.ckpt", "--scheme", "w4a16",
               "-q").exit_code == 0
    loaded = ms_load(tmp_path / "w4.ckpt")
    fp16 = sum(v.size * 2 for k, v in weights.items() if "layers" in k and v.ndim == 2)
    w4 = sum(len(ms_bytes(v)) for k, v in loaded.items() if "._layer." in k)
    assert w4 <= 0.3 * fp16, (w4, fp16)


def test_w8a16_ptq_names_and_float64_scale(tmp_path: Path) -> None:
    weights = llama_weights(layers=1)
    ms_save(tmp_path / "in.ckpt", weights, ms_dtype=ms.float16)
    assert cli("convert", tmp_path / "in.ckpt", tmp_path / "ptq.ckpt", "--scheme", "w8a16-ptq",
               "-q").exit_code == 0
    loaded = ms_load(tmp_path / "ptq.ckpt")
    p = "model.layers.0.attention.wq"
    assert str(loaded[p + "._layer.weight"].dtype) == "Int8"
    assert tuple(loaded[p + "._layer.weight"].shape) == (64, 64)
    assert tuple(loaded[p + "._layer.matmul.weight_scale"].shape) == (64,)
    w = weights[p + ".weight"].astype(np.float16)
    a = np.abs(w.astype(np.float64)).max(axis=1)
    assert ms_bytes(loaded[p + "._layer.matmul.weight_scale"]) == (a / 7.5 * 15 / 255) \
        .astype(np.float16).tobytes()


def test_group_size_must_divide_the_input_channels(tmp_path: Path) -> None:
    weights = llama_weights(layers=1, hidden=192, kv=64, ffn=384, vocab=32)  # 192 % 128 != 0
    ms_save(tmp_path / "in.ckpt", weights, ms_dtype=ms.float16)
    result = cli("convert", tmp_path / "in.ckpt", tmp_path / "w4.ckpt", "--scheme", "w4a16")
    assert result.exit_code == 2
    assert "model.layers.0.attention.wq.weight' [192, 192]: 192 input channels do not split" \
        in result.stderr
    assert not (tmp_path / "w4.ckpt").exists()
    ok = cli("convert", tmp_path / "in.ckpt", tmp_path / "w4.ckpt", "--scheme", "w4a16",
             "--group-size", "64", "-q")
    assert ok.exit_code == 0, ok.stderr
    bad = cli("convert", tmp_path / "in.ckpt", tmp_path / "x.ckpt", "--group-size", "64")
    assert bad.exit_code == 2
    assert "--group-size applies to --scheme w4a16 and w4a8-dynamic only" in bad.stderr


def test_asymmetric_w4a16_stores_zero_points_in_the_ptq_layout(tmp_path: Path) -> None:
    """--asymmetric keeps every name, shape and dtype; weight_zp [in/g, out] holds -zp,
    and (q + weight_zp) * weight_scale is closer to the weights than the symmetric file."""
    weights = llama_weights(layers=1, hidden=128, kv=64, ffn=256, vocab=32)
    for w in weights.values():
        w += 0.05  # every row skewed: asymmetric ranges pay off
    ms_save(tmp_path / "in.ckpt", weights, ms_dtype=ms.float16)
    outputs = {}
    for name, extra in (("sym", []), ("asym", ["--asymmetric"])):
        report = tmp_path / f"{name}.json"
        result = cli("convert", tmp_path / "in.ckpt", tmp_path / f"{name}.ckpt", "--scheme",
                     "w4a16", "--group-size", "64", "--report", report, *extra, "-q")
        assert result.exit_code == 0, result.stderr
        assert json.loads(report.read_text())["symmetric"] == (name == "sym")
        outputs[name] = ms_load(tmp_path / f"{name}.ckpt")
    p = "model.layers.0.feed_forward.w2"
    sym, asym = outputs["sym"], outputs["asym"]
    assert set(sym) == set(asym)
    for key in set(sym) - {"ckpt_rtn_settings"}:  # the settings record: a str
        assert (sym[key].dtype, sym[key].shape) == (asym[key].dtype, asym[key].shape), key
    zp = asym[p + "._layer.matmul.weight_zp"].asnumpy()
    assert zp.shape == (4, 128) and zp.any() and (zp == np.round(zp)).all()
    w = weights[p + ".weight"].astype(np.float16).astype(np.float32)
    errors = {}
    for name, loaded in outputs.items():
        q = unpack_int4(np.frombuffer(ms_bytes(loaded[p + "._layer.weight"]), np.int8)
                        .reshape(256, 64)).T.astype(np.float32)
        scale = np.repeat(loaded[p + "._layer.matmul.weight_scale"].asnumpy().T, 64, axis=1)
        offset = np.repeat(loaded[p + "._layer.matmul.weight_zp"].asnumpy().T, 64, axis=1)
        errors[name] = np.abs((q + offset) * scale - w).mean()
        assert (np.abs((q + offset) * scale - w) <= 0.51 * scale).all()
    assert errors["asym"] < 0.8 * errors["sym"], errors


def test_asymmetric_needs_a_ptq_scheme(tmp_path: Path) -> None:
    ms_save(tmp_path / "in.ckpt", llama_weights(layers=1), ms_dtype=ms.float16)
    result = cli("convert", tmp_path / "in.ckpt", tmp_path / "out.ckpt", "--asymmetric")
    assert result.exit_code == 2 and "--asymmetric needs a PTQ scheme" in result.stderr
    assert not (tmp_path / "out.ckpt").exists()
    assert get_scheme("w4a16", 64, symmetric=False).label == "w4a16 g64 asymmetric"


def test_tiled_transpose_and_packing_along_rows() -> None:
    rng = np.random.default_rng(9)
    for shape in ((1, 1), (3, 700), (513, 257), (256, 512)):
        m = rng.integers(-128, 128, shape).astype(np.int8)
        t = transposed(m)
        assert t.flags.c_contiguous
        np.testing.assert_array_equal(t, m.T)
    codes = rng.integers(-8, 8, (6, 10)).astype(np.int8)
    np.testing.assert_array_equal(pack_int4(codes, axis=0).T, pack_int4(codes.T))


@pytest.mark.parametrize("args,label", [
    ((), "w8a16"), (("--scheme", "w8a16-ptq"), "w8a16-ptq"),
    (("--scheme", "w8a16-ptq", "--asymmetric"), "w8a16-ptq asymmetric"),
    (("--scheme", "w4a16", "--group-size", "64", "--asymmetric"), "w4a16 g64 asymmetric")])
def test_inspect_names_the_scheme(tmp_path: Path, args, label: str) -> None:
    weights = llama_weights(layers=1, hidden=128, kv=64, ffn=256, vocab=32)
    ms_save(tmp_path / "in.ckpt", weights, ms_dtype=ms.float16)
    assert cli("convert", tmp_path / "in.ckpt", tmp_path / "out.ckpt", *args, "-q").exit_code == 0
    result = cli("inspect", tmp_path / "out.ckpt")
    assert result.stdout.splitlines()[-2:] == [
        f"quantized: {label}, 7 Linear layers",
        f"written by ckpt-rtn {__version__}: {label}, llama2 rules, blacklist lm_head"]
    assert "written by" not in cli("inspect", tmp_path / "in.ckpt").stdout
    assert "quantized:" not in cli("inspect", tmp_path / "in.ckpt").stdout
