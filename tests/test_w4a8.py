"""--scheme w4a8-dynamic: MindFormers' A8W4 layout for routed experts, w8a8-dynamic elsewhere.

The layout (schemes.py, Scheme.mcore_int4 has the sources): a routed expert's
`<p>.weight` int8 [out/2, in] (output rows 2j, 2j+1 in one byte, 2j in the low
nibble) and `<p>.weight_scale` int64 [out, in/group] (float32 bits), every other
selected layer w8a8-dynamic's, with quant_model_description.json giving experts
W4A8_DYNAMIC and a top-level group_size. The last test loads a converted tiny
DeepSeek-V3 with MindFormers' own Mcore network and loader, on CPU.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Dict

import numpy as np
import pytest

from ckpt_rtn import dtypes
from ckpt_rtn.description import FLOAT, GROUP_SIZE, NAME, W4A8_DYNAMIC, W8A8_DYNAMIC
from ckpt_rtn.formats import open_reader
from ckpt_rtn.numerics import FloatFormat, bf16_to_float32, to_work
from ckpt_rtn.rtn import RtnSpec, quantize_rtn
from ckpt_rtn.packing import unpack_int4
from ckpt_rtn.schemes import detect_scheme, get_scheme

from conftest import cli, mcore_load
from test_hf_families import Model, arrays_of, write_safetensors
from test_w8a8 import SLACK, weight

SCHEME = get_scheme("w4a8-dynamic")
EXPERT = "model.layers.1.mlp.experts.3.down_proj"
H, FFN, EXPERTS = 256, 256, 4


def codes_of(packed: np.ndarray) -> np.ndarray:
    """[out/2, in] bytes back to [out, in] codes, low nibble first (as a8dynw4.py unpacks
    them after the loader's transpose)."""
    return unpack_int4(np.ascontiguousarray(packed.T)).T


def scales_of(bits: np.ndarray) -> np.ndarray:
    """a8dynw4.py's `.astype(np.uint32).view(np.float32)`."""
    return bits.astype(np.uint32).view(np.float32)


def within_a_step(codes: np.ndarray, scale: np.ndarray, original: np.ndarray,
                  fmt: FloatFormat) -> bool:
    """|q*s - w| <= (1/2 + SLACK) * s for every weight, s its group's scale."""
    s = np.repeat(scale.astype(np.float64), codes.shape[1] // scale.shape[1], axis=1)
    return bool(np.all(np.abs(codes * s - original) <= (0.5 + SLACK[fmt]) * s * (1 + 1e-9)))


@pytest.mark.parametrize("fmt", [FloatFormat.BFLOAT16, FloatFormat.FLOAT16, FloatFormat.FLOAT32])
def test_expert_codes_and_scale_are_golden_sticks_w4(fmt: FloatFormat) -> None:
    """A routed expert's codes and scales are w4a16's (Golden Stick's PTQ int4: [-8, 7],
    2*max|w|/15 per group of 128, float64), stored untransposed, the scale's float32 bits
    in an int64; they dequantize to within half a step."""
    experts = SCHEME.for_layer(EXPERT)
    dtype = {FloatFormat.FLOAT16: dtypes.FLOAT16, FloatFormat.BFLOAT16: dtypes.BFLOAT16,
             FloatFormat.FLOAT32: dtypes.FLOAT32}[fmt]
    infos = experts.outputs(EXPERT, dtype, 48, 256)
    assert [(i.name, i.dtype, i.shape) for i in infos] == [
        (f"{EXPERT}.weight", dtypes.INT8, (24, 256)),
        (f"{EXPERT}.weight_scale", dtypes.INT64, (48, 2))]
    w = weight(fmt, (48, 256))
    packed, bits = experts.quantize(w, fmt, pool=None, stats=False).arrays
    assert (packed.dtype, packed.shape, bits.dtype, bits.shape) == (
        np.int8, (24, 256), np.int64, (48, 2))
    reference = quantize_rtn(w, fmt, RtnSpec(bits=4, group_size=128, float64_scale=True))
    raw = packed.view(np.uint8)
    assert np.array_equal(raw & 0x0F, reference.q[0::2].view(np.uint8) & 0x0F)  # 2j: low
    assert np.array_equal(raw >> 4, reference.q[1::2].view(np.uint8) & 0x0F)
    assert np.array_equal(codes_of(packed), reference.q)
    assert bits.min() >= 0 and bits.max() < 2 ** 32
    scale = scales_of(bits)
    assert np.array_equal(scale, to_work(reference.scale, fmt).astype(np.float32))
    assert within_a_step(reference.q, scale, to_work(w, fmt), fmt)
    assert not reference.q[3].any() and not scale[3].any()  # weight()'s all-zero row
    assert reference.q.min() == -8 or reference.q.max() == 7


def test_only_routed_experts_take_int4() -> None:
    """Shared experts, dense MLPs and attention are plain Linear layers in MindFormers,
    where A8W4 raises ("only support for MOE"): they stay w8a8-dynamic."""
    for layer in ("model.layers.1.mlp.experts.0.gate_proj", "model.layers.1.mlp.experts.17.up_proj",
                  EXPERT):
        assert SCHEME.for_layer(layer).mcore_int4, layer
    for layer in ("model.layers.1.mlp.shared_experts.gate_proj",
                  "model.layers.1.mlp.shared_expert.down_proj", "model.layers.0.mlp.up_proj",
                  "model.layers.1.self_attn.kv_b_proj", "model.layers.1.self_attn.q_proj"):
        chosen = SCHEME.for_layer(layer)
        assert chosen is SCHEME and not chosen.packs_int4, layer
    assert (SCHEME.label, SCHEME.group_size) == ("w4a8-dynamic g128", 128)
    assert get_scheme("w4a8-dynamic", 64).for_layer(EXPERT).spec.group_size == 64


def test_options_it_refuses() -> None:
    with pytest.raises(ValueError, match="no zero point"):
        get_scheme("w4a8-dynamic", symmetric=False)
    with pytest.raises(ValueError, match="one of"):
        get_scheme("w4a8-dynamic", 32)
    assert SCHEME.for_layer(EXPERT).check(48, 128) is not None  # one group of 128 only
    assert SCHEME.for_layer(EXPERT).check(47, 256) is not None  # odd rows: no pairs


def deepseek_v3() -> Model:
    """DeepSeek-V3's Hugging Face names (test_hf_families' MLA and MoE, hidden 256 so that
    every expert's input splits into groups of 128): layer 0 dense, layer 1 with a router
    (and its correction bias), 4 routed experts and 1 shared expert, head untied."""
    m = Model("hf-moe")
    m.keep("model.embed_tokens.weight", 128, H)
    for i in range(2):
        p = f"model.layers.{i}."
        m.keep(p + "input_layernorm.weight", H)
        m.linear(p + "self_attn.q_a_proj", 48, H)
        m.keep(p + "self_attn.q_a_layernorm.weight", 48)
        m.linear(p + "self_attn.q_b_proj", 4 * (16 + 8), 48)
        m.linear(p + "self_attn.kv_a_proj_with_mqa", 32 + 8, H)
        m.keep(p + "self_attn.kv_a_layernorm.weight", 32)
        m.linear(p + "self_attn.kv_b_proj", 4 * (16 + 16), 32, kept=True)
        m.linear(p + "self_attn.o_proj", H, 4 * 16)
        m.keep(p + "post_attention_layernorm.weight", H)
        mlps = [p + "mlp."] if i == 0 else [p + "mlp.shared_experts."] + [
            f"{p}mlp.experts.{e}." for e in range(EXPERTS)]
        if i:
            m.keep(p + "mlp.gate.weight", EXPERTS, H)
            m.keep(p + "mlp.gate.e_score_correction_bias", EXPERTS, dtype=dtypes.FLOAT32)
        for mlp in mlps:
            m.linear(mlp + "gate_proj", FFN, H)
            m.linear(mlp + "up_proj", FFN, H)
            m.linear(mlp + "down_proj", H, FFN)
    m.keep("model.norm.weight", H)
    m.keep("lm_head.weight", 128, H)
    return m


def converted(tmp_path: Path, *options: str):
    model = deepseek_v3()
    arrays = arrays_of(model)
    src = tmp_path / "model.safetensors"
    write_safetensors(src, model, arrays)
    out = tmp_path / "deepseek-w4a8"
    out.mkdir()
    result = cli("convert", src, out / "model.safetensors", "--scheme", "w4a8-dynamic", *options)
    assert result.exit_code == 0, result.stderr
    with open_reader(out / "model.safetensors") as reader:
        written = {t.name: reader.read(t) for t in reader.tensors}
        infos = list(reader.tensors)
    return model, arrays, src, out, written, infos, result


def test_converts_and_describes(tmp_path: Path) -> None:
    """Routed experts W4A8_DYNAMIC, other Linear layers W8A8_DYNAMIC, the rest FLOAT and
    unchanged; group_size at the top; detected as w4a8-dynamic; verify checks it."""
    model, arrays, src, out, written, infos, result = converted(tmp_path)
    experts = {l for l in model.linears if ".experts." in l and "shared" not in l}
    described = json.loads((out / NAME).read_text())
    assert described.pop(GROUP_SIZE) == 128
    assert sorted(described) == sorted(written)
    assert sorted(n for n, m in described.items() if m == W4A8_DYNAMIC) == sorted(
        name for linear in experts for name in (linear, linear + "_scale"))
    assert sorted(n for n, m in described.items() if m == W8A8_DYNAMIC) == sorted(
        name for linear in model.linears - experts for name in (linear, linear + "_scale"))
    for name, array in arrays.items():
        if name not in model.linears:
            assert described[name] == FLOAT and np.array_equal(written[name], array), name
    assert f"{out / NAME}: {2 * len(experts)} W4A8_DYNAMIC, " in result.stdout
    assert "warning" not in result.stderr
    found = detect_scheme(infos)
    assert (found.scheme, found.group_size, found.label) == ("w4a8-dynamic", 128,
                                                             "w4a8-dynamic g128")
    assert cli("verify", src, out / "model.safetensors").exit_code == 0
    again = cli("convert", out / "model.safetensors", tmp_path / "again.safetensors")
    assert again.exit_code == 2 and "w4a8-dynamic" in again.stderr


def test_no_routed_expert_quantized_is_said(tmp_path: Path) -> None:
    """With every routed expert blacklisted (or a dense model), the output is w8a8-dynamic's,
    byte for byte, while the summary named w4a8-dynamic g128: now a warning says so."""
    *_, infos, result = converted(tmp_path, "--blacklist", "mlp.experts.")
    assert detect_scheme(infos).scheme == "w8a8-dynamic"
    assert result.stderr == (f"warning: {tmp_path / 'model.safetensors'}: no routed expert "
                             "(mlp.experts.N.*_proj) was quantized, so --scheme w4a8-dynamic "
                             "wrote no int4 layer: the output is what w8a8-dynamic writes\n")


def test_a_directory_is_judged_whole_for_that_warning(tmp_path: Path) -> None:
    """The dense layer in one shard, the experts in the other: a --part of the dense shard,
    or a --resume after it, warned of no routed expert though the output has them."""
    model = deepseek_v3()
    arrays = arrays_of(model)
    src = tmp_path / "src"
    src.mkdir()
    experts = [n for n in model.tensors if n.startswith("model.layers.1.")]
    shards = {"model-00001-of-00002.safetensors": [n for n in model.tensors if n not in experts],
              "model-00002-of-00002.safetensors": experts}
    for shard, names in shards.items():
        write_safetensors(src / shard, model, arrays, names)
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: s for s, names in shards.items() for n in names}}))
    dst = tmp_path / "out"
    runs = [cli("convert", src, dst, "--scheme", "w4a8-dynamic", "-q", *extra)
            for extra in (["--part", "0/2"], ["--part", "1/2"], ["--resume"])]
    assert [(r.exit_code, r.stderr) for r in runs] == [(0, "")] * 3
    blacklisted = cli("convert", src, tmp_path / "dense", "--scheme", "w4a8-dynamic", "-q",
                      "--blacklist", "mlp.experts.")
    assert blacklisted.exit_code == 0 and blacklisted.stderr == (
        f"warning: {src}: no routed expert (mlp.experts.N.*_proj) was quantized, so --scheme "
        "w4a8-dynamic wrote no int4 layer: the output is what w8a8-dynamic writes\n")


