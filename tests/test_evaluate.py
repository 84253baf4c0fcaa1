"""Perplexity and generation of the real SmolLM2 model through MindFormers, FP vs W8A16."""
from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from ckpt_rtn.tasks import wikitext
from ckpt_rtn.tasks.corpora import wiki_text
from ckpt_rtn.errors import ConfigError, FormatError
from ckpt_rtn.runtime.evaluate import Evaluator, in_fresh_process, next_token_nll, tokenize, windows
from ckpt_rtn.models import load_model_config, load_tokenizer

from conftest import FIXTURES, cli

SEQ = 128
#: The WikiText-2 validation split (shared/data; a user elsewhere downloads it).
WIKI_VALID = FIXTURES.parents[1] / "data" / "wikitext-2" / "wiki.valid.tokens"


@pytest.fixture(scope="module")
def model(smollm2: Path, tmp_path_factory: pytest.TempPathFactory):
    """The imported model, its W8A16 conversion, and a slice of Wikipedia prose."""
    root = tmp_path_factory.mktemp("eval")
    w8 = root / "w8a16.ckpt"
    result = cli("convert", smollm2.parent / "model.ckpt", w8, "-q")
    assert result.exit_code == 0, result.stderr
    text = root / "wiki.txt"
    text.write_text(wiki_text()[:20000], encoding="utf-8")
    return smollm2, w8, text


@pytest.fixture(scope="module")
def fp_evaluator(model):
    config = load_model_config(model[0])
    return Evaluator(config, config.checkpoint_path, SEQ)


@pytest.fixture(scope="module")
def slice_windows(model):
    config = load_model_config(model[0])
    return windows(tokenize(config, model[2].read_text(encoding="utf-8")), SEQ, 4 * SEQ)


def test_nll_is_the_log_softmax_of_the_next_token() -> None:
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.1, 0.8], [1, 1, 1]], np.float32))
    np.testing.assert_allclose(next_token_nll(logits, np.array([0, 2, 1])),
                               [-math.log(0.25), -math.log(0.1)], rtol=1e-6)


def test_real_model_predicts_text_far_better_than_chance(fp_evaluator, slice_windows) -> None:
    result = fp_evaluator.perplexity(slice_windows)
    assert result.tokens == 4 * (SEQ - 1) and result.windows == 4
    assert 5 < result.ppl < 60  # vocabulary: 49152
    shuffled = np.random.default_rng(0).permutation(slice_windows.reshape(-1))
    control = fp_evaluator.perplexity(shuffled.reshape(slice_windows.shape))
    assert control.ppl > 20 * result.ppl


def test_w8a16_perplexity_within_one_percent(model, fp_evaluator, slice_windows) -> None:
    config = load_model_config(model[0])
    quantized = Evaluator(config, model[1], SEQ)
    assert len(quantized.quantized_layers) == 30 * 7
    fp, w8 = fp_evaluator.perplexity(slice_windows), quantized.perplexity(slice_windows)
    assert abs(w8.ppl - fp.ppl) / fp.ppl < 0.01, (fp.ppl, w8.ppl)


@pytest.fixture(scope="module")
def wiki_valid() -> Path:
    if not WIKI_VALID.is_file():
        pytest.skip(f"no WikiText-2 validation split at {WIKI_VALID}")
    return WIKI_VALID


def test_wikitext_loss_is_mindformers_perplexity_metric(model, fp_evaluator, wiki_valid) -> None:
    """Our chunk loss against MindFormers' own PerplexityMetric fed the network's eval-mode
    outputs (logits, tokens, input mask), as Golden Stick's evaluation loop feeds it."""
    from mindformers.core.metric import PerplexityMetric
    from mindspore import Tensor

    config = load_model_config(model[0])
    tokenizer = load_tokenizer(config)
    pad = config.model["pad_token_id"]
    chunks = wikitext.chunks(wiki_valid.read_text(encoding="utf-8"),
                             lambda para: tokenizer.encode(para).ids, SEQ, pad,
                             max_tokens=3 * (SEQ - 1))
    chunks[1, 40] = pad  # a pad id inside the text is masked out too
    ours = fp_evaluator.chunk_perplexity(chunks, pad)
    assert ours.windows == 3 and ours.tokens == 3 * (SEQ - 2) - 1
    metric = PerplexityMetric()
    metric.clear()
    for chunk in chunks:
        metric.update(*fp_evaluator.net(Tensor(chunk[None, :])))
    reference = metric.eval()
    # MindFormers sums in float32, we in float64; an unmasked pad would move the loss far more.
    assert ours.loss == pytest.approx(reference["loss"], abs=1e-4)
    assert ours.ppl == pytest.approx(reference["PPL"], rel=1e-4)
    assert 5 < ours.ppl < 60


