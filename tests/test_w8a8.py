"""--scheme w8a8-dynamic: MindFormers' Mcore layout, and its loader taking it.

The layout (schemes.py, golden_stick.mcore_names): `<p>.weight` int8 [out, in]
and `<p>.weight_scale` [out] (float32; bfloat16 for a bfloat16 weight) under
Hugging Face names, with quant_model_description.json beside them
(description.py). The last test loads a converted tiny Qwen3 with MindFormers'
own Mcore network and loader, on CPU.
"""
from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
from safetensors.numpy import save_file

from ckpt_rtn import dtypes, paths
from ckpt_rtn.description import FLOAT, NAME, W8A8_DYNAMIC, methods
from ckpt_rtn.directory import MANIFEST, sha256_of
from ckpt_rtn.errors import ConfigError
from ckpt_rtn.formats import TensorInfo, open_reader
from ckpt_rtn.numerics import FloatFormat, bf16_to_float32, float32_to_bf16, to_work
from ckpt_rtn.rtn import RtnSpec, quantize_rtn
from ckpt_rtn.rules import load_rules
from ckpt_rtn.schemes import detect_scheme, get_scheme

from conftest import cli, llama_weights, mcore_load
from test_directory import write_ckpt
from test_hf_families import MODELS, arrays_of, write_safetensors

SCHEME = get_scheme("w8a8-dynamic")
PTQ8 = RtnSpec(bits=8, float64_scale=True)
#: Steps beyond rint's half that Golden Stick's arithmetic allows, 128u for a weight format
#: of unit roundoff u: its scale is rounded to that format, which can leave a row's largest
#: |w|/s at 127.5(1 + u), clamped to 127; and it divides in that format, which rounds
#: quotients below 128 by up to 64u. Float32 0.5000076 steps, float16 0.5625, bfloat16 1.
SLACK = {FloatFormat.FLOAT32: 2.0 ** -17, FloatFormat.FLOAT16: 2.0 ** -4,
         FloatFormat.BFLOAT16: 2.0 ** -1}


def within_a_step(codes: np.ndarray, scale: np.ndarray, original: np.ndarray,
                  fmt: FloatFormat) -> bool:
    """|q*s - w| <= (1/2 + SLACK) * s for every weight: rint's half step, plus the roundings
    in the weight's format."""
    s = scale.astype(np.float64)[:, None]
    return bool(np.all(np.abs(codes * s - original) <= (0.5 + SLACK[fmt]) * s * (1 + 1e-9)))


def weight(fmt: FloatFormat, shape=(48, 64), seed: int = 0) -> np.ndarray:
    values = (np.random.default_rng(seed).standard_normal(shape) * 0.05).astype(np.float32)
    values[3] = 0.0  # an all-zero row: scale 0, codes 0
    if fmt is FloatFormat.BFLOAT16:
        return float32_to_bf16(values)
    return values.astype(fmt.storage)


@pytest.mark.parametrize("fmt, scale_dtype", [
    (FloatFormat.FLOAT16, dtypes.FLOAT32), (FloatFormat.BFLOAT16, dtypes.BFLOAT16),
    (FloatFormat.FLOAT32, dtypes.FLOAT32)])
def test_codes_and_scale_are_golden_sticks_w8_ptq(fmt: FloatFormat,
                                                  scale_dtype: dtypes.DType) -> None:
    """The codes and scale of Golden Stick's PTQ int8 (2*max|w|/255 in float64, full range,
    symmetric), the scale widened exactly to the dtype the loader's w_scale has; every
    weight dequantizes to within half a step of the original (plus the roundings in the
    weight's format: see SLACK)."""
    w = weight(fmt)
    dtype = {FloatFormat.FLOAT16: dtypes.FLOAT16, FloatFormat.BFLOAT16: dtypes.BFLOAT16,
             FloatFormat.FLOAT32: dtypes.FLOAT32}[fmt]
    infos = SCHEME.outputs("model.layers.0.mlp.up_proj", dtype, 48, 64)
    assert [(i.name, i.dtype, i.shape) for i in infos] == [
        ("model.layers.0.mlp.up_proj.weight", dtypes.INT8, (48, 64)),
        ("model.layers.0.mlp.up_proj.weight_scale", scale_dtype, (48,))]
    q, scale = SCHEME.quantize(w, fmt, pool=None, stats=False).arrays
    reference = quantize_rtn(w, fmt, PTQ8)
    assert q.dtype == np.int8 and np.array_equal(q, reference.q)
    assert scale.dtype == scale_dtype.numpy
    assert np.array_equal(to_work(scale, FloatFormat.BFLOAT16 if scale_dtype is dtypes.BFLOAT16
                                  else FloatFormat.FLOAT32), to_work(reference.scale, fmt))
    s = to_work(scale, FloatFormat.BFLOAT16) if fmt is FloatFormat.BFLOAT16 else scale
    assert within_a_step(q, s, to_work(w, fmt), fmt)
    assert not q[3].any() and s[3] == 0
    assert q.min() == -128 or q.max() == 127  # the full range, as narrow_range=False


