"""Which tensors are quantized: per-model-family rules loaded from YAML.

The rules live in `configs/<family>.yaml` rather than in code so that the
converter and the deploy loader read one source of truth, and a new model
family is a new file. See configs/llama2.yaml for the schema.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

import yaml

from . import paths
from .errors import ConfigError
from .formats.tensor import TensorInfo

#: Built-in configs: the repository's configs/ directory (shipped in the package).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_FAMILY = "llama2"
WEIGHT_SUFFIX = ".weight"


#: Weight layouts: MindFormers Linear with transpose_b=True stores [out, in].
OUT_IN, IN_OUT = "out_in", "in_out"


@dataclass(frozen=True)
class WeightPattern:
    """A regular expression for Linear weights, and how those weights are laid out.

    `layout` None (an --include pattern) means: as the family's own rules say.
    """

    regex: "re.Pattern[str]"
    layout: Optional[str] = OUT_IN


@dataclass(frozen=True)
class Selection:
    """A weight chosen for quantization: its Linear layer path `<p>` and its layout.

    `layout` is None when nothing tells whether the weight is [out, in] or [in, out].
    """

    layer: str
    layout: Optional[str]


@dataclass(frozen=True)
class Rules:
    """Selection rules for one model family."""

    family: str
    linear_weights: Tuple[WeightPattern, ...]
    blacklist: Tuple[str, ...]
    #: A checkpoint is of this family when each of these matches some tensor name...
    detect: Tuple["re.Pattern[str]", ...] = ()
    #: ...and none of these matches any: a family whose names another one's extends
    #: (Llama's MLP in an MoE model's dense layers) is told apart by what it lacks.
    reject: Tuple["re.Pattern[str]", ...] = ()
    #: The family's own patterns, kept when --include replaces `linear_weights`:
    #: they still tell the layout of the weights --include selects.
    family_weights: Tuple[WeightPattern, ...] = ()
    #: Whose parameter names these are: MINDFORMERS (its legacy networks; no Mcore
    #: network loads them), HUGGING_FACE, or None where the rules file does not say.
    naming: Optional[str] = None

    def select(self, info: TensorInfo) -> Optional[Selection]:
        """Whether this tensor is a Linear weight to quantize, and how it is laid out."""
        if not (info.name.endswith(WEIGHT_SUFFIX) and len(info.shape) == 2
                and info.dtype.is_float):
            return None
        pattern = next((p for p in self.linear_weights if p.regex.search(info.name)), None)
        layer = info.name[:-len(WEIGHT_SUFFIX)]
        if pattern is None or self.is_blacklisted(layer):
            return None
        return Selection(layer, pattern.layout or self._family_layout(info.name))

    def _family_layout(self, name: str) -> Optional[str]:
        """The layout the family's rules give this weight, or its only layout, or None."""
        own = next((p for p in self.family_weights if p.regex.search(name)), None)
        if own is not None:
            return own.layout
        layouts = {p.layout for p in self.family_weights}
        return layouts.pop() if len(layouts) == 1 else None

    def layer_of(self, info: TensorInfo) -> Optional[str]:
        """The Linear layer path `<p>` if this tensor is a weight to quantize, else None."""
        selection = self.select(info)
        return None if selection is None else selection.layer

    def is_blacklisted(self, layer: str) -> bool:
        """Golden Stick's test: an entry is a substring of "root.<layer path>"."""
        path = f"root.{layer}"
        return any(entry in path for entry in self.blacklist)

    def matches(self, names: Iterable[str]) -> bool:
        """Whether a checkpoint with these tensor names is of this family."""
        names = list(names)
        return (bool(self.detect) and all(any(d.search(n) for n in names) for d in self.detect)
                and not any(r.search(n) for r in self.reject for n in names))

    def with_overrides(self, *, include: Iterable[str] = (), blacklist: Iterable[str] = (),
                       keep_default_blacklist: bool = True) -> "Rules":
        """These rules with the CLI's --include / --blacklist applied.

        --include replaces the family's weight patterns (the layout of what it
        selects still comes from the family's rules); --blacklist adds to (or,
        without the defaults, replaces) the family's blacklist.
        """
        include, blacklist = tuple(include), tuple(blacklist)
        patterns = _include_patterns(include, blacklist) or self.linear_weights
        base = self.blacklist if keep_default_blacklist else ()
        return replace(self, linear_weights=patterns, blacklist=base + blacklist)


