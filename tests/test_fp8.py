"""FP8 sources: E4M3 decoding, 128x128 block dequantization, and DeepSeek-V3-style FP8
checkpoints converted as the same model given in bfloat16."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

from ckpt_rtn import dtypes, fp8
from ckpt_rtn.formats import TensorInfo, open_reader, open_writer
from ckpt_rtn.numerics import float32_to_bf16

from conftest import cli, field, record, varint
from test_hf_families import MODELS, Model

F8 = dtypes.FLOAT8_E4M3


def reference_e4m3(code: int) -> float:
    """An E4M3 (fn) code's value from the OCP definition, in integer-times-power-of-two form."""
    sign = -1.0 if code & 0x80 else 1.0
    exponent, mantissa = (code >> 3) & 0xF, code & 0x7
    if exponent == 0xF and mantissa == 0x7:
        return math.nan
    if exponent == 0:
        return sign * math.ldexp(mantissa, -9)
    return sign * math.ldexp(8 + mantissa, exponent - 10)


def same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit, NaNs at the same places."""
    nan = np.isnan(a)
    return bool((nan == np.isnan(b)).all() and np.array_equal(
        a[~nan].view(np.uint32), b[~nan].view(np.uint32)))


def test_all_256_codes_decode_as_the_format_defines() -> None:
    codes = np.arange(256, dtype=np.uint8)
    expected = np.array([reference_e4m3(c) for c in range(256)], dtype=np.float32)
    assert same_floats(fp8.decode(codes), expected)
    assert fp8.decode(np.array([0x7E, 0xFE, 0x08, 0x01], np.uint8)).tolist() == [
        448.0, -448.0, 2.0 ** -6, 2.0 ** -9]  # largest, smallest normal, smallest subnormal
    assert np.signbit(fp8.decode(np.array([0x80], np.uint8)))[0]  # -0.0 keeps its sign
    assert np.isnan(fp8.decode(np.array([0x7F, 0xFF], np.uint8))).all()


def test_decoding_agrees_with_ml_dtypes() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    codes = np.arange(256, dtype=np.uint8)
    assert same_floats(fp8.decode(codes), codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32))


def random_fp8(rng: np.random.Generator, shape: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """Random finite codes and positive block scales of DeepSeek-V3's magnitude."""
    codes = rng.integers(0, 256, size=shape, dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] ^= 1  # no NaN
    scales = (rng.uniform(0.5, 2.0, fp8.scale_shape(shape)) * 1e-4).astype(np.float32)
    return codes, scales


