"""Hugging Face-named checkpoints convert with nothing beyond SRC DST.

Each model is a tiny one (two layers, a few experts) with the real parameter
names of its network and shapes in their real relations: see the comment
headers of configs/hf-llama.yaml and configs/hf-moe.yaml for the sources. Its
builder says which tensors are Linear weights to quantize, from the model's
structure rather than from the rules, so the rules are checked against it.
The checkpoints are bfloat16, as those models ship, and written as one
safetensors file or as a sharded Hugging Face directory.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Dict, List, Set, Tuple

import numpy as np
import pytest

from ckpt_rtn import dtypes
from ckpt_rtn.errors import ConfigError
from ckpt_rtn.formats import TensorInfo, open_reader, open_writer
from ckpt_rtn.golden_stick import legacy_names
from ckpt_rtn.rules import available_families, detect_family, load_rules

from conftest import cli

VOCAB, H = 128, 64
BF16, F32 = dtypes.BFLOAT16, dtypes.FLOAT32
#: A tensor's (dtype, shape).
Spec = Tuple[dtypes.DType, Tuple[int, ...]]


class Model:
    """A checkpoint's tensors in save order, and the weights a quantizer should take."""

    def __init__(self, family: str) -> None:
        self.family = family
        self.tensors: Dict[str, Spec] = {}
        self.linears: Set[str] = set()
        #: Linear weights the family's default blacklist keeps (selected without it).
        self.kept_linears: Set[str] = set()

    def keep(self, name: str, *shape: int, dtype: dtypes.DType = BF16) -> None:
        self.tensors[name] = (dtype, shape)

    def linear(self, layer: str, out: int, inp: int, bias: bool = False,
               kept: bool = False) -> None:
        self.keep(f"{layer}.weight", out, inp)
        (self.kept_linears if kept else self.linears).add(f"{layer}.weight")
        if bias:
            self.keep(f"{layer}.bias", out)

    def mlp(self, prefix: str, ffn: int) -> None:
        self.linear(prefix + "gate_proj", ffn, H)
        self.linear(prefix + "up_proj", ffn, H)
        self.linear(prefix + "down_proj", H, ffn)


def gqa(m: Model, p: str, *, head_dim: int = 16, bias: bool = False,
        qk_norm: bool = False) -> None:
    """LlamaAttention / Qwen2Attention / Qwen3Attention: 4 query heads, 2 key/value heads."""
    m.linear(p + "self_attn.q_proj", 4 * head_dim, H, bias)
    m.linear(p + "self_attn.k_proj", 2 * head_dim, H, bias)
    m.linear(p + "self_attn.v_proj", 2 * head_dim, H, bias)
    m.linear(p + "self_attn.o_proj", H, 4 * head_dim)
    if qk_norm:
        m.keep(p + "self_attn.q_norm.weight", head_dim)
        m.keep(p + "self_attn.k_norm.weight", head_dim)


def mla(m: Model, p: str, q_lora_rank: "int | None") -> None:
    """DeepseekV3Attention: 4 heads, qk_nope 16, qk_rope 8, v_head 16, kv_lora_rank 32."""
    heads, nope, rope, v_head, kv_lora = 4, 16, 8, 16, 32
    if q_lora_rank is None:
        m.linear(p + "self_attn.q_proj", heads * (nope + rope), H)
    else:
        m.linear(p + "self_attn.q_a_proj", q_lora_rank, H)
        m.keep(p + "self_attn.q_a_layernorm.weight", q_lora_rank)
        m.linear(p + "self_attn.q_b_proj", heads * (nope + rope), q_lora_rank)
    m.linear(p + "self_attn.kv_a_proj_with_mqa", kv_lora + rope, H)
    m.keep(p + "self_attn.kv_a_layernorm.weight", kv_lora)
    # kept by hf-moe's default blacklist: MindFormers cannot load it quantized
    m.linear(p + "self_attn.kv_b_proj", heads * (nope + v_head), kv_lora, kept=True)
    m.linear(p + "self_attn.o_proj", H, heads * v_head)