def test_eval_and_compare_commands(model, wiki_valid) -> None:
    config_path, w8, text = model
    result = cli("eval", "--config", config_path, "--ckpt", w8, "--text", text, "--seq-len",
                 str(SEQ), "--max-tokens", str(2 * SEQ), "-q")
    assert result.exit_code == 0, result.stderr
    assert re.search(rf"PPL \d+\.\d+  loss \d+\.\d+  tokens {2 * (SEQ - 1)} \(2 x {SEQ}\)",
                     result.stdout)
    wiki = cli("eval", "--config", config_path, "--ckpt", w8, "--wikitext", wiki_valid,
               "--seq-len", str(SEQ), "--max-tokens", str(2 * (SEQ - 1)), "-q")
    assert wiki.exit_code == 0, wiki.stderr
    # Two chunks of SEQ - 1 tokens and a pad: SEQ - 2 predicted tokens each.
    assert re.search(rf"WikiText-2 PPL \d+\.\d+  loss \d+\.\d+  tokens {2 * (SEQ - 2)} "
                     rf"\(2 x {SEQ}\)", wiki.stdout), wiki.stdout
    table = cli("compare", "--config", config_path, "--text", text, "--wikitext", wiki_valid,
                "--seq-len", str(SEQ), "--max-tokens", str(2 * SEQ), "-q",
                config_path.parent / "model.ckpt", w8)
    assert table.exit_code == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["checkpoint", "size", "GB", "Linear", "GB", "PPL", "wiki.txt",
                                "delta", "PPL", "wikitext2:wiki.valid.tokens", "delta"]
    assert lines[1].split()[0] == "model.ckpt" and lines[1].split()[-1] == "+0.00%"
    fp_linear, w8_linear = float(lines[1].split()[2]), float(lines[2].split()[2])
    assert 0.45 < w8_linear / fp_linear < 0.55  # int8 + fp16 scales vs fp16 weights


def test_generate_continues_with_paris(model) -> None:
    result = cli("generate", "--config", model[0], "--ckpt", model[1], "--seq-len", "32",
                 "--max-new-tokens", "4", "The capital of France is")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("The capital of France is")
    assert "Paris" in result.stdout


def test_generate_takes_another_tokenizer(model, tmp_path: Path) -> None:
    """--tokenizer: a tokenizers JSON, or a sentencepiece .model like Llama2's."""
    import sentencepiece

    config_path, w8, _ = model
    same = cli("generate", "--config", config_path, "--ckpt", w8, "--seq-len", "32",
               "--max-new-tokens", "4", "--tokenizer", config_path.parent / "tokenizer.json",
               "The capital of France is")
    assert same.exit_code == 0 and "Paris" in same.stdout, same.stderr
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The capital of France is Paris.\\n" * 50 + wiki_text()[:5000])
    sentencepiece.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "sp"),
                                             vocab_size=100, minloglevel=2)
    other = cli("generate", "--config", config_path, "--ckpt", w8, "--seq-len", "32",
                "--max-new-tokens", "3", "--tokenizer", tmp_path / "sp.model", "Paris")
    # The prompt is encoded with the sentencepiece model, but SmolLM2 answers with ids of
    # its own 49152-token vocabulary, which this 100-piece model cannot decode.
    assert other.exit_code == 2
    assert other.stderr.startswith(f"error: {tmp_path / 'sp.model'}: cannot decode the "
                                   "generated ids [")
    assert "this tokenizer does not belong to the model" in other.stderr
    bad = cli("generate", "--config", config_path, "--ckpt", w8, "--tokenizer",
              tmp_path / "corpus.model", "x")
    assert bad.exit_code == 2 and "sentencepiece" in bad.stderr


def test_a_child_process_returns_results_and_our_errors(tmp_path: Path) -> None:
    """compare runs each checkpoint in a spawned child: results and CkptRtnErrors (with
    their file and reason) come back as if raised here."""
    assert in_fresh_process(math.sqrt, 16.0) == 4.0
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as raised:
        in_fresh_process(load_model_config, str(missing))
    assert raised.value.path == str(missing) and "cannot read" in raised.value.reason
    error = FormatError("in.ckpt", "truncated record", offset=12)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is FormatError and str(copy) == str(error) == \
        "in.ckpt: truncated record (at byte 12)"