def reference_bf16(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """fp8_cast_bf16.py's weight_dequant: code value times its block's scale, in float32,
    then bfloat16 (half to even), with the scales expanded to the whole matrix."""
    out, inner = codes.shape
    values = np.array([reference_e4m3(c) for c in range(256)], np.float32)[codes]
    expanded = np.repeat(np.repeat(scales, fp8.BLOCK, axis=0), fp8.BLOCK, axis=1)[:out, :inner]
    return float32_to_bf16(values * expanded)


@pytest.mark.parametrize("shape", [(1, 1), (128, 128), (256, 384), (300, 200), (129, 127),
                                   (64, 1000)])
def test_block_dequantization_matches_a_direct_reference(shape: Tuple[int, int]) -> None:
    codes, scales = random_fp8(np.random.default_rng(sum(shape)), shape)
    assert np.array_equal(fp8.dequantize_bf16(codes, scales), reference_bf16(codes, scales))


def test_each_block_takes_its_own_scale() -> None:
    """All codes 1.0 (0x38): the dequantized weight is the scale of each element's block."""
    codes = np.full((200, 300), 0x38, np.uint8)
    scales = np.arange(1, 7, dtype=np.float32).reshape(2, 3)
    result = fp8.dequantize_bf16(codes, scales)
    assert np.array_equal(result, float32_to_bf16(np.kron(scales, np.ones((128, 128)))[:200, :300]
                                                  .astype(np.float32)))


# ---------------------------------------------------------------------- conversion

#: Linear weights DeepSeek-V3 stores in FP8, besides the projections hf-moe quantizes:
#: the MTP layer's eh_proj, which no family selects (written as bfloat16).
UNSELECTED_FP8 = "model.layers.2.eh_proj.weight"


def deepseek_fp8() -> Tuple[Model, List[str]]:
    """The tiny DeepSeek-V3 of test_hf_families plus a routed expert wider than a block
    (gate/up [200, 64], down [64, 200]: partial edge blocks both ways), and which of its
    weights are FP8: every projection, as in DeepSeek-V3 (embeddings, norms, routers and
    heads stay bfloat16/float32)."""
    model = MODELS["deepseek-v3"]()
    model.mlp("model.layers.1.mlp.experts.4.", 200)
    weights = sorted(model.linears - {"lm_head.weight"}) + [UNSELECTED_FP8]
    return model, weights


def shard_of(name: str) -> int:
    """1: embeddings and heads; 2: MLPs; 3: attention and norms; block scales with their
    weights, except one expert's, which lies in the shard before (DeepSeek-V3 has such)."""
    if name == "model.layers.1.mlp.experts.4.down_proj.weight_scale_inv":
        return 1
    if ".layers." not in name:
        return 1
    return 2 if ".mlp." in name else 3


FP8_CONFIG = {"architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 64,
              "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                      "quant_method": "fp8", "weight_block_size": [128, 128]},
              "torch_dtype": "bfloat16"}


def write_directory(directory: Path, tensors: Dict[str, Tuple[dtypes.DType, Tuple[int, ...]]],
                    arrays: Dict[str, np.ndarray], config: bytes) -> None:
    """A Hugging Face sharded directory: three shards, their index, config.json."""
    directory.mkdir()
    shards: Dict[int, List[str]] = {}
    for name in tensors:
        shards.setdefault(shard_of(name), []).append(name)
    weight_map = {}
    for k, names in sorted(shards.items()):
        file = f"model-{k:05d}-of-00003.safetensors"
        infos = [TensorInfo.of(n, *tensors[n]) for n in names]
        with open_writer(directory / file, infos, format="safetensors",
                         metadata={"format": "pt"}) as writer:
            for name in names:
                writer.write(name, arrays[name])
        weight_map.update(dict.fromkeys(names, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 0}, "weight_map": weight_map}))
    (directory / "config.json").write_bytes(config)


def fp8_and_bf16_directories(tmp_path: Path) -> Tuple[Path, Path, List[str]]:
    """The same model twice: FP8 with block scales (and an FP8 quantization_config), and in
    bfloat16 as the reference dequantizes it (config.json as convert should write it)."""
    model, fp8_weights = deepseek_fp8()
    rng = np.random.default_rng(0)
    arrays = {}
    for name, (dtype, shape) in model.tensors.items():
        values = (np.ones(shape, np.float32) if "norm" in name
                  else (rng.standard_normal(shape) * 0.02).astype(np.float32))
        arrays[name] = float32_to_bf16(values) if dtype is dtypes.BFLOAT16 else values
    fp8_tensors, fp8_arrays = {}, {}
    for name, (dtype, shape) in model.tensors.items():
        if name not in fp8_weights:
            fp8_tensors[name], fp8_arrays[name] = (dtype, shape), arrays[name]
            continue
        codes, scales = random_fp8(rng, shape)  # type: ignore[arg-type]
        fp8_tensors[name], fp8_arrays[name] = (F8, shape), codes
        scale = name + fp8.SCALE_SUFFIX
        fp8_tensors[scale], fp8_arrays[scale] = (dtypes.FLOAT32, scales.shape), scales
        arrays[name] = reference_bf16(codes, scales)
    config = json.dumps(FP8_CONFIG, indent=2).encode() + b"\n"
    bf16_config = {k: v for k, v in FP8_CONFIG.items() if k != "quantization_config"}
    write_directory(tmp_path / "fp8", fp8_tensors, fp8_arrays, config)
    write_directory(tmp_path / "bf16", model.tensors, arrays,
                    json.dumps(bf16_config, indent=2).encode() + b"\n")
    return tmp_path / "fp8", tmp_path / "bf16", fp8_weights


def tensors_of(directory: Path) -> Dict[str, Tuple[str, TensorInfo, bytes]]:
    """Each tensor of a directory's shards: its shard, its info and its bytes."""
    found = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with open_reader(shard) as reader:
            found.update({t.name: (shard.name, t, reader.read(t).tobytes())
                          for t in reader.tensors})
    return found