def test_options_it_refuses() -> None:
    with pytest.raises(ValueError, match="no zero point"):
        get_scheme("w8a8-dynamic", symmetric=False)
    with pytest.raises(ValueError, match="--group-size"):
        get_scheme("w8a8-dynamic", 128)


def test_detected_as_quantized_and_described() -> None:
    """An int8 <p>.weight beside <p>.weight_scale is this layout; an FP8 checkpoint's
    weight_scale_inv is not. The description gives a quantized layer's bias its method:
    MindFormers takes the first key containing the layer's prefix, and .bias sorts first."""
    q = "model.layers.0.self_attn.q_proj"
    tensors = [TensorInfo.of(f"{q}.bias", dtypes.BFLOAT16, (8,)),
               TensorInfo.of(f"{q}.weight", dtypes.INT8, (8, 4)),
               TensorInfo.of(f"{q}.weight_scale", dtypes.BFLOAT16, (8,)),
               TensorInfo.of("model.norm.weight", dtypes.BFLOAT16, (4,))]
    found = detect_scheme(tensors)
    assert (found.scheme, found.layers, found.label) == ("w8a8-dynamic", (q,), "w8a8-dynamic")
    assert methods(tensors) == {f"{q}.bias": W8A8_DYNAMIC, f"{q}.weight": W8A8_DYNAMIC,
                                f"{q}.weight_scale": W8A8_DYNAMIC, "model.norm.weight": FLOAT}
    fp8 = [TensorInfo("x.weight", dtypes.DType("F8_E4M3", None, None), (8, 4), 32),
           TensorInfo.of("x.weight_scale_inv", dtypes.FLOAT32, (1, 1))]
    assert detect_scheme(fp8) is None


def qwen3(tmp_path: Path):
    model = MODELS["qwen3"]()
    arrays = arrays_of(model)
    src = tmp_path / "model.safetensors"
    write_safetensors(src, model, arrays)
    return model, arrays, src


