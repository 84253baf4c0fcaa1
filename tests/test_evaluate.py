"""Perplexity and generation of the real SmolLM2 model through MindFormers, FP vs W8A16."""
from __future__ import annotations

import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import pytest

from ckpt_rtn import paths, results
from ckpt_rtn.runtime.qa import golden_stick_scores
from ckpt_rtn.tasks import squad, wikitext
from ckpt_rtn.tasks.corpora import wiki_text
from ckpt_rtn.errors import ConfigError, FormatError
from ckpt_rtn.runtime.evaluate import (Corpus, Evaluator, Perplexity, in_fresh_process,
                                       next_token_nll, tokenize, windows)
from ckpt_rtn.runtime.measure import Request, _perplexities
from ckpt_rtn.models import load_model_config, load_text_codec, load_tokenizer

from conftest import FIXTURES, cli, llama_weights
from test_directory import write_ckpt

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


def test_too_few_tokens_for_a_window_says_whether_max_tokens_cut_them() -> None:
    """With --max-tokens, the text was said to have only the tokens it kept."""
    assert windows(np.arange(100), 32, 70).shape == (2, 32)
    with pytest.raises(ConfigError, match="^the text has 10 tokens, fewer than one window of 32"):
        windows(np.arange(10), 32)
    with pytest.raises(ConfigError, match="^--max-tokens 10 takes 10 of its 100 tokens, fewer "
                                          "than one window of 32"):
        windows(np.arange(100), 32, 10)


def test_golden_stick_scores_are_emf1metrics_f1_then_em() -> None:
    """Scores worked out by hand from EmF1Metric's rules: EM compares whole lowercased
    strings; F1 is the longest common run of jieba's segments (spaces are segments)."""
    samples = [squad.Sample(id=f"q{i}", context="", question="", answer=answer,
                            answers=(answer,))
               for i, answer in enumerate(["Denver Broncos", "Carolina Panthers"])]
    # "the panthers" against "carolina panthers": [" ", "panthers"] of 3 segments each.
    f1, em = golden_stick_scores(["denver broncos", "the Panthers"], samples)
    assert f1 == pytest.approx(100 * (1 + 2 / 3) / 2) and em == 50.0


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


#: Two paragraphs in SQuAD v1.1's format that SmolLM2 can answer within a 128-token window.
TINY_SQUAD = {"version": "1.1", "data": [{"title": "t", "paragraphs": [
    {"context": "Paris is the capital and the largest city of France.",
     "qas": [{"id": "q1", "question": "What is the capital of France?",
              "answers": [{"text": "Paris", "answer_start": 0}]}]},
    {"context": "The Nile flows north through Egypt into the Mediterranean Sea.",
     "qas": [{"id": "q2", "question": "Which sea does the Nile flow into?",
              "answers": [{"text": "the Mediterranean Sea", "answer_start": 37},
                          {"text": "Mediterranean", "answer_start": 41}]}]}]}]}
#: The keys issue 11 asks every record to carry.
RECORD_KEYS = {"path", "size_bytes", "wikitext2_ppl", "squad_f1", "squad_em", "squad_f1_official",
               "squad_em_official", "prefill_tokens_per_s", "decode_tokens_per_s",
               "decode_uses_kv_cache", "weight_memory_bytes", "peak_rss_bytes", "mode"}


#: eval's settings for the text: two windows of SEQ - 1 tokens.
TEXT_SETTINGS = ("--seq-len", str(SEQ), "--max-tokens", str(2 * (SEQ - 1)))


@pytest.fixture(scope="module")
def w8_eval(model, wiki_valid, tmp_path_factory: pytest.TempPathFactory):
    """`eval` of the W8A16 checkpoint in graph mode with every measurement asked: its result,
    JSON record and SQuAD file."""
    config_path, w8, text = model
    root = tmp_path_factory.mktemp("w8-eval")
    squad_path = root / "squad.json"
    squad_path.write_text(json.dumps(TINY_SQUAD), encoding="utf-8")
    out = root / "w8.json"
    result = cli("eval", "--config", config_path, "--ckpt", w8, "--text", text, "--wikitext",
                 wiki_valid, "--squad", squad_path, "--max-new-tokens", "8", *TEXT_SETTINGS,
                 "-q", "--json", out)
    assert result.exit_code == 0, result.stderr
    return result, json.loads(out.read_text()), squad_path


