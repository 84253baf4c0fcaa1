"""What the benchmark scripts in tools/ share."""
from __future__ import annotations

import argparse
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
