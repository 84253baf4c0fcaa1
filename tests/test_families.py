"""Each built-in family config selects exactly the Linear weights of that family.

The synthetic checkpoints use each family's real MindFormers parameter names and
shapes (two layers): see the comment header of configs/<family>.yaml for where
the names come from. Where the installed mindformers still ships the network
(Llama, ChatGLM2/3), the selection is also compared with the network's own
`mindformers.modules.layers.Linear` cells, the exact type Golden Stick wraps.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

from ckpt_rtn import dtypes, formats
from ckpt_rtn.converter import make_plan
from ckpt_rtn.errors import ConfigError, QuantizationError
from ckpt_rtn.formats.tensor import TensorInfo
from ckpt_rtn.rules import IN_OUT, OUT_IN, available_families, detect_family, load_rules

from conftest import llama_shapes

Shapes = Dict[str, Tuple[int, ...]]

H, KV, FFN, VOCAB = 64, 32, 96, 128  # hidden, GQA kv width, FFN width, vocabulary


def llama2_shapes(qkv_concat: bool = False) -> Shapes:
    return llama_shapes(layers=2, hidden=H, kv=KV, ffn=FFN, vocab=VOCAB, qkv_concat=qkv_concat)


def baichuan2_shapes() -> Shapes:
    """Baichuan2 under MindFormers: Llama's names (MHA: wk/wv are [hidden, hidden])."""
    return llama_shapes(layers=2, hidden=H, kv=H, ffn=FFN, vocab=125)


def chatglm3_shapes(concat: bool = True) -> Shapes:
    """ChatGLM2ForConditionalGeneration, multi-query attention with 2 groups."""
    shapes: Shapes = {"transformer.embedding.embedding_weight": (VOCAB, H)}
    for i in range(2):
        p = f"transformer.encoder.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (H,)
        if concat:
            shapes[p + "self_attention.query_key_value.weight"] = (H + 2 * KV, H)
            shapes[p + "self_attention.query_key_value.bias"] = (H + 2 * KV,)
        else:
            for name, out in (("wq", H), ("wk", KV), ("wv", KV)):
                shapes[p + f"self_attention.{name}.weight"] = (out, H)
                shapes[p + f"self_attention.{name}.bias"] = (out,)
        shapes[p + "self_attention.dense.weight"] = (H, H)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
        if concat:
            shapes[p + "mlp.dense_h_to_4h.weight"] = (2 * FFN, H)
        else:
            shapes[p + "mlp.dense_left.weight"] = (FFN, H)
            shapes[p + "mlp.dense_right.weight"] = (FFN, H)
        shapes[p + "mlp.dense_4h_to_h.weight"] = (H, FFN)
    shapes["transformer.encoder.final_layernorm.weight"] = (H,)
    shapes["transformer.output_layer.weight"] = (VOCAB, H)
    return shapes


def qwen_shapes() -> Shapes:
    """QwenForCausalLM (research/qwen): q/k/v carry biases."""
    shapes: Shapes = {"transformer.wte.embedding_weight": (VOCAB, H)}
    for i in range(2):
        p = f"transformer.layers.{i}."
        shapes[p + "attention_norm.weight"] = (H,)
        for name in ("wq", "wk", "wv"):
            shapes[p + f"attention.{name}.weight"] = (H, H)
            shapes[p + f"attention.{name}.bias"] = (H,)
        shapes[p + "attention.wo.weight"] = (H, H)
        shapes[p + "ffn_norm.weight"] = (H,)
        shapes[p + "feed_forward.w1.weight"] = (FFN, H)
        shapes[p + "feed_forward.w3.weight"] = (FFN, H)
        shapes[p + "feed_forward.w2.weight"] = (H, FFN)
    shapes["transformer.ln_f.weight"] = (H,)
    shapes["lm_head.weight"] = (VOCAB, H)
    return shapes


def gpt2_shapes(score: bool = False) -> Shapes:
    """GPT2LMHeadModel: FFN weights and the attention output are [in, out]."""
    shapes: Shapes = {"backbone.embedding.word_embedding.embedding_table": (VOCAB, H),
                      "backbone.embedding.position_embedding.embedding_table": (32, H)}
    for i in range(2):
        p = f"backbone.blocks.{i}."
        shapes[p + "layernorm1.gamma"] = (H,)
        shapes[p + "layernorm1.beta"] = (H,)
        for name in ("dense1", "dense2", "dense3", "projection"):
            shapes[p + f"attention.{name}.weight"] = (H, H)
            shapes[p + f"attention.{name}.bias"] = (H,)
        shapes[p + "layernorm2.gamma"] = (H,)
        shapes[p + "layernorm2.beta"] = (H,)
        shapes[p + "output.mapping.weight"] = (H, 4 * H)      # [in, out]
        shapes[p + "output.mapping.bias"] = (4 * H,)
        shapes[p + "output.projection.weight"] = (4 * H, H)   # [in, out]
        shapes[p + "output.projection.bias"] = (H,)
    shapes["backbone.layernorm.gamma"] = (H,)
    shapes["backbone.layernorm.beta"] = (H,)
    if score:  # GPT2ForSequenceClassification's head
        shapes["score.weight"] = (2, H)
    return shapes


EXPECTED = {
    "llama2": {
        "model.layers.0.attention.wq.weight", "model.layers.0.attention.wk.weight",
        "model.layers.0.attention.wv.weight", "model.layers.0.attention.wo.weight",
        "model.layers.0.feed_forward.w1.weight", "model.layers.0.feed_forward.w2.weight",
        "model.layers.0.feed_forward.w3.weight",
        "model.layers.1.attention.wq.weight", "model.layers.1.attention.wk.weight",
        "model.layers.1.attention.wv.weight", "model.layers.1.attention.wo.weight",
        "model.layers.1.feed_forward.w1.weight", "model.layers.1.feed_forward.w2.weight",
        "model.layers.1.feed_forward.w3.weight",
    },
    "llama2-concat": {
        "model.layers.0.attention.w_qkv.weight", "model.layers.0.attention.wo.weight",
        "model.layers.0.feed_forward.w_gate_hidden.weight", "model.layers.0.feed_forward.w2.weight",
        "model.layers.1.attention.w_qkv.weight", "model.layers.1.attention.wo.weight",
        "model.layers.1.feed_forward.w_gate_hidden.weight", "model.layers.1.feed_forward.w2.weight",
    },
    # Baichuan2 under MindFormers has exactly Llama2's Linear names (its head is a NormHead).
    "baichuan2": None,
    "chatglm3": {
        "transformer.encoder.layers.0.self_attention.query_key_value.weight",
        "transformer.encoder.layers.0.self_attention.dense.weight",
        "transformer.encoder.layers.0.mlp.dense_h_to_4h.weight",
        "transformer.encoder.layers.0.mlp.dense_4h_to_h.weight",
        "transformer.encoder.layers.1.self_attention.query_key_value.weight",
        "transformer.encoder.layers.1.self_attention.dense.weight",
        "transformer.encoder.layers.1.mlp.dense_h_to_4h.weight",
        "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight",
    },
    "chatglm3-split": {
        "transformer.encoder.layers.0.self_attention.wq.weight",
        "transformer.encoder.layers.0.self_attention.wk.weight",
        "transformer.encoder.layers.0.self_attention.wv.weight",
        "transformer.encoder.layers.0.self_attention.dense.weight",
        "transformer.encoder.layers.0.mlp.dense_left.weight",
        "transformer.encoder.layers.0.mlp.dense_right.weight",
        "transformer.encoder.layers.0.mlp.dense_4h_to_h.weight",
        "transformer.encoder.layers.1.self_attention.wq.weight",
        "transformer.encoder.layers.1.self_attention.wk.weight",
        "transformer.encoder.layers.1.self_attention.wv.weight",
        "transformer.encoder.layers.1.self_attention.dense.weight",
        "transformer.encoder.layers.1.mlp.dense_left.weight",
        "transformer.encoder.layers.1.mlp.dense_right.weight",
        "transformer.encoder.layers.1.mlp.dense_4h_to_h.weight",
    },
    "qwen": {
        "transformer.layers.0.attention.wq.weight", "transformer.layers.0.attention.wk.weight",
        "transformer.layers.0.attention.wv.weight", "transformer.layers.0.attention.wo.weight",
        "transformer.layers.0.feed_forward.w1.weight", "transformer.layers.0.feed_forward.w2.weight",
        "transformer.layers.0.feed_forward.w3.weight",
        "transformer.layers.1.attention.wq.weight", "transformer.layers.1.attention.wk.weight",
        "transformer.layers.1.attention.wv.weight", "transformer.layers.1.attention.wo.weight",
        "transformer.layers.1.feed_forward.w1.weight", "transformer.layers.1.feed_forward.w2.weight",
        "transformer.layers.1.feed_forward.w3.weight",
    },
    "gpt2": {
        "backbone.blocks.0.attention.dense1.weight", "backbone.blocks.0.attention.dense2.weight",
        "backbone.blocks.0.attention.dense3.weight", "backbone.blocks.0.attention.projection.weight",
        "backbone.blocks.0.output.mapping.weight", "backbone.blocks.0.output.projection.weight",
        "backbone.blocks.1.attention.dense1.weight", "backbone.blocks.1.attention.dense2.weight",
        "backbone.blocks.1.attention.dense3.weight", "backbone.blocks.1.attention.projection.weight",
        "backbone.blocks.1.output.mapping.weight", "backbone.blocks.1.output.projection.weight",
    },
}