def test_eval_measures_the_whole_row_and_writes_it_as_json(model, w8_eval) -> None:
    w8 = model[1]
    result, record, squad_path = w8_eval
    assert RECORD_KEYS <= set(record) and record["path"] == str(w8)
    assert record["mode"] == "graph" and record["size_bytes"] == w8.stat().st_size
    # Two chunks of SEQ - 1 tokens and a pad: SEQ - 2 predicted tokens each.
    assert record["wikitext2_tokens"] == 2 * (SEQ - 2) and 5 < record["wikitext2_ppl"] < 100
    assert 5 < record["text_ppl"]["wiki.txt"] < 100
    # The record's scores are those of its predictions, by both metrics.
    samples = squad.load(squad_path)
    predictions = record["squad_predictions"]
    assert record["squad_samples"] == 2 and len(predictions) == 2 and all(predictions)
    assert (record["squad_em_official"], record["squad_f1_official"]) == \
        squad.official_scores(predictions, samples)
    assert (record["squad_f1"], record["squad_em"]) == golden_stick_scores(predictions, samples)
    assert record["prefill_tokens_per_s"] > 0 and record["decode_tokens_per_s"] > 0
    assert record["decode_uses_kv_cache"] is False  # MindFormers' KV cache needs Ascend
    # The network holds its Linear layers as int8 codes and float32 scales (CPU: float32).
    assert set(record["linear_weight_memory_dtypes"]) == {"int8", "float32"}
    assert record["linear_weight_memory_dtypes"]["int8"] > 0.9 * record["linear_weight_memory_bytes"]
    assert record["peak_rss_bytes"] > record["weight_memory_bytes"] > 0
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["metric", "w8a16.ckpt"]
    for label in ("WikiText-2 PPL", "PPL wiki.txt", "SQuAD F1 (EmF1Metric)",
                  "SQuAD EM (official v1.1)", "prefill tokens/s", "decode tokens/s (no KV cache)",
                  "weight memory", "peak RSS"):
        assert any(line.startswith(label) for line in lines), label
    assert "mode graph" in lines[-1] and "KV cache needs Ascend" in lines[-1]


def test_pynative_mode_gives_the_graph_modes_perplexity(model, w8_eval, tmp_path: Path) -> None:
    config_path, w8, text = model
    out = tmp_path / "pynative.json"
    result = cli("eval", "--config", config_path, "--ckpt", w8, "--text", text, *TEXT_SETTINGS,
                 "--mode", "pynative", "-q", "--json", out)
    assert result.exit_code == 0, result.stderr
    pynative, graph = json.loads(out.read_text()), w8_eval[1]
    assert (pynative["mode"], graph["mode"]) == ("pynative", "graph")
    assert pynative["text_ppl"]["wiki.txt"] == pytest.approx(graph["text_ppl"]["wiki.txt"],
                                                             rel=1e-5)


