"""WikiText-2 prepared as Golden Stick prepares it: cleanups, paragraphs, chunks (no MindSpore)."""
from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np
import pytest

from ckpt_rtn.tasks import wikitext
from ckpt_rtn.errors import ConfigError

from conftest import cli

#: A hand-made excerpt in the wiki.*.tokens layout: word-tokenized lines, blank lines
#: around headings, consecutive lines within a section.
TOKENS = (
    " \n"
    " = Lobster = \n"
    " \n"
    " The cat @-@ like animal , born in 1 @,@ 000 BC , weighs 2 @.@ 5 kg . It 's the \" best \" "
    "pet ( really ) ; N of them ! \n"
    " Water at 5 \N{DEGREE SIGN} C : cold . \n"
    " \n"
    " = = Habitat = = \n"
    " \n"
    " Players ' nets [ often ] catch it ? Yes . \n"
    " \n"
)

SECTIONS = [
    "The cat-like animal, born in 1,000 BC, weighs 2.5 kg. It's the \"best\" pet (really); "
    "1 of them!\nWater at 5\N{DEGREE SIGN}C: cold.",
    "Players' nets [often] catch it? Yes.",
]


def chars(text: str) -> List[int]:
    """A tokenizer whose ids can be read back: one per character."""
    return [ord(c) for c in text]


def test_cleanups_undo_the_word_tokenization() -> None:
    assert wikitext.clean(TOKENS) == ("\n= Lobster =\n\n" + SECTIONS[0] + "\n\n== Habitat ==\n\n"
                                      + SECTIONS[1] + "\n\n")


def test_paragraphs_are_blank_line_sections_without_headings() -> None:
    assert wikitext.paragraphs(TOKENS) == SECTIONS
    # A heading is recognised after cleaning, whatever its level; text that merely
    # contains "=" is kept. Paragraphs are not stripped: a last one without a blank line
    # after it keeps its newline, and the tokenizer sees it, as in Golden Stick.
    assert wikitext.paragraphs(" = = = Deep = = = \n \n x = 1 \n") == ["x = 1\n"]


def test_chunks_are_seq_len_minus_one_tokens_and_one_pad() -> None:
    ids = chars(SECTIONS[0]) + chars(SECTIONS[1])  # each paragraph tokenized, then concatenated
    seq_len, pad = 12, -7
    got = wikitext.chunks(TOKENS, chars, seq_len, pad)
    count = len(ids) // (seq_len - 1)
    assert got.dtype == np.int32 and got.shape == (count, seq_len)
    np.testing.assert_array_equal(got[:, :-1].reshape(-1), ids[:count * (seq_len - 1)])
    assert (got[:, -1] == pad).all()
    assert len(ids) % (seq_len - 1) != 0  # so the dropped tail is really tested
    # The short tail is dropped: every chunk is full.
    assert got[:, :-1].size == len(ids) - len(ids) % (seq_len - 1)


def test_each_paragraph_is_tokenized_on_its_own() -> None:
    """Tokenizers add their special tokens per call, so the split points matter."""
    calls: List[str] = []

    def tokenize(text: str) -> List[int]:
        calls.append(text)
        return [1] + chars(text)  # a BOS-adding tokenizer

    got = wikitext.chunks(TOKENS, tokenize, 5, 0)
    assert calls == SECTIONS
    assert list(got[0, :4]) == [1] + chars(SECTIONS[0][:3])


def test_max_tokens_keeps_a_prefix() -> None:
    full = wikitext.chunks(TOKENS, chars, 11, 0)
    short = wikitext.chunks(TOKENS, chars, 11, 0, max_tokens=35)
    np.testing.assert_array_equal(short, full[:3])  # 35 tokens: three chunks of 10, tail dropped


@pytest.mark.parametrize("text, seq_len, reason", [
    (" \n = Only = \n \n = = Headings = = \n \n", 11, "no text paragraphs"),
    ("", 11, "no text paragraphs"),
    (TOKENS, 1000, "fewer than one chunk of 999"),
    (TOKENS, 1, "--seq-len 1 leaves fewer than two text tokens"),
    (TOKENS, 2, "--seq-len 2 leaves fewer than two text tokens"),  # PPL 1 over no token
])
def test_unusable_text_is_refused(text: str, seq_len: int, reason: str) -> None:
    with pytest.raises(ConfigError) as raised:
        wikitext.chunks(text, chars, seq_len, 0)
    assert reason in raised.value.reason


@pytest.mark.parametrize("content, reason", [
    (b"\xff\xfe = Lobster = \n", "not UTF-8 text (byte 0)"),
    (b" \n = Only = \n \n = = Headings = = \n", "no text paragraphs"),
    (b" A few words . \n", "fewer than one chunk of 511"),
    (None, "cannot open: No such file or directory"),
])
def test_bad_wikitext_file_is_one_error_line(smollm2: Path, tmp_path: Path, content, reason) -> None:
    bad = tmp_path / "wiki.valid.tokens"
    if content is not None:
        bad.write_bytes(content)
    result = cli("eval", "--config", smollm2, "--ckpt", smollm2.parent / "model.ckpt",
                 "--wikitext", bad, "-q")
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: {bad}: ") and reason in result.stderr
    # (stdout may carry MindFormers' import-time log lines: issue #11 item 8)
    assert result.stderr.count("\n") == 1 and "PPL" not in result.stdout
    assert content is None or bad.read_bytes() == content


def test_eval_needs_something_to_measure(smollm2: Path) -> None:
    result = cli("eval", "--config", smollm2, "--ckpt", smollm2.parent / "model.ckpt", "-q")
    assert result.exit_code == 2
    assert result.stderr == "error: nothing to measure: give --text, --wikitext or --squad\n"
