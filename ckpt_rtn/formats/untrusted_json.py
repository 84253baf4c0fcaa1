"""JSON from files we did not write, parsed so that only our own errors come out.

`json.loads` on hostile text fails in ways no caller expects: nesting 100 000
deep raises RecursionError, an integer of thousands of digits ValueError (or,
where the interpreter's digit limit is lifted, takes minutes of quadratic
conversion), bytes that are not UTF-8 UnicodeDecodeError. Here every one of
those becomes one CkptRtnError naming the file, and integers are refused
beyond MAX_INT_DIGITS digits before they are converted. What the document
must hold (its schema) is for each caller to check.
"""
from __future__ import annotations

import json
import os
import reprlib
from contextlib import contextmanager
from typing import Iterator, Optional, Type

from ..errors import CkptRtnError, FormatError

#: Every number a checkpoint header, index or manifest holds fits in 64 bits (20 digits).
MAX_INT_DIGITS = 20
#: Indexes, manifests and strategies nest a few levels. A document nested deeper than
#: this is refused, well before the interpreter's recursion limit, which json.dumps
#: (writing a rewritten index back) would reach sooner than json.loads does.
MAX_DEPTH = 64


class _IntTooLong(ValueError):
    """An integer literal longer than MAX_INT_DIGITS digits."""


def _bounded_int(text: str) -> int:
    digits = len(text) - text.startswith("-")
    if digits > MAX_INT_DIGITS:
        raise _IntTooLong(f"an integer of {digits} digits (at most {MAX_INT_DIGITS} allowed)")
    return int(text)


_BRIEF = reprlib.Repr()
_BRIEF.maxstring = 160  # whole tensor names, abbreviated only when absurd
_BRIEF.maxother = 60
_BRIEF.maxlist = _BRIEF.maxdict = 8
_BRIEF.maxlevel = 2


def brief(value: object) -> str:
    """A short repr of an untrusted value, for an error message: bounded in length and depth
    (a plain repr of a deeply nested list can itself raise RecursionError)."""
    return _BRIEF.repr(value)


#: A decoder whose integers are bounded; `scan_once(text, pos)` parses one value.
DECODER = json.JSONDecoder(parse_int=_bounded_int)


@contextmanager
def refusing(path: "os.PathLike[str] | str", what: str, offset: Optional[int] = None,
             error: Type[CkptRtnError] = FormatError) -> Iterator[None]:
    """Turn whatever decoding JSON can raise into `error`: '<what> is not valid JSON ...'."""
    try:
        yield
    except RecursionError:
        raise error(path, f"{what} is nested too deeply to be read as JSON", offset) from None
    except UnicodeError:
        raise error(path, f"{what} is not valid JSON (not UTF-8 text)", offset) from None
    except _IntTooLong as exc:
        raise error(path, f"{what} holds {exc}", offset) from None
    except ValueError as exc:  # json.JSONDecodeError, and any other malformed literal
        raise error(path, f"{what} is not valid JSON ({exc})", offset) from None


def loads(data: "bytes | str", path: "os.PathLike[str] | str", what: str, *,
          error: Type[CkptRtnError] = FormatError) -> object:
    """The document in `data` (UTF-8 bytes or text); any fault is an `error` about `path`."""
    with refusing(path, what, error=error):
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        if text.startswith("\ufeff"):  # json's own message: "Expecting value ... (char 0)"
            raise error(path, f"{what} is not valid JSON (it starts with a byte-order mark)")
        document = DECODER.decode(text)
    if not _within_depth(document):
        raise error(path, f"{what} is nested more than {MAX_DEPTH} deep")
    return document


def _within_depth(document: object) -> bool:
    """Whether no container nests deeper than MAX_DEPTH (walked without recursion)."""
    stack = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        if type(value) is dict:
            children = value.values()  # type: ignore[union-attr]
        elif type(value) is list:
            children = value
        else:
            continue
        if depth > MAX_DEPTH:
            return False
        stack.extend((child, depth + 1) for child in children
                     if type(child) is dict or type(child) is list)
    return True


def load_file(path: "os.PathLike[str] | str", what: str, *, max_size: Optional[int] = None,
              error: Type[CkptRtnError] = FormatError) -> object:
    """The JSON document in the file at `path`, read whole (up to `max_size` bytes)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if max_size is not None and size > max_size:
                raise error(path, f"{what} of {size} bytes is larger than the {max_size} "
                            "bytes such a file can be")
            data = f.read()
    except OSError as exc:
        raise error(path, f"cannot read {what}: {exc.strerror}") from None
    return loads(data, path, what, error=error)
