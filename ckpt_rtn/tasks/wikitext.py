"""WikiText-2 as Golden Stick feeds it to a model (MindSpore-free).

Golden Stick's RTN table measures perplexity on `wiki.valid.tokens` through
`mindspore_gs.datasets.create_wikitext_dataset`; to compare with that table
the text must reach the model the same way. The `.tokens` files are
word-tokenized (`1 @,@ 000`, `word , word`), so the text is first put back
into ordinary prose; it is then split into paragraphs at blank lines,
headings (`= Title =`) are dropped, each paragraph is tokenized on its own,
the ids are concatenated and cut into chunks of `seq_len - max_new_tokens`
tokens, and each chunk is padded with `max_new_tokens` pad ids up to the
window the network is compiled for. A short tail is dropped.
"""
from __future__ import annotations

import re
from typing import Callable, List, Optional, Sequence

import numpy as np

from ..errors import ConfigError

#: Golden Stick evaluates with one pad token after each chunk.
MAX_NEW_TOKENS = 1

# Applied in this order: later rules see the text earlier ones produced (the
# bracket rules, for instance, run after ` , ` has become `, `).
_CLEANUPS: Sequence["tuple[str, str, bool]"] = (
    # (pattern, replacement, is_regex)
    ("s '", "s'", False),                        # plural possessive: `players '` -> `players'`
    (r"/' [0-9]/", r"/'[0-9]/", True),           # (kept as Golden Stick has it: matches almost nothing)
    (" @-@ ", "-", False),                       # number and compound separators
    (" @,@ ", ",", False),
    (" @.@ ", ".", False),
    (" : ", ": ", False),                        # punctuation loses its leading space
    (" ; ", "; ", False),
    (" . ", ". ", False),
    (" ! ", "! ", False),
    (" ? ", "? ", False),
    (" , ", ", ", False),
    (r"\(\s*([^\)]*?)\s*\)", r"(\1)", True),     # no spaces inside brackets and quotes
    (r"\[\s*([^\]]*?)\s*\]", r"[\1]", True),
    (r"{\s*([^}]*?)\s*}", r"{\1}", True),
    (r"\"\s*([^\"]*?)\s*\"", r'"\1"', True),
    (r"'\s*([^']*?)\s*'", r"'\1'", True),
    ("= = = =", "====", False),                  # heading markers
    ("= = =", "===", False),
    ("= =", "==", False),
    (" \N{DEGREE SIGN} ", "\N{DEGREE SIGN}", False),
    (" \n", "\n", False),                        # no spaces at line ends
    ("\n ", "\n", False),
    (" N ", " 1 ", False),                       # the corpus's number placeholder
    (" 's", "'s", False),
)


def clean(text: str) -> str:
    """The detokenised prose of a `wiki.*.tokens` text."""
    for pattern, replacement, is_regex in _CLEANUPS:
        text = re.sub(pattern, replacement, text) if is_regex else text.replace(pattern, replacement)
    return text


def paragraphs(text: str) -> List[str]:
    """The cleaned text's paragraphs (blank-line separated), headings and empty ones dropped."""
    return [para for para in clean(text).split("\n\n")
            if para and not para.strip().startswith("=")]


def chunks(text: str, tokenize: Callable[[str], Sequence[int]], seq_len: int, pad_id: int,
           max_tokens: Optional[int] = None) -> np.ndarray:
    """[n, seq_len] int32 chunks: `seq_len - 1` text tokens and one `pad_id` each.

    `max_tokens` keeps only the first that many tokens of the concatenated
    ids (a quick run on a prefix); the tail that does not fill a chunk is
    dropped, as Golden Stick drops it.
    """
    if seq_len < MAX_NEW_TOKENS + 2:  # one text token predicts only the pad, which is masked
        raise ConfigError(None, f"--seq-len {seq_len} leaves fewer than two text tokens "
                                f"before the {MAX_NEW_TOKENS} pad token: none is predicted")
    found = paragraphs(text)
    if not found:
        raise ConfigError(None, "no text paragraphs (only headings or blank lines): not a "
                                "wiki.*.tokens file?")
    ids = np.concatenate([np.asarray(tokenize(para), dtype=np.int64) for para in found])
    if max_tokens is not None:
        ids = ids[:max_tokens]
    size = seq_len - MAX_NEW_TOKENS
    count = len(ids) // size
    if count == 0:
        raise ConfigError(None, f"the text has {len(ids)} tokens, fewer than one chunk of {size}")
    body = ids[:count * size].reshape(count, size)
    pad = np.full((count, MAX_NEW_TOKENS), pad_id, dtype=np.int64)
    return np.concatenate([body, pad], axis=1).astype(np.int32)