@pytest.mark.parametrize("scheme", ["w8a16", "w8a8-dynamic"])
def test_fp8_directory_converts_as_its_bf16_dequantization(tmp_path: Path, scheme: str) -> None:
    src, bf16, fp8_weights = fp8_and_bf16_directories(tmp_path)
    with open_reader(src / "model-00001-of-00003.safetensors") as reader:  # the cross-shard one
        assert "model.layers.1.mlp.experts.4.down_proj.weight_scale_inv" in reader._position
    out, expected = tmp_path / "out", tmp_path / "expected"
    for source, dst in ((src, out), (bf16, expected)):
        result = cli("convert", source, dst, "--scheme", scheme, "-q")
        assert result.exit_code == 0, result.stderr
    names = sorted(p.name for p in expected.iterdir())
    assert sorted(p.name for p in out.iterdir()) == names
    written, wanted = tensors_of(out), tensors_of(expected)
    # Every tensor, quantized or not, in the same shard, byte for byte (the shards' data
    # order follows the input's, where FP8 codes and float32 scales sit apart).
    assert written.keys() == wanted.keys()
    for name, (shard, info, data) in wanted.items():
        assert written[name][:2] == (shard, info), name
        assert written[name][2] == data, name
    for name in ("model.safetensors.index.json", "config.json", "quant_model_description.json"):
        if name in names:
            assert (out / name).read_bytes() == (expected / name).read_bytes(), name
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["hidden_size"] == 64
    assert not any(n.endswith(fp8.SCALE_SUFFIX) for n in written)
    assert not any(info.dtype is F8 for _, info, _ in written.values())
    assert written[UNSELECTED_FP8][1].dtype is dtypes.BFLOAT16  # not selected: bfloat16
    assert len(fp8_weights) > 30
    verdict = cli("verify", src, out, "-q")
    assert verdict.exit_code == 0, verdict.stdout + verdict.stderr


def single_fp8_file(path: Path, *, scale: bool = True, scale_shape=(2, 1),
                    code: str = "F8_E4M3", scale_value: float = 0.0,
                    per_tensor: bool = False) -> None:
    """o_proj FP8 (codes 0x7E, 448) with its block scales (all `scale_value`), and per
    tensor scale too if `per_tensor`; down_proj bfloat16."""
    weight = "model.layers.0.self_attn.o_proj.weight"
    dtype = F8 if code == "F8_E4M3" else dtypes.DType(code, np.dtype("u1"), code, True)
    infos = [TensorInfo.of(weight, dtype, (200, 64)),
             TensorInfo.of("model.layers.0.mlp.down_proj.weight", dtypes.BFLOAT16, (64, 64))]
    if scale:
        infos.append(TensorInfo.of(weight + fp8.SCALE_SUFFIX, dtypes.FLOAT32, scale_shape))
    if per_tensor:
        infos.append(TensorInfo.of(weight + fp8.TENSOR_SCALE_SUFFIX, dtypes.FLOAT32, ()))
    values = {weight: 0x7E, weight + fp8.SCALE_SUFFIX: scale_value}
    with open_writer(path, infos, format="safetensors", metadata={}) as writer:
        for info in infos:
            writer.write(info.name, np.full(info.shape, values.get(info.name, 0),
                                            info.dtype.numpy))


def test_single_fp8_file_dry_run_plans_the_dequantization(tmp_path: Path) -> None:
    src = tmp_path / "model.safetensors"
    single_fp8_file(src)
    result = cli("convert", src, tmp_path / "out.safetensors", "--dry-run", "--config",
                 "hf-llama")
    assert result.exit_code == 0, result.stderr
    assert "1 FP8 (F8_E4M3) weight would be dequantized to bfloat16 (1 then quantized" \
        in result.stdout
    assert "2 of 3 tensors would be quantized" in result.stdout
    assert "Float8E4M3FN" in result.stdout  # o_proj, in the table of weights to quantize