def router(m: Model, p: str, experts: int, correction_bias: bool = False) -> None:
    m.keep(p + "mlp.gate.weight", experts, H)  # an [out, in] matrix, but the router
    if correction_bias:
        m.keep(p + "mlp.gate.e_score_correction_bias", experts, dtype=F32)


def routed_experts(m: Model, p: str, experts: int, ffn: int) -> None:
    for e in range(experts):
        m.mlp(f"{p}mlp.experts.{e}.", ffn)


def decoder(name: str, attention: Callable[[Model, str], None],
            feed_forward: Callable[[Model, str, int], None], *, tied: bool = False,
            extra: Callable[[Model], None] = lambda m: None) -> Model:
    """embed_tokens, two layers (attention, feed-forward of layer i, norms), norm, lm_head."""
    m = Model(name)
    m.keep("model.embed_tokens.weight", VOCAB, H)
    for i in range(2):
        p = f"model.layers.{i}."
        m.keep(p + "input_layernorm.weight", H)
        attention(m, p)
        m.keep(p + "post_attention_layernorm.weight", H)
        feed_forward(m, p, i)
    extra(m)
    m.keep("model.norm.weight", H)
    if not tied:
        m.keep("lm_head.weight", VOCAB, H)  # a Linear, kept: blacklisted by default
    return m


def dense(m: Model, p: str, _: int) -> None:
    m.mlp(p + "mlp.", 96)


def qwen3_moe_ffn(mlp_only_layers: Tuple[int, ...] = ()) -> Callable[[Model, str, int], None]:
    """Qwen3MoeSparseMoeBlock (4 experts, moe_intermediate 32), or Qwen3MoeMLP where
    mlp_only_layers says."""
    def ffn(m: Model, p: str, i: int) -> None:
        if i in mlp_only_layers:
            dense(m, p, i)
            return
        router(m, p, 4)
        routed_experts(m, p, 4, 32)
    return ffn


def qwen2_moe_ffn(m: Model, p: str, _: int) -> None:
    """Qwen2MoeSparseMoeBlock: router, 4 experts, a shared expert and its sigmoid gate."""
    router(m, p, 4)
    routed_experts(m, p, 4, 32)
    m.mlp(p + "mlp.shared_expert.", 48)
    m.keep(p + "mlp.shared_expert_gate.weight", 1, H)  # a [1, hidden] Linear: a gate, kept


def deepseek_ffn(m: Model, p: str, i: int) -> None:
    """first_k_dense_replace 1: layer 0 is DeepseekV3MLP, layer 1 DeepseekV3MoE (router
    with e_score_correction_bias, 4 routed experts, 1 shared)."""
    if i < 1:
        dense(m, p, i)
        return
    router(m, p, 4, correction_bias=True)
    routed_experts(m, p, 4, 32)
    m.mlp(p + "mlp.shared_experts.", 32)


def deepseek_mtp(m: Model) -> None:
    """The multi-token-prediction layer (num_nextn_predict_layers 1), numbered after the
    last decoder layer: a whole sparse decoder layer plus its own embedding, norms,
    projection and head, which stay as they are."""
    p = "model.layers.2."
    m.keep(p + "embed_tokens.weight", VOCAB, H)
    m.keep(p + "enorm.weight", H)
    m.keep(p + "hnorm.weight", H)
    m.keep(p + "eh_proj.weight", H, 2 * H)
    m.keep(p + "input_layernorm.weight", H)
    mla(m, p, 48)
    m.keep(p + "post_attention_layernorm.weight", H)
    deepseek_ffn(m, p, 1)
    m.keep(p + "shared_head.norm.weight", H)
    m.keep(p + "shared_head.head.weight", VOCAB, H)


