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

from .errors import ConfigError
from .formats.tensor import TensorInfo

#: Built-in configs: the repository's configs/ directory (shipped in the package).
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_FAMILY = "llama2"
WEIGHT_SUFFIX = ".weight"


@dataclass(frozen=True)
class Rules:
    """Selection rules for one model family."""

    family: str
    linear_weights: Tuple["re.Pattern[str]", ...]
    blacklist: Tuple[str, ...]

    def layer_of(self, info: TensorInfo) -> Optional[str]:
        """The Linear layer path `<p>` if this tensor is a weight to quantize, else None."""
        if not (info.name.endswith(WEIGHT_SUFFIX) and len(info.shape) == 2
                and info.dtype.is_float):
            return None
        if not any(p.search(info.name) for p in self.linear_weights):
            return None
        layer = info.name[:-len(WEIGHT_SUFFIX)]
        return None if self.is_blacklisted(layer) else layer

    def is_blacklisted(self, layer: str) -> bool:
        """Golden Stick's test: an entry is a substring of "root.<layer path>"."""
        path = f"root.{layer}"
        return any(entry in path for entry in self.blacklist)

    def with_overrides(self, *, include: Iterable[str] = (), blacklist: Iterable[str] = (),
                       keep_default_blacklist: bool = True) -> "Rules":
        """These rules with the CLI's --include / --blacklist applied.

        --include replaces the family's weight patterns; --blacklist adds to
        (or, without the defaults, replaces) the family's blacklist.
        """
        include, blacklist = tuple(include), tuple(blacklist)
        if not all(blacklist):
            raise ConfigError(None, "--blacklist: an empty entry would match every layer")
        patterns = tuple(_compile(p, "--include") for p in include) or self.linear_weights
        base = self.blacklist if keep_default_blacklist else ()
        return replace(self, linear_weights=patterns, blacklist=base + blacklist)


def available_families() -> List[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_rules(config: "str | os.PathLike[str] | None" = None) -> Rules:
    """Rules from a family name (`llama2`) or a path to a YAML file."""
    config = DEFAULT_FAMILY if config is None else os.fspath(config)
    path = Path(config)
    if not (config.endswith((".yaml", ".yml")) or path.exists()):
        path = CONFIG_DIR / f"{config}.yaml"
        if not path.exists():
            raise ConfigError(None, f"unknown model family {config!r}; built-in: "
                              f"{', '.join(available_families())}, or give a YAML path")
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(path, f"cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(path, f"invalid YAML: {_one_line(exc)}") from None
    return _rules_from(path, data)


def _rules_from(path: Path, data: object) -> Rules:
    if not isinstance(data, dict):
        raise ConfigError(path, "expected a mapping with family, linear_weights, blacklist")
    patterns, blacklist = data.get("linear_weights"), data.get("blacklist", [])
    if not (isinstance(patterns, list) and patterns and all(isinstance(p, str) for p in patterns)):
        raise ConfigError(path, "linear_weights must be a non-empty list of regular expressions")
    if not (isinstance(blacklist, list) and all(isinstance(b, str) and b for b in blacklist)):
        raise ConfigError(path, "blacklist must be a list of non-empty strings")
    return Rules(family=str(data.get("family", path.stem)),
                 linear_weights=tuple(_compile(p, str(path)) for p in patterns),
                 blacklist=tuple(blacklist))


def _compile(pattern: str, where: str) -> "re.Pattern[str]":
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ConfigError(None, f"{where}: invalid regular expression {pattern!r}: {exc}") from None


def _one_line(exc: "yaml.YAMLError") -> str:
    """PyYAML's multi-line message as 'problem at line L, column C'."""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem
