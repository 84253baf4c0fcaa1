#!/usr/bin/env python3
"""Write the evaluation texts wiki.txt and lee.txt from the installed gensim wheel.

    pip install --no-deps gensim==4.4.0
    python tools/prepare_corpora.py /tmp/corpora

gensim is located, never imported; the extraction lives in ckpt_rtn.tasks.corpora
so the tests and the evaluation use the same text.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from ckpt_rtn.tasks.corpora import write_corpora  # noqa: E402
from ckpt_rtn.errors import CkptRtnError  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write wiki.txt and lee.txt into")
    args = parser.parse_args()
    try:
        written = write_corpora(args.out_dir)
    except CkptRtnError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in written.values():
        text = path.read_text(encoding="utf-8")
        print(f"{path}: {len(text.split())} words, {text.count(chr(10) * 2)} paragraphs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