@dataclass(frozen=True)
class RuleChoice:
    """What the user asked for (--config, --include, --blacklist), before the
    checkpoint's tensor names are known; no config means: detect the family."""

    config: Optional[str] = None
    include: Tuple[str, ...] = ()
    blacklist: Tuple[str, ...] = ()
    keep_default_blacklist: bool = True

    def __post_init__(self) -> None:
        """Fail on a bad option before any file is read."""
        _include_patterns(self.include, self.blacklist)
        if self.config:
            load_rules(self.config)

    def resolve(self, names: Iterable[str]) -> Rules:
        """The family's rules with the overrides; --include alone needs no family."""
        if self.config:
            base = load_rules(self.config)
        else:
            try:
                base = detect_family(names)
            except ConfigError:
                if not self.include:
                    raise
                base = include_only_rules()
        return base.with_overrides(include=self.include, blacklist=self.blacklist,
                                   keep_default_blacklist=self.keep_default_blacklist)


def available_families() -> List[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_rules(config: "str | os.PathLike[str] | None" = None) -> Rules:
    """Rules from a family name (`llama2`) or a path to a YAML file."""
    config = DEFAULT_FAMILY if config is None else os.fspath(config)
    path = Path(config)
    if not (config.endswith((".yaml", ".yml")) or os.sep in config):  # a family name
        path = CONFIG_DIR / f"{config}.yaml"
        if not path.exists():
            raise ConfigError(None, f"unknown model family {config!r}; built-in: "
                              f"{', '.join(available_families())}, or give a YAML path")
    return _rules_from(path, load_yaml(path))


def load_yaml(path: "os.PathLike[str] | str") -> object:
    """The document in a YAML input file (a regular file of UTF-8 text); any fault is one
    ConfigError."""
    text = paths.read_text(path, ConfigError)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(path, f"invalid YAML: {yaml_problem(exc)}") from None
    except RecursionError:
        raise ConfigError(path, "invalid YAML: nested too deeply") from None


def include_only_rules() -> Rules:
    """Rules for --include on a checkpoint of no known family: no blacklist, and the
    weights it selects laid out [out, in] (MindFormers' Linear with transpose_b,
    and torch's nn.Linear, the layout nearly every checkpoint uses)."""
    return Rules(family="custom", linear_weights=(), blacklist=(),
                 family_weights=(WeightPattern(re.compile(""), OUT_IN),))


def detect_family(names: Iterable[str]) -> Rules:
    """The one built-in family whose `detect` patterns all match these tensor names and
    whose `reject` patterns match none of them."""
    names = list(names)
    found = [rules for rules in map(load_rules, available_families()) if rules.matches(names)]
    if len(found) != 1:
        which = ", ".join(r.family for r in found) or "none"
        raise ConfigError(None, f"cannot tell the model family from the tensor names (matches: "
                          f"{which}); pass --config FAMILY or a YAML file, or --include REGEX")
    return found[0]


#: The keys of a rules YAML (the built-in ones in ckpt_rtn/configs/ show each in use).
_KEYS = ("family", "description", "naming", "linear_weights", "blacklist", "detect", "reject")
#: The values of `naming`.
MINDFORMERS, HUGGING_FACE = "mindformers", "hugging-face"


def _rules_from(path: Path, data: object) -> Rules:
    if not isinstance(data, dict):
        raise ConfigError(path, "expected a mapping with family, linear_weights, blacklist")
    # A typo (`blacklists:`) would drop what the key says, without a word; a key starting
    # with a dot is YAML's usual place for anchors (`.common: &common`), read by no one.
    unknown = sorted(key for key in map(str, set(data) - set(_KEYS)) if not key.startswith("."))
    if unknown:
        raise ConfigError(path, f"unknown key(s) {', '.join(unknown)}; a rules file takes "
                          f"{', '.join(_KEYS)}")
    patterns, blacklist = data.get("linear_weights"), data.get("blacklist", [])
    detect, reject = data.get("detect", []), data.get("reject", [])
    if not (isinstance(patterns, list) and patterns):
        raise ConfigError(path, "linear_weights must be a non-empty list")
    if not (isinstance(blacklist, list) and all(isinstance(b, str) and b for b in blacklist)):
        raise ConfigError(path, "blacklist must be a list of non-empty strings")
    for key, value in (("detect", detect), ("reject", reject)):
        if not (isinstance(value, list) and all(isinstance(d, str) for d in value)):
            raise ConfigError(path, f"{key} must be a list of regular expressions")
    naming = data.get("naming")
    if naming not in (None, MINDFORMERS, HUGGING_FACE):
        raise ConfigError(path, f"naming must be {MINDFORMERS} or {HUGGING_FACE}, not "
                          f"{naming!r}")
    weights = tuple(_weight_pattern(path, p) for p in patterns)
    return Rules(family=str(data.get("family", path.stem)), linear_weights=weights,
                 blacklist=tuple(blacklist), naming=naming,
                 detect=tuple(_compile(d, str(path)) for d in detect),
                 reject=tuple(_compile(r, str(path)) for r in reject), family_weights=weights)


def _weight_pattern(path: Path, entry: object) -> WeightPattern:
    """A linear_weights entry: a regex ([out, in]) or {pattern: regex, layout: out_in|in_out}."""
    if isinstance(entry, str):
        return WeightPattern(_compile(entry, str(path)))
    if (isinstance(entry, dict) and isinstance(entry.get("pattern"), str)
            and entry.get("layout", OUT_IN) in (OUT_IN, IN_OUT)
            and set(entry) <= {"pattern", "layout"}):  # `layuot:` would mean out_in
        return WeightPattern(_compile(entry["pattern"], str(path)), entry.get("layout", OUT_IN))
    raise ConfigError(path, f"linear_weights entry {entry!r}: expected a regular expression or "
                      f"{{pattern: REGEX, layout: {OUT_IN}|{IN_OUT}}}")


def _include_patterns(include: Tuple[str, ...],
                      blacklist: Tuple[str, ...]) -> Tuple[WeightPattern, ...]:
    """--include as weight patterns of the family's layout, after checking --blacklist."""
    if not all(blacklist):
        raise ConfigError(None, "--blacklist: an empty entry would match every layer")
    if not all(include):
        raise ConfigError(None, "--include: an empty pattern would select every 2-D float "
                          "weight (embeddings too)")
    return tuple(WeightPattern(_compile(p, "--include"), None) for p in include)


def _compile(pattern: str, where: str) -> "re.Pattern[str]":
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(None, f"{where}: invalid regular expression {pattern!r}: {exc}") from None
    except (OverflowError, RecursionError):  # a{4294967296}; groups nested thousands deep
        raise ConfigError(None, f"{where}: regular expression {pattern[:60]!r}"
                          f"{'...' if len(pattern) > 60 else ''} is too large to compile") from None


def yaml_problem(exc: "yaml.YAMLError") -> str:
    """PyYAML's multi-line message as 'problem at line L, column C'."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


def recorded_rules(family: str, linear_weights: Iterable[Tuple[str, Optional[str]]],
                   family_weights: Iterable[Tuple[str, Optional[str]]],
                   blacklist: Iterable[str]) -> Rules:
    """Rules rebuilt from a conversion's recorded settings (see settings.py): they select
    exactly what the recorded ones did, without the YAML file they came from."""
    def patterns(entries: Iterable[Tuple[str, Optional[str]]]) -> Tuple[WeightPattern, ...]:
        return tuple(WeightPattern(_compile(p, "recorded rules"), layout) for p, layout in entries)
    return Rules(family=family, linear_weights=patterns(linear_weights),
                 blacklist=tuple(blacklist), family_weights=patterns(family_weights))