MODELS: Dict[str, Callable[[], Model]] = {
    # Llama 3 / Mistral: GQA, no biases, untied head.
    "llama": lambda: decoder("hf-llama", gqa, dense),
    # Qwen2 / Qwen2.5: biases on q, k, v (renamed with their quantized Linear).
    "qwen2": lambda: decoder("hf-llama", lambda m, p: gqa(m, p, bias=True), dense),
    # Qwen3 (0.6B-4B): head_dim 32 apart from hidden/heads, q/k norms, head tied.
    "qwen3": lambda: decoder("hf-llama", lambda m, p: gqa(m, p, head_dim=32, qk_norm=True),
                             dense, tied=True),
    "qwen3-moe": lambda: decoder("hf-moe", lambda m, p: gqa(m, p, head_dim=32, qk_norm=True),
                                 qwen3_moe_ffn()),
    # mlp_only_layers [0]: layer 0 alone has exactly a dense Qwen3's names.
    "qwen3-moe-dense-first": lambda: decoder(
        "hf-moe", lambda m, p: gqa(m, p, head_dim=32, qk_norm=True), qwen3_moe_ffn((0,))),
    "qwen2-moe": lambda: decoder("hf-moe", lambda m, p: gqa(m, p, bias=True), qwen2_moe_ffn),
    "deepseek-v3": lambda: decoder("hf-moe", lambda m, p: mla(m, p, 48), deepseek_ffn,
                                   extra=deepseek_mtp),
    # q_lora_rank null: q_proj instead of q_a_proj / q_b_proj.
    "deepseek-v3-no-q-lora": lambda: decoder("hf-moe", lambda m, p: mla(m, p, None),
                                             deepseek_ffn),
}


def arrays_of(model: Model, seed: int = 0) -> Dict[str, np.ndarray]:
    """Random weights (std 0.02, norms 1) as their stored arrays (bfloat16: raw bits)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, (dtype, shape) in model.tensors.items():
        values = (np.ones(shape, np.float32) if "norm" in name
                  else (rng.standard_normal(shape) * 0.02).astype(np.float32))
        out[name] = (values.view(np.uint32) >> 16).astype(np.uint16) if dtype is BF16 else values
    return out


def write_safetensors(path: Path, model: Model, arrays: Dict[str, np.ndarray],
                      names: "List[str] | None" = None) -> None:
    names = list(model.tensors) if names is None else names
    infos = [TensorInfo.of(n, *model.tensors[n]) for n in names]
    with open_writer(path, infos, format="safetensors", metadata={"format": "pt"}) as writer:
        for name in names:
            writer.write(name, arrays[name])


def read_all(path: Path) -> Dict[str, Tuple[Spec, bytes]]:
    with open_reader(path) as reader:
        return {t.name: ((t.dtype, t.shape), reader.read(t).tobytes()) for t in reader.tensors}


def expected_output(model: Model) -> Dict[str, Spec]:
    """Each Linear weight becomes Golden Stick's three tensors (its bias renamed with it);
    everything else keeps its name, dtype and shape."""
    out: Dict[str, Spec] = {}
    for name, (dtype, shape) in model.tensors.items():
        layer, _, kind = name.rpartition(".")
        if name in model.linears:
            names = legacy_names(layer)
            out[names.weight] = (dtypes.INT8, shape)
            out[names.scale] = out[names.zp_neg] = (dtype, shape[:1])
        elif kind == "bias" and f"{layer}.weight" in model.linears:
            out[legacy_names(layer).bias] = (dtype, shape)
        else:
            out[name] = (dtype, shape)
    return out


def assert_converted(model: Model, arrays: Dict[str, np.ndarray],
                     written: Dict[str, Tuple[Spec, bytes]]) -> None:
    assert {name: spec for name, (spec, _) in written.items()} == expected_output(model)
    for name, array in arrays.items():  # routers, norms, embeddings, heads: bit for bit
        if name in written:
            assert written[name][1] == array.tobytes(), name


@pytest.mark.parametrize("case", MODELS)
def test_exactly_one_family_matches(case: str) -> None:
    model = MODELS[case]()
    names = list(model.tensors)
    assert detect_family(names).family == model.family
    assert [f for f in available_families() if load_rules(f).matches(names)] == [model.family]
    rules = load_rules(model.family)
    assert {n for n, (dtype, shape) in model.tensors.items()
            if rules.select(TensorInfo.of(n, dtype, shape)) is not None} == model.linears


@pytest.mark.parametrize("case", ["qwen3-moe", "qwen2-moe", "deepseek-v3"])
def test_routers_and_gates_are_never_selected(case: str) -> None:
    """Not the blacklist's doing: without it, only lm_head joins the selection."""
    model = MODELS[case]()
    rules = load_rules("hf-moe").with_overrides(keep_default_blacklist=False)
    selected = {n for n, (dtype, shape) in model.tensors.items()
                if rules.select(TensorInfo.of(n, dtype, shape)) is not None}
    assert selected == model.linears | model.kept_linears | {"lm_head.weight"}
    assert not any(re.search(r"\.(gate|shared_expert_gate)\.", n) for n in selected)