#: (case, family config, the checkpoint's names and shapes, the family auto-detection picks)
CASES = [
    ("llama2", "llama2", llama2_shapes(), "llama2"),
    ("llama2-concat", "llama2", llama2_shapes(qkv_concat=True), "llama2"),
    # Baichuan2's MindFormers names are Llama2's: detection picks llama2 (same selection).
    ("baichuan2", "baichuan2", baichuan2_shapes(), "llama2"),
    ("chatglm3", "chatglm3", chatglm3_shapes(), "chatglm3"),
    ("chatglm3-split", "chatglm3", chatglm3_shapes(concat=False), "chatglm3"),
    ("qwen", "qwen", qwen_shapes(), "qwen"),
    ("gpt2", "gpt2", gpt2_shapes(), "gpt2"),
]
EXPECTED["baichuan2"] = EXPECTED["llama2"]

#: The [in, out] weights; every other selected weight is [out, in].
IN_OUT_WEIGHTS = {n for n in EXPECTED["gpt2"] if ".projection." in n or ".mapping." in n}


def write_checkpoint(path: Path, shapes: Shapes) -> Path:
    infos = [TensorInfo.of(name, dtypes.FLOAT16, shape) for name, shape in shapes.items()]
    with formats.open_writer(path, infos, format="ckpt", metadata={}) as writer:
        for info in infos:
            writer.write(info.name, np.zeros(info.shape, np.float16))
    return path


def quantized_names(path: Path, family: str) -> List[str]:
    with formats.open_reader(path) as reader:
        plan = make_plan(reader, load_rules(family), "ckpt")
    return [s.source.name for s in plan.quantized]


def test_every_family_has_a_config():
    assert {"llama2", "baichuan2", "chatglm3", "qwen", "gpt2"} <= set(available_families())
    for family in available_families():
        assert load_rules(family).family == family


@pytest.mark.parametrize("case,family,shapes,detected", CASES, ids=[c[0] for c in CASES])
def test_family_quantizes_exactly_its_linear_weights(tmp_path, case, family, shapes, detected):
    path = write_checkpoint(tmp_path / f"{case}.ckpt", shapes)
    names = quantized_names(path, family)
    assert len(names) == len(set(names))
    assert set(names) == EXPECTED[case]
    # The family is told from the tensor names alone, and that family's rules agree.
    assert detect_family(shapes).family == detected
    assert set(quantized_names(path, detected)) == EXPECTED[case]