def test_single_file(tmp_path: Path) -> None:
    """The description lands beside the output, with it or not at all; the summary says
    what MindFormers needs besides; verify checks it; a .ckpt output is refused."""
    model, _, src = qwen3(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "model.safetensors"
    result = cli("convert", src, dst, "--scheme", "w8a8-dynamic")
    assert result.exit_code == 0, result.stderr
    written = json.loads((out / NAME).read_text())
    with open_reader(dst) as reader:
        names = [t.name for t in reader.tensors]
    assert sorted(written) == sorted(names)
    assert sorted(n for n, m in written.items() if m == W8A8_DYNAMIC) == sorted(
        name for linear in model.linears for name in (linear, linear + "_scale"))
    assert f"{out / NAME}: {2 * len(model.linears)} W8A8_DYNAMIC and " in result.stdout
    assert "copy the model's config.json and tokenizer files there" in result.stdout
    assert cli("verify", src, dst).exit_code == 0

    (out / NAME).write_text(json.dumps({**written, "lm_head.weight": FLOAT}))
    tampered = cli("verify", src, dst)
    assert tampered.exit_code == 1 and f"{NAME}: is not the description" in tampered.stdout
    # Neither opened: a FIFO blocked verify, and a link to /dev/zero was read until memory ran out.
    for make, kind in ((os.mkfifo, "a FIFO"), (lambda p: os.symlink("/dev/zero", p),
                                               "a symbolic link")):
        (out / NAME).unlink()
        make(out / NAME)
        odd = cli("verify", src, dst)
        assert odd.exit_code == 1 and f"{NAME}: is {kind}" in odd.stdout, odd.output
    (out / NAME).unlink()
    (out / NAME).write_text(json.dumps(written))

    again = cli("convert", src, dst, "--scheme", "w8a8-dynamic")  # no --overwrite
    assert again.exit_code == 2 and again.stderr.count("\n") == 1

    refused = cli("convert", src, tmp_path / "w8.ckpt", "--scheme", "w8a8-dynamic")
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1
    assert "writes safetensors" in refused.stderr and not (tmp_path / "w8.ckpt").exists()
    assert not (tmp_path / NAME).exists()


def test_two_outputs_in_one_folder_share_its_description(tmp_path: Path) -> None:
    """Two runs into one folder at once: each wrote the one description there, the last
    replacing the first's, and both exited 0. Its lock is held for the run, as the
    output's is."""
    _, _, src = qwen3(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with paths.destination_lock(out / NAME):  # the other run, writing b.safetensors
        second = cli("convert", src, out / "a.safetensors", "--scheme", "w8a8-dynamic")
    assert second.exit_code == 2 and second.stderr == (
        f"error: {out / NAME}: is being written by another ckpt-rtn run (pid {os.getpid()})\n")
    assert sorted(os.listdir(out)) == []


def test_another_description_beside_a_single_output(tmp_path: Path) -> None:
    """MindFormers refuses a folder holding two descriptions ("multiple config files"):
    convert wrote its own beside another, and verify called the pair identical; a report
    named like a description went there too."""
    _, _, src = qwen3(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    dst, other = out / "model.safetensors", out / "quantization_description.json"
    other.write_text("{}")
    refused = cli("convert", src, dst, "--scheme", "w8a8-dynamic")
    assert refused.exit_code == 2 and refused.stderr == (
        f"error: {other}: is a quantization description too, and MindFormers refuses a folder "
        f"holding two: remove it, or write {dst} to another folder\n")
    other.unlink()
    report = out / "x_quant_model_description.json"
    named = cli("convert", src, dst, "--scheme", "w8a8-dynamic", "--report", report)
    assert named.exit_code == 2 and "a report of this name" in named.stderr
    assert sorted(os.listdir(out)) == []
    elsewhere = tmp_path / report.name  # MindFormers reads the output's folder alone
    assert cli("convert", src, dst, "--scheme", "w8a8-dynamic", "-q", "--report",
               elsewhere).exit_code == 0 and elsewhere.exists()
    other.write_text("{}")
    checked = cli("verify", src, dst)
    assert checked.exit_code == 1 and ("quantization_description.json: is another quantization "
                                       "description beside the output") in checked.stdout


def test_a_failed_output_rename_puts_back_what_the_others_replaced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The report and description are renamed first, the output last: when its rename failed,
    the two were removed, the earlier run's report and description with them."""
    _, _, src = qwen3(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    dst, report = out / "model.safetensors", out / "report.json"
    assert cli("convert", src, dst, "--scheme", "w8a8-dynamic", "-q",
               "--report", report).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = os.replace

    def failing(a, b, **kwargs):
        if os.fspath(b) == os.fspath(dst):
            raise OSError(errno.EIO, "Input/output error")
        return real(a, b, **kwargs)
    monkeypatch.setattr(os, "replace", failing)
    # Another selection (layer 0 kept): another description, and another report.
    again = ["convert", src, dst, "--scheme", "w8a8-dynamic", "--overwrite", "--blacklist",
             "layers.0.", "--report", report]
    result = cli(*again)
    assert result.exit_code == 2 and result.stderr == (f"error: {dst}: cannot write: "
                                                       "Input/output error\n")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temporary file either
    # Where no hard link can be made, what was replaced cannot be put back: it is removed,
    # never left beside an output it does not describe.
    monkeypatch.setattr(os, "link", lambda *a, **k: (_ for _ in ()).throw(
        OSError(errno.EPERM, "Operation not permitted")))
    assert cli(*again).exit_code == 2
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    # A report named as the kept copy of the output once was: the report it is.
    named = out / "model.safetensors.earlier"
    assert cli("convert", src, dst, "--scheme", "w8a8-dynamic", "--overwrite", "-q",
               "--report", named).exit_code == 0
    assert json.loads(named.read_text())["tool"] == "ckpt-rtn"


def sharded_qwen3(tmp_path: Path) -> Path:
    """Two shards, the second holding only layer 1, an index, config.json and a tokenizer."""
    model = MODELS["qwen3"]()
    arrays = arrays_of(model)
    src = tmp_path / "src"
    src.mkdir()
    second = [n for n in model.tensors if n.startswith("model.layers.1.")]
    first = [n for n in model.tensors if n not in second]
    shards = {"model-00001-of-00002.safetensors": first,
              "model-00002-of-00002.safetensors": second}
    for shard, names in shards.items():
        write_safetensors(src / shard, model, arrays, names)
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: s for s, names in shards.items() for n in names}}))
    (src / "config.json").write_text('{"model_type": "qwen3"}')
    (src / "tokenizer.json").write_text("{}")
    return src


