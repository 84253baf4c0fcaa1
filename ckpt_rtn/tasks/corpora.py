"""Evaluation text from the `gensim` wheel: a Wikipedia dump and the Lee news corpus.

Perplexity needs real English prose that every machine can get from PyPI
with a pinned version. gensim 4.4.0's test data has both: a shortened
English Wikipedia XML dump (wiki markup) and `lee_background.cor`, 300
news articles, one per line. The files are located through the import
system's metadata without importing gensim (it would pull in scipy and
compiled extensions we do not need). Pure standard library.

The markup stripper is deliberately conservative: it removes what it knows
(templates, tables, references, tags, files, categories, headings, lists,
emphasis quotes) and then keeps only paragraphs that read as sentences, so
leftover markup costs a paragraph, never pollutes the text.
"""
from __future__ import annotations

import bz2
import html
import importlib.util
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Callable, Dict, Iterator

from ..errors import CkptRtnError

GENSIM_WHEEL = "gensim==4.4.0"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
LEE_FILE = "lee_background.cor"

#: A kept paragraph has at least this many words and ends like a sentence.
MIN_WORDS = 12
_SENTENCE_END = re.compile(r"[.!?][\"')]?$")
#: Any of these left in a paragraph means the stripper did not understand it.
_MARKUP_LEFT = re.compile(r"[{}\[\]|<>=]|''|https?://|&\w+;")

_COMMENT = re.compile(r"<!--.*?(-->|$)", re.S)
_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?(</ref>|$)", re.S | re.I)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")  # innermost first, repeated for nesting
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_EXTERNAL = re.compile(r"\[(?:https?:)?//[^\s\]]*\s*([^\]]*)\]")
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_HEADING = re.compile(r"^=+.*?=+\s*$", re.M)
_LIST_LINE = re.compile(r"^[*#:;].*$", re.M)
_EMPHASIS = re.compile(r"'{2,}")
#: Links to these namespaces (and interlanguage links "xx:" / "simple:") are not prose.
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]*\s*\)")
_PARENS_LEAD = re.compile(r"\(\s*[,;:]+\s*")
_SPACES = re.compile(r"\s+")
_SPACE_BEFORE = re.compile(r" ([.,;:!?)])")
_DROP_LINK = re.compile(r"^\s*:?\s*(file|image|category|media|[a-z]{2,3}(-[a-z]+)?|simple)\s*:",
                        re.I)


def gensim_test_data() -> Path:
    """gensim's test_data directory, located without importing gensim."""
    spec = importlib.util.find_spec("gensim")
    path = None if spec is None or not spec.submodule_search_locations else \
        Path(list(spec.submodule_search_locations)[0]) / "test" / "test_data"
    if path is None or not (path / WIKI_FILE).is_file():
        raise CkptRtnError(None, "gensim's test data not found: "
                           f"pip install --no-deps {GENSIM_WHEEL}")
    return path


def wiki_articles(path: "os.PathLike[str] | str") -> Iterator[str]:
    """The wikitext of each article (namespace 0, not a redirect) in a .xml.bz2 dump."""
    with bz2.open(path, "rb") as stream:
        ns = title = None
        for _, elem in ET.iterparse(stream):
            tag = elem.tag.rsplit("}", 1)[-1]
            if tag == "ns":
                ns = elem.text
            elif tag == "title":
                title = elem.text
            elif tag == "text" and ns == "0" and title and elem.text \
                    and not elem.text.lstrip().upper().startswith("#REDIRECT"):
                yield elem.text
            elif tag == "page":
                elem.clear()  # the dump is large; keep one page in memory


def _until_stable(pattern: "re.Pattern[str]", repl: "str | Callable[[re.Match[str]], str]",
                  text: str) -> str:
    """Apply a substitution until nothing changes: nested constructs go innermost first."""
    while True:
        text, n = pattern.subn(repl, text)
        if n == 0:
            return text


def _link_text(match: "re.Match[str]") -> str:
    """[[target|label]] -> label, [[target]] -> target; files, categories, interwiki -> ''."""
    inner = match.group(1)
    return "" if _DROP_LINK.match(inner) else inner.rsplit("|", 1)[-1]


def strip_wikitext(text: str) -> str:
    """Plain prose paragraphs (separated by blank lines) from one article's wikitext."""
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _until_stable(_TEMPLATE, "", text)
    text = _until_stable(_TABLE, "", text)
    text = _until_stable(_LINK, _link_text, text)
    text = _EXTERNAL.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _HEADING.sub("", text)
    text = _LIST_LINE.sub("", text)
    text = _EMPHASIS.sub("", text)
    text = html.unescape(text)  # &nbsp; &ndash; ... written escaped inside the XML text
    return "\n\n".join(p for p in map(_clean_paragraph, text.split("\n")) if _is_prose(p))


def _clean_paragraph(line: str) -> str:
    """Tidy what removed markup leaves: "X (; born 1947)", "X ( ) is", "word ,"."""
    line = _EMPTY_PARENS.sub("", line)
    line = _PARENS_LEAD.sub("(", line)
    line = _SPACES.sub(" ", line).strip()
    return _SPACE_BEFORE.sub(r"\1", line)


def _is_prose(paragraph: str) -> bool:
    return (len(paragraph.split()) >= MIN_WORDS and bool(_SENTENCE_END.search(paragraph))
            and not _MARKUP_LEFT.search(paragraph))


def wiki_text(path: "os.PathLike[str] | str | None" = None) -> str:
    """The Wikipedia dump's articles as prose, articles and paragraphs separated by blank lines."""
    path = gensim_test_data() / WIKI_FILE if path is None else path
    articles = (strip_wikitext(a) for a in wiki_articles(path))
    return "\n\n".join(a for a in articles if a) + "\n"


def lee_text(path: "os.PathLike[str] | str | None" = None) -> str:
    """The Lee background corpus: one news article per paragraph (its one <i> tag removed)."""
    path = gensim_test_data() / LEE_FILE if path is None else path
    lines = _TAG.sub("", Path(path).read_text(encoding="utf-8")).splitlines()
    return "\n\n".join(" ".join(line.split()) for line in lines if line.strip()) + "\n"


#: File name -> text builder, for `write_corpora` and tools/prepare_corpora.py.
CORPORA: Dict[str, Callable[[], str]] = {"wiki.txt": wiki_text, "lee.txt": lee_text}


def write_corpora(out_dir: "os.PathLike[str] | str") -> Dict[str, Path]:
    """Write wiki.txt and lee.txt (UTF-8) into `out_dir`; return their paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, build in CORPORA.items():
        written[name] = out / name
        written[name].write_text(build(), encoding="utf-8")
    return written