@pytest.mark.skipif(importlib.util.find_spec("mindformers") is None,
                    reason="needs the mindspore extra (MindFormers 1.9)")
def test_mindformers_mcore_deepseek_v3_loads_it(tmp_path: Path) -> None:
    """MindFormers' InferenceDeepseekV3ForCausalLM (use_legacy False, quantization
    golden-stick, CPU) builds A8W4 grouped experts and A8W8 dynamic Linear layers from the
    description and loads the directory: each expert's codes land transposed in its slice of
    the stacked qint4x2 weight1 (gate, then up) / weight2, its scale bits in the uint64
    w_scale, within half a step of the FP weights; every other parameter holds what was
    written (kv_b_proj's rows regrouped as the loader does). gmm_bias is the one parameter not loaded: process_weights_after_loading
    computes it, which needs Ascend (its RepeatInterleaveInt has no CPU kernel); here it is
    computed as a8dynw4.py does. Running the network needs Ascend (GroupedMatmulV4,
    DynamicQuantExt)."""
    model, arrays, _, out, written, _, _ = converted(tmp_path)  # kv_b_proj kept by default
    loaded = mcore_load("deepseek-v3", out, "bfloat16", tmp_path)
    mc, hf = "model.decoder.layers.1.mlp.", "model.layers.1.mlp."

    weight1, weight2 = loaded[mc + "experts.weight1"], loaded[mc + "experts.weight2"]
    scale1 = loaded[mc + "experts.linear_fc1.w_scale"]
    scale2 = loaded[mc + "experts.linear_fc2.w_scale"]
    assert (weight1.shape, weight2.shape) == ((EXPERTS, H, FFN), (EXPERTS, FFN, H // 2))
    assert (scale1.dtype, scale1.shape, scale2.shape) == (np.uint64, (EXPERTS, 2, 2 * FFN),
                                                          (EXPERTS, 2, H))
    for e in range(EXPERTS):
        p = f"{hf}experts.{e}."
        fc1 = [p + "gate_proj", p + "up_proj"]
        assert np.array_equal(weight1[e].view(np.int8), np.concatenate(
            [written[n + ".weight"] for n in fc1]).T)
        assert np.array_equal(scale1[e], np.concatenate(
            [written[n + ".weight_scale"] for n in fc1]).T.astype(np.uint64))
        assert np.array_equal(weight2[e].view(np.int8), written[p + "down_proj.weight"].T)
        assert np.array_equal(scale2[e], written[p + "down_proj.weight_scale"].T)
        for packed, bits, names in ((weight1[e], scale1[e], fc1),
                                    (weight2[e], scale2[e], [p + "down_proj"])):
            codes = unpack_int4(packed.view(np.int8))  # [in, out], as a8dynw4.py unpacks
            scale = scales_of(bits)  # [in/group, out]
            original = np.concatenate([bf16_to_float32(arrays[n + ".weight"]) for n in names])
            assert within_a_step(codes.T, scale.T, original, FloatFormat.BFLOAT16), names
            gmm_bias = 8 * np.sum(codes * np.repeat(scale, 128, axis=0), axis=0)
            assert np.all(np.isfinite(gmm_bias)) and gmm_bias.shape == (codes.shape[1],)

    def fp(name: str) -> np.ndarray:
        return bf16_to_float32(written[name]) if written[name].dtype == np.uint16 \
            else written[name].astype(np.float32)

    expected: Dict[str, np.ndarray] = {
        "model.embedding.word_embeddings.weight": fp("model.embed_tokens.weight"),
        "model.decoder.final_layernorm.weight": fp("model.norm.weight"),
        "model.output_layer.weight": fp("lm_head.weight"),
        "model.decoder.layers.1.mlp.router.weight": fp("model.layers.1.mlp.gate.weight"),
        "model.decoder.layers.1.mlp.router.expert_bias":
            fp("model.layers.1.mlp.gate.e_score_correction_bias")}
    for i in range(2):
        h, m = f"model.layers.{i}.", f"model.decoder.layers.{i}."
        for mf_name, hf_name in [("input_layernorm", "input_layernorm"),
                                 ("pre_mlp_layernorm", "post_attention_layernorm"),
                                 ("self_attention.q_layernorm", "self_attn.q_a_layernorm"),
                                 ("self_attention.kv_layernorm", "self_attn.kv_a_layernorm")]:
            expected[f"{m}{mf_name}.weight"] = fp(f"{h}{hf_name}.weight")
        # MindFormers' loader regroups kv_b_proj's rows: each of the 4 heads' 16 k_nope rows
        # and 16 v rows become every head's k_nope rows, then every head's v rows.
        kv_up = fp(f"{h}self_attn.kv_b_proj.weight")
        expected[f"{m}self_attention.linear_kv_up_proj.weight"] = \
            kv_up.reshape(4, 2, 16, -1).swapaxes(0, 1).reshape(kv_up.shape)
        att, mlp = h + "self_attn.", h + ("mlp." if i == 0 else "mlp.shared_experts.")
        fused = {"self_attention.linear_qkv_down_proj": [att + "kv_a_proj_with_mqa",  # kv first
                                                         att + "q_a_proj"],
                 "self_attention.linear_q_up_proj": [att + "q_b_proj"],
                 "self_attention.linear_proj": [att + "o_proj"],
                 ("mlp." if i == 0 else "mlp.shared_experts.") + "linear_fc1":
                     [mlp + "gate_proj", mlp + "up_proj"],
                 ("mlp." if i == 0 else "mlp.shared_experts.") + "linear_fc2":
                     [mlp + "down_proj"]}
        for layer, parts in fused.items():
            expected[f"{m}{layer}.weight"] = np.concatenate([written[p + ".weight"]
                                                             for p in parts])
            expected[f"{m}{layer}.w_scale"] = np.concatenate([fp(p + ".weight_scale")
                                                              for p in parts])
    assert sorted(n for n in loaded if ".mlp.experts." not in n) == sorted(expected)
    for name, value in expected.items():  # float tensors as the network's dtype holds them
        got = loaded[name]
        assert got.dtype == np.int8 if value.dtype == np.int8 else got.dtype.kind == "f", name
        assert np.array_equal(got, value.astype(got.dtype)), name