@pytest.mark.parametrize("case", MODELS)
def test_file_converts_with_no_option(tmp_path: Path, case: str) -> None:
    model = MODELS[case]()
    arrays = arrays_of(model)
    src, dst = tmp_path / "model.safetensors", tmp_path / "w8.safetensors"
    write_safetensors(src, model, arrays)

    planned = cli("convert", src, tmp_path / "planned.safetensors", "--dry-run")
    assert planned.exit_code == 0, planned.stderr
    rows = [line.split()[0] for line in planned.stdout.splitlines()[1:-1]]
    assert sorted(rows) == sorted(model.linears)
    assert not (tmp_path / "planned.safetensors").exists()

    result = cli("convert", src, dst)
    assert result.exit_code == 0, result.stderr
    assert f": {model.family} w8a16: quantized {len(model.linears)} tensors" in result.stdout
    assert_converted(model, arrays, read_all(dst))
    assert (f"{len(model.linears)} of {len(model.tensors)} tensors would be quantized "
            f"({model.family} rules") in planned.stdout
    assert f"output safetensors: {dst.stat().st_size} bytes" in planned.stdout

    assert_refused_as_quantized(model, dst, tmp_path / "again.safetensors")


def assert_refused_as_quantized(model, converted: Path, again: Path) -> None:
    """Converting an output again is one line naming it as quantized; nothing is written."""
    result = cli("convert", converted, again)
    assert result.exit_code == 2 and not again.exists()
    assert result.stderr.startswith(f"error: {converted}: is already quantized (w8a16, "
                                    f"{len(model.linears)} Linear layers): "), result.stderr
    assert len(result.stderr.splitlines()) == 1


def shard_of(name: str) -> int:
    """Shard 1: embeddings, final norm, head (nothing to quantize); 2: MLP weights only,
    routers and experts included; 3: attention and the layers' norms."""
    if ".layers." not in name:
        return 1
    return 2 if ".mlp." in name else 3


def write_sharded(directory: Path, model: Model, arrays: Dict[str, np.ndarray],
                  shard: Callable[[str], int] = shard_of) -> List[List[str]]:
    """A Hugging Face sharded directory: model-0000K-of-0000N.safetensors, its index,
    config.json. Returns each shard's names."""
    directory.mkdir()
    shards: Dict[int, List[str]] = {}
    for name in model.tensors:
        shards.setdefault(shard(name), []).append(name)
    count = len(shards)
    weight_map = {}
    for k, (_, names) in enumerate(sorted(shards.items()), 1):
        file = f"model-{k:05d}-of-{count:05d}.safetensors"
        write_safetensors(directory / file, model, arrays, names)
        weight_map.update(dict.fromkeys(names, file))
    total = sum(a.nbytes for a in arrays.values())
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    (directory / "config.json").write_text('{"architectures": ["tiny"]}\n')
    return [names for _, names in sorted(shards.items())]


def read_directory(directory: Path) -> Tuple[Dict[str, Tuple[Spec, bytes]], Dict[str, str]]:
    """Every shard's tensors, and which shard holds each."""
    tensors, on_disk = {}, {}
    for path in sorted(directory.glob("*.safetensors")):
        written = read_all(path)
        tensors.update(written)
        on_disk.update(dict.fromkeys(written, path.name))
    return tensors, on_disk


