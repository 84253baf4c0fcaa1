"""What the benchmark scripts in tools/ share."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from typing import List


def counts(text: str) -> List[int]:
    """An argparse type for a sweep such as `1,2,4,8,16`: sorted, distinct, each at least 1."""
    try:
        values = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of counts: {text!r}") \
            from None
    if values[0] < 1:
        raise argparse.ArgumentTypeError(f"counts start at 1: {text!r}")
    return values


def checkout(root: str, rev: str, into: str) -> str:
    """The package (and the family configs it links to) as at git revision `rev` of the
    repository at `root`, extracted under `into`, or `rev` itself where that is a directory
    holding one (where there is no git history, as on a machine lent a copy of the working
    tree); returns the directory whose `ckpt_rtn` a run imports first."""
    if os.path.isdir(os.path.join(rev, "ckpt_rtn")):
        return os.path.abspath(rev)
    tree = os.path.join(into, rev.replace("/", "_"))
    os.makedirs(tree)
    archive = subprocess.run(["git", "-C", root, "archive", rev, "ckpt_rtn", "configs"],
                             capture_output=True)
    if archive.returncode:
        sys.exit(f"--rev {rev}: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", tree], input=archive.stdout, check=True)
    return tree
