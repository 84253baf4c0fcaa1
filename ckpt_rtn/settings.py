"""The settings a conversion was made with, recorded in what it writes.

Only what decides the output's bytes is recorded: ckpt-rtn's version, the
scheme (group size, symmetry), the resolved selection rules (family name,
every Linear weight pattern with its layout, the blacklist), the CRC trailer
and the output format. That is enough for `ckpt-rtn verify` to rebuild the
rules and the scheme and convert the source again, without the YAML file or
the command line that made the output, and for `--resume` to tell whether a
directory's manifest belongs to the same conversion.

A safetensors output carries the JSON under `__metadata__[NAME]`; a `.ckpt`
carries it as a `str` record called NAME after the tensors, where
MindSpore's `append_dict` puts its values: `mindspore.load_checkpoint`
returns it as a Python str, which `load_param_into_net` leaves alone.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from typing import Callable, Dict, Optional, Tuple

from . import __version__
from .dtypes import STRING
from .errors import ConfigError, FormatError
from .formats import untrusted_json
from .formats.untrusted_json import brief
from .formats.tensor import TensorReader
from .rules import IN_OUT, OUT_IN, Rules, recorded_rules
from .schemes import SCHEME_NAMES, Scheme, get_scheme

#: The safetensors metadata key and the `.ckpt` str record that hold the settings.
NAME = "ckpt_rtn_settings"
TOOL = "ckpt-rtn"
_FORMATS = ("ckpt", "safetensors")

Patterns = Tuple[Tuple[str, Optional[str]], ...]


@dataclass(frozen=True)
class Settings:
    """What a conversion's output bytes depend on; `format` None: each shard keeps its own
    (a directory's manifest)."""

    version: str
    scheme: str
    group_size: Optional[int]
    symmetric: bool
    family: str
    #: (regular expression, layout) of each Linear weight pattern; layout None: the family's.
    linear_weights: Patterns
    #: The family's own patterns, which give the layout where `linear_weights` do not.
    family_weights: Patterns
    blacklist: Tuple[str, ...]
    crc: bool
    format: Optional[str]

    @classmethod
    def of(cls, rules: Rules, scheme: Scheme, *, crc: bool,
           out_format: Optional[str]) -> "Settings":
        return cls(version=__version__, scheme=scheme.name,
                   group_size=scheme.group_size, symmetric=scheme.spec.symmetric,
                   family=rules.family, linear_weights=_patterns(rules.linear_weights),
                   family_weights=_patterns(rules.family_weights),
                   blacklist=tuple(rules.blacklist), crc=crc, format=out_format)

    def with_format(self, out_format: Optional[str]) -> "Settings":
        return replace(self, format=out_format)

    def build_rules(self) -> Rules:
        return recorded_rules(self.family, self.linear_weights, self.family_weights,
                              self.blacklist)

    def build_scheme(self) -> Scheme:
        return get_scheme(self.scheme, self.group_size, symmetric=self.symmetric)

    @property
    def summary(self) -> str:
        """One line, e.g. 'ckpt-rtn 0.1.0: w4a16 g64 asymmetric, llama2 rules, blacklist lm_head'."""
        parts = [self.build_scheme().label, f"{self.family} rules"]
        if self.linear_weights != self.family_weights:
            parts.append("include " + " ".join(p for p, _ in self.linear_weights))
        parts.append("blacklist " + (" ".join(self.blacklist) or "-"))
        if self.crc:
            parts.append("CRC")
        return f"{TOOL} {self.version}: {', '.join(parts)}"

    def to_dict(self) -> Dict[str, object]:
        """JSON-ready: lists, not tuples, so a parsed copy compares equal."""
        return {"tool": TOOL, "version": self.version, "scheme": self.scheme,
                "group_size": self.group_size, "symmetric": self.symmetric,
                "family": self.family,
                "linear_weights": [{"pattern": p, "layout": lay} for p, lay in self.linear_weights],
                "family_weights": [{"pattern": p, "layout": lay} for p, lay in self.family_weights],
                "blacklist": list(self.blacklist), "crc": self.crc, "format": self.format}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str, path: "os.PathLike[str] | str") -> "Settings":
        """Parse recorded settings, which are untrusted: only FormatError comes out."""
        return cls.from_dict(untrusted_json.loads(text, path, f"recorded {TOOL} settings"),
                             path)

    @classmethod
    def from_dict(cls, data: object, path: "os.PathLike[str] | str | None") -> "Settings":
        def bad(reason: str) -> FormatError:
            return FormatError(path, f"recorded {TOOL} settings: {reason}")

        if not isinstance(data, dict):
            raise bad("not a JSON object")
        tool = data.get("tool")
        if tool != TOOL:
            raise bad(f"no tool name: not those of this {TOOL} version" if tool is None
                      else f"written by {brief(tool)}, not {TOOL}")
        values = {}
        for key, (check, expected) in _FIELDS.items():
            if key not in data:
                raise bad(f"{key} is missing")
            if not check(data.get(key)):
                raise bad(f"{key} is {brief(data.get(key))}, expected {expected}")
            values[key] = data[key]
        settings = cls(version=values["version"], scheme=values["scheme"],
                       group_size=values["group_size"], symmetric=values["symmetric"],
                       family=values["family"],
                       linear_weights=_pattern_tuple(values["linear_weights"]),
                       family_weights=_pattern_tuple(values["family_weights"]),
                       blacklist=tuple(values["blacklist"]), crc=values["crc"],
                       format=values["format"])
        try:
            settings.build_scheme()
            settings.build_rules()
        except ValueError as exc:
            raise bad(str(exc)) from None
        except ConfigError as exc:
            raise bad(exc.reason) from None
        return settings