def test_overwrite_removes_what_the_earlier_run_wrote_and_this_one_does_not(
        tmp_path: Path) -> None:
    """--overwrite of a w8a8-dynamic directory by a w8a16 run of a one-shard SRC: the earlier
    shards, index, config and description stayed beside the new output, exit 0 (MindFormers
    loads every *.safetensors there, and the description). They are removed before anything
    is written; a file of the user's, one changed since, and one the manifest places outside
    DST stay."""
    src, dst = sharded_qwen3(tmp_path), tmp_path / "dst"
    assert cli("convert", src, dst, "--scheme", "w8a8-dynamic", "-q").exit_code == 0
    (dst / "notes.txt").write_text("mine")
    (dst / "tokenizer.json").write_text('{"edited": 1}')
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    manifest = json.loads((dst / MANIFEST).read_text())
    manifest["files"]["../outside.txt"] = {"size": 1, "sha256": sha256_of(str(outside))}
    (dst / MANIFEST).write_text(json.dumps(manifest))
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(src / "model-00001-of-00002.safetensors", other / "model.safetensors")

    result = cli("convert", other, dst, "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert "removed 5 files of the earlier output" in result.stdout
    assert sorted(os.listdir(dst)) == [MANIFEST, "model.safetensors", "notes.txt",
                                       "tokenizer.json"]
    assert outside.read_text() == "x"
    differences = cli("verify", other, dst)
    assert differences.exit_code == 1
    assert re.findall(r"^  (\S+): extra file", differences.stdout, re.M) == [
        "notes.txt", "tokenizer.json"]


def test_directory_description_is_the_final_runs(tmp_path: Path) -> None:
    """Parts write no description; the run that completes the directory writes it once,
    from every shard's tensors, and records it in the manifest; verify checks it."""
    src, dst = sharded_qwen3(tmp_path), tmp_path / "dst"
    for part in ("0/2", "1/2"):
        result = cli("convert", src, dst, "--scheme", "w8a8-dynamic", "--part", part, "-q")
        assert result.exit_code == 0, result.stderr
        assert not (dst / NAME).exists()
    result = cli("convert", src, dst, "--scheme", "w8a8-dynamic", "--resume", "-q")
    assert result.exit_code == 0, result.stderr
    names = []
    for shard in sorted(dst.glob("*.safetensors")):
        with open_reader(shard) as reader:
            names += [t.name for t in reader.tensors]
    described = json.loads((dst / NAME).read_text())
    assert sorted(described) == sorted(names)
    assert described["model.layers.1.mlp.down_proj.weight_scale"] == W8A8_DYNAMIC
    assert (dst / "config.json").read_text() == '{"model_type": "qwen3"}'
    assert (dst / "tokenizer.json").exists()
    manifest = json.loads((dst / "ckpt-rtn-manifest.json").read_text())
    assert NAME in manifest["files"]
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(names)
    assert cli("verify", src, dst, "-q").exit_code == 0

    (dst / NAME).unlink()
    missing = cli("verify", src, dst)
    assert missing.exit_code == 1 and f"{NAME}: missing" in missing.stdout


def test_directory_dry_run_counts_the_description(tmp_path: Path) -> None:
    src, dst = sharded_qwen3(tmp_path), tmp_path / "dst"
    planned = cli("convert", src, dst, "--scheme", "w8a8-dynamic", "--dry-run")
    assert planned.exit_code == 0, planned.stderr
    assert f"{NAME}" in planned.stdout.splitlines()[-2]
    size = int(re.search(r"output: (\d+) bytes", planned.stdout).group(1))
    assert cli("convert", src, dst, "--scheme", "w8a8-dynamic", "-q").exit_code == 0
    assert size == sum(p.stat().st_size for p in dst.iterdir() if p.name != MANIFEST)


def test_directory_refusals(tmp_path: Path) -> None:
    src = sharded_qwen3(tmp_path)
    (src / NAME).write_text("{}")
    result = cli("convert", src, tmp_path / "dst", "--scheme", "w8a8-dynamic")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {src / NAME}: is a quantization description")
    assert not (tmp_path / "dst").exists()


@pytest.mark.parametrize("scheme", ["w8a8-dynamic", "w4a8-dynamic"])
@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_mindformers_legacy_names_are_refused(tmp_path: Path, scheme: str, suffix: str) -> None:
    """A MindFormers Llama2 checkpoint (`attention.wq`) converted with exit 0 and a
    description: no Mcore network loads those names, so no loader could take the output."""
    src, dst = tmp_path / f"llama2{suffix}", tmp_path / "out" / "model.safetensors"
    weights = {k: v.astype(np.float16) for k, v in llama_weights().items()}
    if suffix == ".safetensors":
        save_file(weights, str(src))
    else:
        write_ckpt(src, weights)
    dst.parent.mkdir()
    result = cli("convert", src, dst, "--scheme", scheme)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "the llama2 rules select MindFormers-style names" in result.stderr and "w8a16" in result.stderr
    assert os.listdir(dst.parent) == []


def test_a_rules_file_says_whose_names_it_holds(tmp_path: Path) -> None:
    """`naming` takes two values, and says nothing when left out."""
    rules = tmp_path / "mine.yaml"
    rules.write_text("family: mine\nnaming: mindformer\nlinear_weights: ['wq']\n")
    with pytest.raises(ConfigError, match="naming must be mindformers or hugging-face"):
        load_rules(rules)
    rules.write_text("family: mine\nlinear_weights: ['wq']\n")
    assert load_rules(rules).naming is None
    assert load_rules("hf-llama").naming == "hugging-face"


@pytest.mark.skipif(importlib.util.find_spec("mindformers") is None,
                    reason="needs the mindspore extra (MindFormers 1.9)")
@pytest.mark.parametrize("params_dtype", ["bfloat16", "float16"])
def test_mindformers_mcore_qwen3_loads_it(tmp_path: Path, params_dtype: str) -> None:
    """MindFormers' InferenceQwen3ForCausalLM (use_legacy False, quantization golden-stick,
    CPU) builds from the description and loads the directory with its own load_weights:
    every parameter holds what ckpt-rtn wrote (q, k, v and gate, up fused by the loader),
    int8 codes and scales alike, and codes times scales are within half a step of the FP
    weights (plus the bfloat16 roundings of Golden Stick's arithmetic: SLACK). Running the network needs Ascend (its QuantBatchMatmul and DynamicQuant have
    no CPU kernels); loading does not."""
    model, arrays, src = qwen3(tmp_path)
    out = tmp_path / "qwen3-w8a8"
    out.mkdir()
    result = cli("convert", src, out / "model.safetensors", "--scheme", "w8a8-dynamic", "-q")
    assert result.exit_code == 0, result.stderr
    with open_reader(out / "model.safetensors") as reader:
        written = {t.name: reader.read(t) for t in reader.tensors}

    loaded = mcore_load("qwen3", out, params_dtype, tmp_path)

    def fp(name: str) -> np.ndarray:
        return bf16_to_float32(written[name]) if written[name].dtype == np.uint16 \
            else written[name].astype(np.float32)

    expected: Dict[str, np.ndarray] = {
        "model.embedding.word_embeddings.weight": fp("model.embed_tokens.weight"),
        "model.decoder.final_layernorm.weight": fp("model.norm.weight")}
    for i in range(2):
        hf, mc = f"model.layers.{i}.", f"model.decoder.layers.{i}."
        att, mlp = hf + "self_attn.", hf + "mlp."
        fused = {"self_attention.linear_qkv": [att + "q_proj", att + "k_proj", att + "v_proj"],
                 "self_attention.linear_proj": [att + "o_proj"],
                 "mlp.linear_fc1": [mlp + "gate_proj", mlp + "up_proj"],
                 "mlp.linear_fc2": [mlp + "down_proj"]}
        for layer, parts in fused.items():
            expected[f"{mc}{layer}.weight"] = np.concatenate([written[p + ".weight"]
                                                              for p in parts])
            expected[f"{mc}{layer}.w_scale"] = np.concatenate([fp(p + ".weight_scale")
                                                               for p in parts])
            codes, scale = expected[f"{mc}{layer}.weight"], expected[f"{mc}{layer}.w_scale"]
            original = np.concatenate([bf16_to_float32(arrays[p + ".weight"]) for p in parts])
            assert within_a_step(codes, scale, original, FloatFormat.BFLOAT16), layer
        for mf_name, hf_name in [("input_layernorm", "input_layernorm"),
                                 ("pre_mlp_layernorm", "post_attention_layernorm"),
                                 ("self_attention.q_layernorm", "self_attn.q_norm"),
                                 ("self_attention.k_layernorm", "self_attn.k_norm")]:
            expected[f"{mc}{mf_name}.weight"] = fp(f"{hf}{hf_name}.weight")

    assert sorted(loaded) == sorted(expected)
    for name, value in expected.items():  # float tensors as the network's dtype holds them
        got = loaded[name]
        assert got.dtype == np.int8 if value.dtype == np.int8 else got.dtype.kind == "f", name
        assert np.array_equal(got, value.astype(got.dtype)), name
