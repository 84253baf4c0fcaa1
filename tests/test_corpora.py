"""Evaluation text from the gensim 4.4.0 wheel: clean prose, enough of it, always the same."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Dict

import pytest

from ckpt_rtn.tasks.corpora import lee_text, strip_wikitext, wiki_text, write_corpora
from ckpt_rtn.gguf_import import GGUFFile, build_tokenizer, gguf_path_from_wheel, tokenizer_spec

REPO = Path(__file__).resolve().parents[1]
MIN_TOKENS = 32 * 1024


@pytest.fixture(scope="module")
def texts() -> Dict[str, str]:
    return {"wiki": wiki_text(), "lee": lee_text()}


@pytest.fixture(scope="module")
def tokenizer():
    """SmolLM2's tokenizer, the one evaluation measures these texts with."""
    return build_tokenizer(tokenizer_spec(GGUFFile(gguf_path_from_wheel())))


def test_strip_wikitext_keeps_only_prose() -> None:
    wikitext = (
        "{{Infobox person|name={{nowrap|Ada}}|born=1815}}\n"
        "'''Ada Lovelace''' was an [[England|English]] [[mathematician]] and writer, chiefly known "
        "for her work on the [[Analytical Engine]] of [[Charles Babbage]].<ref name=a>{{cite web|"
        "url=http://x}}</ref> She was the first to publish an [[algorithm]] for such a machine."
        "<ref>Toole, p. 1.</ref>\n\n"
        "==Early life==\n"
        "[[File:Ada.jpg|thumb|Ada, by [[Alfred Chalon]]]]\n"
        "{| class=\"wikitable\"\n|-\n| a || b\n|}\n"
        "* a list item that is long enough to be a sentence if it were kept in the text.\n"
        "Short line.\n"
        "Lovelace was the only legitimate child of the poet [[Lord Byron]] and his wife "
        "[[Anne Isabella Milbanke|Anne]] (1792&ndash;1860), born in London.<!-- comment -->\n"
        "[[Category:1815 births]]\n[[fr:Ada Lovelace]]\n")
    assert strip_wikitext(wikitext) == (
        "Ada Lovelace was an English mathematician and writer, chiefly known for her work on the "
        "Analytical Engine of Charles Babbage. She was the first to publish an algorithm for such "
        "a machine.\n\n"
        "Lovelace was the only legitimate child of the poet Lord Byron and his wife Anne "
        "(1792\u20131860), born in London.")


@pytest.mark.parametrize("name", ["wiki", "lee"])
def test_no_markup_and_enough_tokens(texts: Dict[str, str], tokenizer, name: str) -> None:
    text = texts[name]
    for markup in ("{{", "}}", "[[", "]]", "<ref", "</", "'''", "&nbsp;", "\n==", "|}"):
        assert markup not in text, markup
    n_tokens = len(tokenizer.encode(text).ids)
    print(f"{name}: {len(text)} chars, {n_tokens} tokens")
    assert n_tokens >= MIN_TOKENS


def test_what_the_texts_are(texts: Dict[str, str]) -> None:
    assert texts["wiki"].startswith("Anarchism is a political philosophy that advocates")
    paragraphs = texts["wiki"].split("\n\n")
    assert len(paragraphs) > 2000 and all(len(p.split()) >= 12 for p in paragraphs)
    assert texts["lee"].startswith("Hundreds of people have been forced to vacate their homes")
    assert len(texts["lee"].split("\n\n")) == 300  # one paragraph per news article


def test_deterministic_and_tool_writes_the_same(tmp_path: Path, texts: Dict[str, str]) -> None:
    """Perplexities are only comparable on identical text: same bytes every time, every way."""
    written = write_corpora(tmp_path / "lib")
    result = subprocess.run([sys.executable, str(REPO / "tools" / "prepare_corpora.py"),
                             str(tmp_path / "tool")], capture_output=True, text=True, check=True)
    assert "wiki.txt" in result.stdout and "lee.txt" in result.stdout
    for name, text in (("wiki.txt", texts["wiki"]), ("lee.txt", texts["lee"])):
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        for directory in ("lib", "tool"):
            data = (tmp_path / directory / name).read_bytes()
            assert hashlib.sha256(data).hexdigest() == digest, (directory, name)
        assert written[name] == tmp_path / "lib" / name
    assert wiki_text() == texts["wiki"]