@pytest.mark.parametrize("case", MODELS)
def test_directory_family_is_detected_across_shards(tmp_path: Path, case: str) -> None:
    model = MODELS[case]()
    arrays = arrays_of(model)
    src, out = tmp_path / "src", tmp_path / "out"
    shards = write_sharded(src, model, arrays)
    for names in shards:  # no shard tells the family alone
        with pytest.raises(ConfigError, match="cannot tell the model family"):
            detect_family(names)

    result = cli("convert", src, out)
    assert result.exit_code == 0, result.stderr
    assert f"converted 3 shards ({len(model.linears)} tensors quantized)" in result.stdout
    written, on_disk = read_directory(out)
    assert_converted(model, arrays, written)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == on_disk
    assert (out / "config.json").read_text() == (src / "config.json").read_text()

    # The first output shard holds no quantized layer: only all of them show it.
    assert_refused_as_quantized(model, out, tmp_path / "again")


def test_moe_whose_first_shard_looks_dense_is_moe(tmp_path: Path) -> None:
    """Qwen3-MoE with mlp_only_layers [0], sharded by layer: the first shard alone has a
    dense Qwen3's names, so detecting from it would leave every expert unquantized."""
    model = MODELS["qwen3-moe-dense-first"]()
    arrays = arrays_of(model)
    shards = write_sharded(tmp_path / "src", model, arrays,
                           lambda name: 1 if name.startswith(("model.embed", "model.layers.0."))
                           else 2)
    assert detect_family(shards[0]).family == "hf-llama"
    result = cli("convert", tmp_path / "src", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    written, _ = read_directory(tmp_path / "out")
    assert_converted(model, arrays, written)
    assert "model.layers.1.mlp.experts.3.down_proj._handler.weight" in written


def mixtral() -> Model:
    """MixtralForCausalLM's names (block_sparse_moe, experts w1 w2 w3): no built-in family."""
    m = Model("custom")
    m.keep("model.embed_tokens.weight", VOCAB, H)
    for i in range(2):
        p = f"model.layers.{i}."
        m.keep(p + "input_layernorm.weight", H)
        for proj, out in (("q_proj", H), ("k_proj", 32), ("v_proj", 32), ("o_proj", H)):
            m.keep(f"{p}self_attn.{proj}.weight", out, H)
        m.keep(p + "post_attention_layernorm.weight", H)
        m.keep(p + "block_sparse_moe.gate.weight", 4, H)
        for e in range(4):
            q = f"{p}block_sparse_moe.experts.{e}."
            m.linear(q + "w1", 96, H)
            m.linear(q + "w2", H, 96)
            m.linear(q + "w3", 96, H)
    m.keep("model.norm.weight", H)
    m.keep("lm_head.weight", VOCAB, H)
    return m


def test_include_works_on_a_directory_of_no_known_family(tmp_path: Path) -> None:
    model = mixtral()
    arrays = arrays_of(model)
    src = tmp_path / "src"
    write_sharded(src, model, arrays)
    refused = cli("convert", src, tmp_path / "refused")
    assert refused.exit_code == 2 and not (tmp_path / "refused").exists()
    assert refused.stderr == (f"error: {src}: cannot tell the model family from the tensor "
                              "names (matches: none); pass --config FAMILY or a YAML file, or "
                              "--include REGEX\n")

    result = cli("convert", "--include", r"\.experts\.\d+\.w[123]\.weight$", src,
                 tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert f"({len(model.linears)} tensors quantized)" in result.stdout
    written, _ = read_directory(tmp_path / "out")
    assert_converted(model, arrays, written)


def test_help_lists_the_families() -> None:
    result = cli("convert", "--help")
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert f"a built-in family ({', '.join(available_families())})" in text
    assert {"hf-llama", "hf-moe"} <= set(available_families())