@pytest.mark.parametrize("case,family,shapes,detected", CASES, ids=[c[0] for c in CASES])
def test_layouts(case, family, shapes, detected):
    """[in, out] only where MindFormers builds the Linear with transpose_b=False."""
    rules = load_rules(family)
    for name in EXPECTED[case]:
        selection = rules.select(TensorInfo.of(name, dtypes.FLOAT16, shapes[name]))
        assert selection is not None and selection.layer == name[:-len(".weight")]
        assert selection.layout == (IN_OUT if name in IN_OUT_WEIGHTS else OUT_IN), name


def test_gpt2_in_out_weights_get_per_output_channel_scales(tmp_path):
    path = write_checkpoint(tmp_path / "gpt2.ckpt", gpt2_shapes())
    with formats.open_reader(path) as reader:
        plan = make_plan(reader, load_rules("gpt2"), "ckpt")
    for step in plan.quantized:
        rows, cols = step.source.shape
        out_channels = cols if step.source.name in IN_OUT_WEIGHTS else rows
        weight, scale, zp_neg = step.outputs
        assert weight.shape == step.source.shape  # int8 codes keep the stored layout
        assert scale.shape == zp_neg.shape == (out_channels,), step.source.name


@pytest.mark.parametrize("family,head", [("llama2", "lm_head.weight"),
                                         ("qwen", "lm_head.weight"),
                                         ("chatglm3", "transformer.output_layer.weight"),
                                         ("gpt2", "score.weight")])
def test_output_head_is_a_linear_blacklisted_by_default(family, head):
    rules = load_rules(family)
    info = TensorInfo.of(head, dtypes.FLOAT16, (VOCAB, H))
    assert rules.select(info) is None
    assert rules.with_overrides(keep_default_blacklist=False).select(info) is not None


def test_baichuan2_norm_head_is_not_a_linear():
    """NormHead's weight is a bare Parameter: never quantized, even without the blacklist."""
    rules = load_rules("baichuan2").with_overrides(keep_default_blacklist=False)
    assert rules.select(TensorInfo.of("lm_head.weight", dtypes.FLOAT16, (125, H))) is None


def test_gpt2_lm_head_is_tied_to_the_embedding():
    rules = load_rules("gpt2").with_overrides(keep_default_blacklist=False)
    for name, shape in gpt2_shapes().items():
        if "embedding" in name or "layernorm" in name or name.endswith(".bias"):
            assert rules.select(TensorInfo.of(name, dtypes.FLOAT16, shape)) is None, name


@pytest.mark.parametrize("names", [
    # No family's markers: Mixtral under Hugging Face names, BERT-style names.
    ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
     "model.layers.0.block_sparse_moe.gate.weight",
     "model.layers.0.block_sparse_moe.experts.0.w1.weight", "lm_head.weight"],
    ["bert.encoder.layer.0.attention.self.query.weight", "cls.predictions.decoder.weight"],
    # Only some of a family's markers (attention but no feed-forward).
    ["model.layers.0.attention.wq.weight", "model.norm_out.weight"],
    # Two families' markers at once.
    list(llama2_shapes()) + list(chatglm3_shapes()),
    list(qwen_shapes()) + list(gpt2_shapes()),
], ids=["hf-mixtral", "bert", "partial-llama", "llama+chatglm", "qwen+gpt2"])
def test_undetectable_checkpoints_are_refused(names):
    with pytest.raises(ConfigError, match="cannot tell the model family"):
        detect_family(names)


# --- against the real MindFormers networks the installed wheel still ships ----------------

def _network_linears(net) -> Tuple[Dict[str, Tuple[int, ...]], Dict[str, bool]]:
    """The float parameters' shapes, and each exact-Linear weight's transpose_b."""
    from mindformers.modules.layers import Linear
    shapes = {name: tuple(p.shape) for name, p in net.parameters_and_names()
              if p.dtype in _ms_floats()}
    linears = {f"{name}.weight": cell.transpose_b for name, cell in net.cells_and_names()
               if type(cell) is Linear}  # Golden Stick matches the exact type
    return shapes, linears


def _ms_floats():
    import mindspore as ms
    return (ms.float16, ms.float32, ms.bfloat16)