@pytest.mark.parametrize("case, message", [
    ({"scale": False}, "is FP8 (F8_E4M3) but has no block scales "
                       "'model.layers.0.self_attn.o_proj.weight_scale_inv'"),
    ({"scale_shape": (1, 1)}, "the block scales of FP8 [200, 64] are Float32 [2, 1]"),
    ({"code": "F8_E5M2"}, "is 'F8_E5M2', an FP8 format ckpt-rtn does not read"),
    # It was read as the block scales alone, and the per-tensor scale copied beside them.
    ({"per_tensor": True}, "is FP8 with a per-tensor scale "
                           "'model.layers.0.self_attn.o_proj.weight_scale' (NVIDIA's layout)"),
    # Written as infinite or NaN bfloat16 where not quantized, with numpy's warnings.
    ({"scale_value": math.nan}, "scale of block (0, 0) is nan: its weights could be infinite"),
    ({"scale_value": -math.inf}, "scale of block (0, 0) is -inf"),
    ({"scale_value": 1e36}, "scale of block (0, 0) is 1e+36: its weights could be infinite"),
])
@pytest.mark.parametrize("blacklist", [[], ["--blacklist", "o_proj"]], ids=["", "blacklisted"])
def test_bad_fp8_input_is_one_line(tmp_path: Path, case: dict, message: str,
                                   blacklist: List[str]) -> None:
    src = tmp_path / "model.safetensors"
    single_fp8_file(src, **case)
    result = cli("convert", src, tmp_path / "out.safetensors", "--config", "hf-llama",
                 *blacklist)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {src}: ") and message in result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()


def test_scales_without_their_weight_are_refused(tmp_path: Path) -> None:
    src = tmp_path / "model.safetensors"
    infos = [TensorInfo.of("model.layers.0.mlp.down_proj.weight", dtypes.BFLOAT16, (64, 64)),
             TensorInfo.of("model.layers.0.mlp.down_proj.weight_scale_inv", dtypes.FLOAT32,
                           (1, 1))]
    with open_writer(src, infos, format="safetensors", metadata={}) as writer:
        for info in infos:
            writer.write(info.name, np.zeros(info.shape, info.dtype.numpy))
    result = cli("convert", src, tmp_path / "out.safetensors", "--config", "hf-llama")
    assert result.exit_code == 2
    assert "holds block scales, but 'model.layers.0.mlp.down_proj.weight' is not an FP8 " \
           "weight" in result.stderr


def test_block_scales_held_by_two_shards_are_refused(tmp_path: Path) -> None:
    """The weight's shard and another both held its scales, with other values, and the
    index named the other: the weight was dequantized with its own shard's (exit 0), and
    the other copy dropped, where a loader following the index reads the other."""
    weight = "model.layers.0.self_attn.o_proj.weight"
    scale = weight + fp8.SCALE_SUFFIX
    src = tmp_path / "src"
    src.mkdir()
    files = {"model-00001-of-00002.safetensors": {weight: (F8, (200, 64), 0x38),
                                                  scale: (dtypes.FLOAT32, (2, 1), 1.0)},
             "model-00002-of-00002.safetensors": {
                 scale: (dtypes.FLOAT32, (2, 1), 2.0),
                 "model.layers.0.mlp.down_proj.weight": (dtypes.BFLOAT16, (64, 64), 0)}}
    for file, tensors in files.items():
        infos = [TensorInfo.of(name, dtype, shape) for name, (dtype, shape, _) in tensors.items()]
        with open_writer(src / file, infos, format="safetensors", metadata={}) as writer:
            for info, (_, _, value) in zip(infos, tensors.values()):
                writer.write(info.name, np.full(info.shape, value, info.dtype.numpy))
    weight_map = {weight: "model-00001-of-00002.safetensors",
                  scale: "model-00002-of-00002.safetensors",
                  "model.layers.0.mlp.down_proj.weight": "model-00002-of-00002.safetensors"}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    result = cli("convert", src, tmp_path / "out", "--config", "hf-llama")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {src / 'model-00002-of-00002.safetensors'}: "
                                    f"tensor {scale!r} is held by "
                                    "model-00001-of-00002.safetensors too")
    assert not (tmp_path / "out").exists()