def test_bad_measurement_input_is_one_line_before_any_network(model, tmp_path: Path) -> None:
    config_path, w8, text = model
    squad_path = tmp_path / "squad.json"
    squad_path.write_text(json.dumps(TINY_SQUAD), encoding="utf-8")
    not_json = tmp_path / "dev.json"
    not_json.write_text("{oops", encoding="utf-8")
    cases = [
        ([], "error: nothing to measure: give --text, --wikitext or --squad"),
        (["--squad", not_json], f"error: {not_json}: "),
        (["--squad", squad_path, "--seq-len", "24"],
         f"error: {squad_path}: paragraph 1's prompt has "),
    ]
    fifo, same = tmp_path / "fifo.txt", tmp_path / "again" / "wiki.txt"
    os.mkfifo(fifo)
    same.parent.mkdir()
    same.write_text("Paris is the capital of France.")
    tokenizer = config_path.parent / "tokenizer.json"
    cases += [  # each was a hang, a lost row, an overwritten input or a traceback
        (["--text", fifo], f"error: {fifo}: is a FIFO (named pipe), not a text file"),
        (["--text", text, "--text", same], f"error: {same}: another --text is also named "
                                           "'wiki.txt'"),
        (["--text", text, "--json", tokenizer], f"error: {tokenizer}: the JSON record is an "
                                                "input of this command"),
    ]
    victim, tokens = tmp_path / "victim.ckpt", tmp_path / "wiki.valid.tokens"
    victim.write_bytes(b"\x08\x01\x12" + bytes(64))  # a checkpoint, say, mistyped as --json
    tokens.write_text(" = Title = \n\n The capital of France is Paris . \n")
    cases += [  # a record written over a checkpoint; a perplexity of 1 over no token
        (["--text", text, "--json", victim], f"error: {victim}: exists and is not JSON"),
        (["--wikitext", tokens, "--seq-len", "2"], f"error: {tokens}: --seq-len 2 leaves "
                                                   "fewer than two text tokens"),
        (["--text", text, "--seq-len", "2147483648"], "error: Invalid value for '--seq-len'"),
    ]
    for args, start in cases:
        result = cli("eval", "--config", config_path, "--ckpt", w8, *args)
        assert result.exit_code == 2, (args, result.stderr)
        assert result.stderr.startswith(start) and result.stderr.count("\n") == 1, result.stderr
    record = tmp_path / "record.json"
    with paths.destination_lock(record):  # another eval writes it: two both exited 0
        held = cli("eval", "--config", config_path, "--ckpt", w8, "--text", text, "--json", record)
    assert held.exit_code == 2 and "is being written by another ckpt-rtn run" in held.stderr
    missing = cli("eval", "--config", config_path, "--ckpt", tmp_path / "nope.ckpt", "--text",
                  text)
    assert missing.exit_code == 2 and missing.stderr == \
        f"error: {tmp_path / 'nope.ckpt'}: cannot open: No such file or directory\n"
    long_prompt = cli("eval", "--config", config_path, "--ckpt", w8, "--squad", squad_path,
                      "--seq-len", "24")
    assert "--max-new-tokens 32 it needs --seq-len" in long_prompt.stderr


def test_a_stop_signal_during_the_imports_is_taken_after_them() -> None:
    """A SIGINT while MindSpore imported raised inside its extension's initialisation
    (ImportError, or an abort): a BLAS thread took the signal, so blocking it in the main
    thread did not hold it. It is now recorded and taken once the block ends."""
    from ckpt_rtn.runtime import _signals_deferred

    taken: List[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, _frame: taken.append(number))
    try:
        with _signals_deferred():
            thread = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGINT))
            thread.start()
            thread.join()
            time.sleep(0.05)  # the handler would run here, between bytecodes
            assert taken == []
        assert taken == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_perplexity_that_is_not_finite_is_an_error(model) -> None:
    """Finite weights can still overflow the network's outputs (the loader refuses inf and
    NaN in the checkpoint itself): a perplexity that is not finite is an error naming the
    checkpoint, not a table row `inf` with exit 0."""
    class Overflowing:
        def measure(self, corpus, progress=None) -> Perplexity:
            return Perplexity(ppl=math.inf, loss=math.inf, tokens=8, windows=1)

    request = Request(load_model_config(model[0]), SEQ, quiet=True,
                      texts={"t.txt": Corpus(np.zeros((1, SEQ), np.int32))})
    record = results.empty_record(str(model[1]), "graph", SEQ)
    with pytest.raises(FormatError, match="^model.ckpt: perplexity on t.txt is inf: the "
                                          "network's outputs are not finite"):
        _perplexities(Overflowing(), request, "model.ckpt", record)  # type: ignore[arg-type]