def _assert_config_matches_network(family: str, net) -> None:
    shapes, linears = _network_linears(net)
    rules = load_rules(family)
    selected = {}
    for name, shape in shapes.items():
        selection = rules.select(TensorInfo.of(name, dtypes.FLOAT32, shape))
        if selection is not None:
            selected[name] = selection.layout
    expected = {n for n in linears if not rules.is_blacklisted(n[:-len(".weight")])}
    assert set(selected) == expected
    for name, layout in selected.items():
        assert layout == (OUT_IN if linears[name] else IN_OUT), name
    assert detect_family(shapes).family == family


@pytest.mark.parametrize("qkv_concat", [False, True])
def test_llama2_matches_mindformers_network(qkv_concat):
    mindformers = pytest.importorskip("mindformers")
    net = mindformers.LlamaForCausalLM(mindformers.LlamaConfig(
        batch_size=1, seq_length=32, hidden_size=H, num_layers=2, num_heads=4, n_kv_heads=2,
        vocab_size=VOCAB, intermediate_size=FFN, use_past=False, qkv_concat=qkv_concat,
        compute_dtype="float32", param_init_type="float32"))
    _assert_config_matches_network("llama2", net)
    shapes, _ = _network_linears(net)
    assert {n: s for n, s in shapes.items() if "cache" not in n} == llama2_shapes(qkv_concat)


@pytest.mark.parametrize("concat", [False, True])
def test_chatglm3_matches_mindformers_network(concat):
    pytest.importorskip("mindformers")
    from mindformers.models.glm2 import ChatGLM2Config, ChatGLM2ForConditionalGeneration
    net = ChatGLM2ForConditionalGeneration(ChatGLM2Config(
        batch_size=1, seq_length=32, hidden_size=H, num_layers=2, num_attention_heads=4,
        kv_channels=16, multi_query_attention=True, multi_query_group_num=2, ffn_hidden_size=FFN,
        padded_vocab_size=VOCAB, vocab_size=VOCAB, use_past=False, qkv_concat=concat,
        mlp_concat=concat, compute_dtype="float32", param_init_type="float32",
        layernorm_compute_type="float32"))
    _assert_config_matches_network("chatglm3", net)
    # and its names are the synthetic checkpoint's
    synthetic = chatglm3_shapes(concat)
    shapes, _ = _network_linears(net)
    assert {n: s for n, s in shapes.items() if "cache" not in n} == synthetic


def test_pipeline_stage_without_embeddings_is_still_llama2():
    names = ["model.layers.7.attention.wq.weight", "model.layers.7.feed_forward.w1.weight",
             "model.norm_out.weight", "lm_head.weight"]
    assert detect_family(names).family == "llama2"


def test_include_takes_the_layout_from_the_family_rules():
    gpt2 = load_rules("gpt2").with_overrides(include=[r"output\.mapping"])
    mapping = TensorInfo.of("backbone.blocks.0.output.mapping.weight", dtypes.FLOAT16, (64, 256))
    assert gpt2.select(mapping).layout == "in_out"
    unknown = TensorInfo.of("backbone.extra.weight", dtypes.FLOAT16, (64, 64))
    assert load_rules("gpt2").with_overrides(include=["extra"]).select(unknown).layout is None
    llama = load_rules("llama2").with_overrides(include=["extra"])
    assert llama.select(unknown).layout == "out_in"  # one layout in the whole family


def test_a_weight_of_unknown_layout_is_refused(tmp_path: Path):
    shapes = dict(gpt2_shapes())
    shapes["backbone.extra.weight"] = (64, 64)
    path = write_checkpoint(tmp_path / "gpt2.ckpt", shapes)
    rules = load_rules("gpt2").with_overrides(include=["extra"])
    with formats.open_reader(path) as reader:
        with pytest.raises(QuantizationError, match="'backbone.extra.weight': the rules do not "
                                                    "say whether it is stored"):
            make_plan(reader, rules, "ckpt")


def test_family_names_are_not_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A folder named like a family in the working directory changes nothing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "llama2").mkdir()
    (tmp_path / "qwen").mkdir()
    assert load_rules("llama2").family == "llama2"
    assert detect_family(list(llama2_shapes())).family == "llama2"