def recorded(reader: TensorReader) -> Optional[Settings]:
    """A file's recorded settings: its str record NAME (`.ckpt`) or its metadata's NAME
    (safetensors); None if it records none."""
    info = next((t for t in reader.tensors if t.name == NAME and t.dtype is STRING), None)
    if info is None:
        text = reader.metadata.get(NAME)
        return None if text is None else Settings.from_json(text, reader.path)
    if info.nbytes % 4:
        raise FormatError(reader.path, f"str record {NAME!r} holds {info.nbytes} bytes, "
                          "not a whole number of UTF-32 characters")
    try:  # numpy makes a str of any code units, even past U+10FFFF: re then fails inside
        text = reader.read(info).tobytes().decode("utf-32-le")
    except UnicodeDecodeError as exc:
        raise FormatError(reader.path, f"str record {NAME!r} is not UTF-32 text ({exc.reason} "
                          f"at byte {exc.start})") from None
    return Settings.from_json(text, reader.path)


def _patterns(patterns) -> Patterns:
    return tuple((p.regex.pattern, p.layout) for p in patterns)


def _pattern_tuple(entries: list) -> Patterns:
    return tuple((e["pattern"], e["layout"]) for e in entries)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_pattern_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(e, dict) and set(e) == {"pattern", "layout"} and isinstance(e["pattern"], str)
        and e["layout"] in (OUT_IN, IN_OUT, None) for e in value)


_FIELDS: Dict[str, Tuple[Callable[[object], bool], str]] = {
    "version": (lambda v: isinstance(v, str) and bool(v), "a version string"),
    "scheme": (lambda v: v in SCHEME_NAMES, " or ".join(SCHEME_NAMES)),
    "group_size": (lambda v: v is None or (_is_int(v) and v > 0), "a group size or null"),
    "symmetric": (lambda v: isinstance(v, bool), "true or false"),
    "family": (lambda v: isinstance(v, str), "a family name"),
    "linear_weights": (lambda v: _is_pattern_list(v) and bool(v),
                       "a non-empty list of {pattern, layout}"),
    "family_weights": (_is_pattern_list, "a list of {pattern, layout}"),
    "blacklist": (lambda v: isinstance(v, list) and all(isinstance(b, str) and b for b in v),
                  "a list of non-empty strings"),
    "crc": (lambda v: isinstance(v, bool), "true or false"),
    "format": (lambda v: v is None or v in _FORMATS, "ckpt, safetensors or null"),
}