def test_compare_checks_every_crc_before_measuring(model, tmp_path: Path) -> None:
    """MindSpore's loader checks no CRC unless asked: a corrupted file was measured as if
    whole, which inspect and convert refuse."""
    config_path, w8, text = model
    tiny, crc = tmp_path / "tiny.ckpt", tmp_path / "crc.ckpt"
    write_ckpt(tiny, {k: v.astype(np.float16) for k, v in llama_weights().items()})
    assert cli("convert", tiny, crc, "--crc", "-q").exit_code == 0
    data = bytearray(crc.read_bytes())
    data[len(data) // 2] ^= 0x40
    crc.write_bytes(bytes(data))
    result = cli("compare", "--config", config_path, "--text", text, w8, crc)
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {crc}: ")
    assert "CRC" in result.stderr and result.stderr.count("\n") == 1


def test_compare_prints_metrics_as_rows_and_writes_every_record(model, wiki_valid,
                                                                tmp_path: Path) -> None:
    config_path, w8, text = model
    out = tmp_path / "table.json"
    table = cli("compare", "--config", config_path, "--text", text, "--wikitext", wiki_valid,
                "--seq-len", str(SEQ), "--max-tokens", str(2 * SEQ), "-q", "--json", out,
                config_path.parent / "model.ckpt", w8)
    assert table.exit_code == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["metric", "model.ckpt", "w8a16.ckpt", "change"]
    assert re.match(r"WikiText-2 PPL +\d+\.\d{3} +\d+\.\d{3} +[+-]\d+\.\d\d%$",
                    next(line for line in lines if line.startswith("WikiText-2")))
    fp, quantized = json.loads(out.read_text())["checkpoints"]
    assert RECORD_KEYS <= set(fp) and fp["squad_f1"] is None  # not asked
    assert 0.45 < quantized["linear_checkpoint_bytes"] / fp["linear_checkpoint_bytes"] < 0.55
    # Held at run time: float32 weights (CPU) against int8 codes + float32 scales.
    assert set(fp["linear_weight_memory_dtypes"]) == {"float32"}
    assert 0.24 < quantized["linear_weight_memory_bytes"] / fp["linear_weight_memory_bytes"] < 0.3
    assert abs(quantized["wikitext2_ppl"] / fp["wikitext2_ppl"] - 1) < 0.02


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
    config = load_model_config(config_path)
    encode, decode = load_text_codec(config, config_path.parent / "tokenizer.json")
    ids = load_tokenizer(config).encode("The capital of France is").ids
    assert encode("The capital of France is") == ids and decode(ids) == "The capital of France is"
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
    assert bad.exit_code == 2 and "corpus.model: cannot open: No such file" in bad.stderr


def test_a_child_process_returns_results_and_our_errors(tmp_path: Path) -> None:
    """compare runs each checkpoint in a spawned child: results and CkptRtnErrors (with
    their file and reason) come back as if raised here."""
    assert in_fresh_process(math.sqrt, 16.0) == 4.0
    with ThreadPoolExecutor(1) as pool:  # only the main thread may set signal handlers
        assert pool.submit(in_fresh_process, math.sqrt, 25.0).result() == 5.0
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as raised:
        in_fresh_process(load_model_config, str(missing))
    assert raised.value.path == str(missing) and "cannot open" in raised.value.reason
    error = FormatError("in.ckpt", "truncated record", offset=12)
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is FormatError and str(copy) == str(error) == \
        "in.ckpt: truncated record (at byte 12)"


def _process(pid: int) -> Optional[Tuple[str, int]]:
    """A process's state letter and parent, from /proc; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state, ppid = f.read().rsplit(")", 1)[1].split()[:2]
    except (OSError, ValueError):
        return None
    return state, int(ppid)


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc")
def test_the_child_dies_with_the_command(tmp_path: Path) -> None:
    """A SIGKILL of the command (the OOM killer, a scheduler's hard stop) left its measuring
    child running to the end of its measurement."""
    command = subprocess.Popen([sys.executable, "-c", "import time; from ckpt_rtn.runtime."
                                "evaluate import in_fresh_process; in_fresh_process(time.sleep, "
                                "300)"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    child: List[int] = []
    while not child:
        assert time.monotonic() < deadline and command.poll() is None
        time.sleep(0.1)
        child = [int(p) for p in os.listdir("/proc") if p.isdigit()
                 and (_process(int(p)) or ("", 0))[1] == command.pid
                 and b"spawn_main" in _cmdline(int(p))]  # not the resource tracker
    command.send_signal(signal.SIGKILL)
    command.wait()
    deadline = time.monotonic() + 60  # its imports, then it sees the command gone
    while (_process(child[0]) or ("Z", 0))[0] != "Z":  # gone, or dead and not yet reaped
        assert time.monotonic() < deadline, "the child outlived the command"
        time.sleep(0.2)