def test_directory_dry_run_counts_fp8_as_a_file_does(tmp_path: Path) -> None:
    """Each shard's row counted its converted tensors, the summary also the scales read."""
    src, _, fp8_weights = fp8_and_bf16_directories(tmp_path)
    planned = cli("convert", src, tmp_path / "out", "--dry-run")
    assert planned.exit_code == 0, planned.stderr
    lines = planned.stdout.splitlines()
    shards = [int(re.search(r" of (\d+) ", line).group(1)) for line in lines[1:4]]
    total = int(re.search(r"of (\d+) tensors in 3 shards", lines[-1]).group(1))
    assert sum(shards) == total
    assert f"{len(fp8_weights)} FP8 (F8_E4M3) weights would be dequantized" in planned.stdout


def test_rank_directories_each_hold_their_own_scales(tmp_path: Path) -> None:
    """Shards of no index are checkpoints of their own, with the same names in each: one
    rank's scales are not a second copy of another's (the first version of the two-shards
    check refused them)."""
    src = tmp_path / "ranks"
    for rank in range(2):
        (src / f"rank_{rank}").mkdir(parents=True)
        single_fp8_file(src / f"rank_{rank}" / "model.safetensors", scale_value=1.0)
    result = cli("convert", src, tmp_path / "out", "--config", "hf-llama", "-q")
    assert result.exit_code == 0, result.stderr
    assert cli("verify", src, tmp_path / "out").exit_code == 0


def test_blacklisted_fp8_weight_is_written_as_its_bf16(tmp_path: Path) -> None:
    src, out = tmp_path / "model.safetensors", tmp_path / "out.safetensors"
    codes, scales = random_fp8(np.random.default_rng(1), (200, 64))
    weight = "model.layers.0.self_attn.o_proj.weight"
    infos = [TensorInfo.of(weight, F8, codes.shape),
             TensorInfo.of(weight + fp8.SCALE_SUFFIX, dtypes.FLOAT32, scales.shape),
             TensorInfo.of("model.layers.0.mlp.down_proj.weight", dtypes.BFLOAT16, (64, 64))]
    with open_writer(src, infos, format="safetensors", metadata={}) as writer:
        for info, array in zip(infos, (codes, scales, np.zeros((64, 64), np.uint16))):
            writer.write(info.name, array)
    result = cli("convert", src, out, "--config", "hf-llama", "--blacklist", "o_proj", "-q")
    assert result.exit_code == 0, result.stderr
    with open_reader(out) as reader:
        written = {t.name: t for t in reader.tensors}
        assert written[weight].dtype is dtypes.BFLOAT16 and written[weight].shape == (200, 64)
        assert np.array_equal(reader.read(written[weight]), reference_bf16(codes, scales))
        assert weight + fp8.SCALE_SUFFIX not in written


def test_fp8_config_of_other_blocks_is_refused_before_writing(tmp_path: Path) -> None:
    src, _, _ = fp8_and_bf16_directories(tmp_path)
    config = dict(FP8_CONFIG, quantization_config=dict(FP8_CONFIG["quantization_config"],
                                                       weight_block_size=[64, 64]))
    (src / "config.json").write_text(json.dumps(config))
    result = cli("convert", src, tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {src / 'config.json'}: quantization_config "
                                    "describes FP8 'e4m3' in blocks of [64, 64]")
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_fp8_in_a_ckpt_is_named_as_such(tmp_path: Path) -> None:
    """A .ckpt's Float8E4M3FN weight is read as opaque bytes; beside block scales it was
    refused as 'not an FP8 weight', which inspect contradicted."""
    def tensor(name: str, dtype: bytes, dims: Tuple[int, ...], data: bytes) -> bytes:
        head = b"".join(field(1, 0, varint(d)) for d in dims)
        return record(field(1, 2, name.encode()) + field(2, 2, head + field(2, 2, dtype)
                                                         + field(3, 2, data)))

    weight = "model.layers.0.self_attn.o_proj.weight"
    src = tmp_path / "fp8.ckpt"
    src.write_bytes(tensor(weight, b"Float8E4M3FN", (2, 2), bytes(4))
                    + tensor(weight + fp8.SCALE_SUFFIX, b"Float32", (1, 1), bytes(4)))
    assert "Float8E4M3FN" in cli("inspect", src).stdout
    result = cli("convert", src, tmp_path / "out.ckpt", "--config", "hf-llama")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {src}: tensor {weight!r} is Float8E4M3FN in a "
                                    ".ckpt, which ckpt-rtn reads as bytes")
