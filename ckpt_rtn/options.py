"""The options of one conversion, as one immutable value.

They travel together from the command line through the directory layer to
the converter, and to the workers of `--part` and `--ray`, so they are one
frozen (and picklable) value rather than a dozen keyword arguments.

Two kinds of option are kept apart. `rules`, `scheme`, `crc` and `format`
decide the output's bytes: resolved against the checkpoint's tensor names
they become the `Settings` recorded in the output and its manifest, which
`--resume`, the merge of parts and `verify` compare. The others only say how
this run behaves (whether it may replace or resume, how many threads, whether
to check the input's CRC or measure errors, which part of a directory) and
are recorded nowhere: two runs that differ only in them write the same bytes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Mapping, Optional

from .errors import ConfigError
from .rules import RuleChoice, Rules
from .schemes import Scheme, get_scheme
from .settings import Settings

DEFAULT_SCHEME = get_scheme()
_PART = re.compile(r"(\d+)/(\d+)")


@dataclass(frozen=True)
class Part:
    """Part `index` of `count` (0-based, as Slurm's SLURM_ARRAY_TASK_ID and Kubernetes'
    JOB_COMPLETION_INDEX count) of a directory's shards."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError(None, f"--part {self}: N must be 1 or more")
        if not 0 <= self.index < self.count:
            raise ConfigError(None, f"--part {self}: I counts from 0 (as SLURM_ARRAY_TASK_ID "
                              f"and JOB_COMPLETION_INDEX do), so it must be 0 to {self.count - 1}")

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    @classmethod
    def parse(cls, text: str) -> "Part":
        match = _PART.fullmatch(text.strip())
        if match is None:
            raise ConfigError(None, f"--part {text!r}: expected I/N, e.g. 0/4 for the first of "
                              "four parts")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def label(self) -> str:
        """As file names show it: 'part-0-of-4'."""
        return f"part-{self.index}-of-{self.count}"

    def shards(self, sizes: Mapping[str, int]) -> List[str]:
        """This part's shards (relative paths), in the order the directory lists them."""
        mine = set(assign(sizes, self.count)[self.index])
        return [rel for rel in sizes if rel in mine]


def assign(sizes: Mapping[str, int], count: int) -> List[List[str]]:
    """Shards (relative path -> size) dealt into `count` parts of about equal bytes.

    Largest first, each to the part with the fewest bytes so far (the lowest
    index on a tie), shards of equal size by path: the result depends on the
    shard list alone, so every part, on any machine, computes the same split.
    """
    parts: List[List[str]] = [[] for _ in range(count)]
    loads = [0] * count
    for rel in sorted(sizes, key=lambda r: (-sizes[r], r)):
        lightest = min(range(count), key=lambda i: (loads[i], i))
        parts[lightest].append(rel)
        loads[lightest] += sizes[rel]
    return parts


@dataclass(frozen=True)
class ConvertOptions:
    """Everything `convert`, `plan_conversion` and `convert_directory` are asked to do.

    The first four fields decide the output's bytes (see `settings`); the
    rest decide how this run goes. The defaults are the command line's.
    """

    #: Selection rules, or what the user asked for before the family is detected.
    rules: "Rules | RuleChoice" = field(default_factory=RuleChoice)
    scheme: Scheme = DEFAULT_SCHEME
    crc: bool = False
    #: A single file's output format; None: from the output's suffix (a directory's shards
    #: each keep their own).
    format: Optional[str] = None

    #: Replace an existing output (a directory: start over, ignoring its manifest).
    overwrite: bool = False
    #: A directory: skip the files its manifest (and any parts' manifests) show done and intact.
    resume: bool = False
    #: Check the input's CRC.
    verify_crc: bool = True
    #: Threads that quantize each weight; None: every core this process may use.
    workers: Optional[int] = None
    #: Measure each layer's dequantization error (for --report).
    stats: bool = False
    #: Write the output through the page cache rather than around it (formats/direct.py).
    page_cache: bool = False
    #: A directory: convert only this part of its shards (see directory.py).
    part: Optional[Part] = None

    def settings(self, rules: Rules, out_format: Optional[str]) -> Settings:
        """What the output records, once the rules are resolved; `out_format` None: a
        directory's, whose shards each keep their format."""
        return Settings.of(rules, self.scheme, crc=self.crc, out_format=out_format)

