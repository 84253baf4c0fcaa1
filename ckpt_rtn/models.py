"""A model directory's description (`model.yaml`) and the MindFormers network it builds.

`ckpt-rtn import-gguf` writes a checkpoint, a tokenizer and a `model.yaml`
beside them; evaluation and the deploy loader read the YAML back to rebuild
the same network. The YAML holds only the architecture (LlamaConfig keyword
arguments); the run-time values (sequence length, dtypes, the settings that
make MindFormers Llama work on CPU) are chosen by
`ckpt_rtn.runtime.network.build_llama`, so one file serves every use.

MindSpore-free: `import-gguf` writes these files without the [mindspore] extra.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Tuple, Type

import yaml

from .errors import ConfigError
from .formats.atomic import write_bytes_atomic
from . import paths
from .dtypes import FLOAT16
from .formats.tensor import TensorInfo
from .rules import load_rules, load_yaml

if TYPE_CHECKING:  # pragma: no cover - typing only
    import tokenizers

#: File names `import-gguf` writes into its output directory.
MODEL_YAML = "model.yaml"
CHECKPOINT = "model.ckpt"
TOKENIZER = "tokenizer.json"

#: LlamaConfig architecture keywords a model.yaml must give, and their types.
REQUIRED_KEYS: Dict[str, Type[Any]] = {
    "hidden_size": int, "num_layers": int, "num_heads": int,
    "intermediate_size": int, "vocab_size": int,
}
#: Architecture keywords it may give (LlamaConfig's defaults apply otherwise).
OPTIONAL_KEYS: Dict[str, Tuple[Type[Any], ...]] = {
    "n_kv_heads": (int,), "rms_norm_eps": (float,), "theta": (float,),
    "tie_word_embeddings": (bool,), "pad_token_id": (int,), "bos_token_id": (int,),
    "eos_token_id": (int,),
}
#: LlamaConfig keywords the network builder sets for each run, never a model.yaml.
RUNTIME_KEYS = frozenset({"batch_size", "seq_length", "use_past", "use_rope_slice",
                          "fused_rms_norm", "compute_dtype", "param_init_type",
                          "layernorm_compute_type", "softmax_compute_type", "rotary_dtype"})
_HEADER = "# written by ckpt-rtn import-gguf\n"


@dataclass
class ModelConfig:
    """What a model directory holds: rules family, file names, architecture.

    `base_dir` is the directory of the YAML file, against which `checkpoint`
    and `tokenizer` are resolved, so a model directory can be moved whole.
    """

    model: Dict[str, Any]
    family: str = "llama2"
    checkpoint: str = CHECKPOINT
    tokenizer: str = TOKENIZER
    base_dir: Path = field(default_factory=Path, compare=False)

    @property
    def tokenizer_path(self) -> Path:
        return self.base_dir / self.tokenizer

    @property
    def checkpoint_path(self) -> Path:
        return self.base_dir / self.checkpoint

    def to_yaml(self) -> str:
        """The YAML text `save` writes (base_dir is where it is saved, not content)."""
        data = {"family": self.family, "checkpoint": self.checkpoint,
                "tokenizer": self.tokenizer, "model": dict(self.model)}
        return _HEADER + yaml.safe_dump(data, sort_keys=False)

    def save(self, path: "os.PathLike[str] | str") -> None:
        """Write the YAML atomically, so a reader never sees half a config."""
        check_architecture(Path(path), self.model)
        write_bytes_atomic(path, self.to_yaml().encode("utf-8"))


def load_model_config(path: "os.PathLike[str] | str") -> ModelConfig:
    """Read and validate a model.yaml; any problem is a one-line ConfigError."""
    path = Path(path)
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(path, "expected a mapping with family, tokenizer and model")
    unknown = sorted(set(data) - {"family", "checkpoint", "tokenizer", "model"})
    if unknown:
        raise ConfigError(path, f"unknown key(s): {', '.join(map(str, unknown))}")
    for key in ("family", "checkpoint", "tokenizer"):
        if not isinstance(data.get(key, ""), str):
            raise ConfigError(path, f"{key} must be a string")
    model = data.get("model")
    if not isinstance(model, dict):
        raise ConfigError(path, "model must be a mapping of LlamaConfig architecture keywords")
    check_architecture(path, model)
    return ModelConfig(model=model, family=_family(path, data.get("family", "llama2")),
                       checkpoint=data.get("checkpoint", CHECKPOINT),
                       tokenizer=data.get("tokenizer", TOKENIZER),
                       base_dir=path.resolve().parent)


def _family(path: Path, family: str) -> str:
    """model.yaml's rules family: a built-in name, or a rules YAML, found beside model.yaml
    as its checkpoint and tokenizer are (it was looked for in the working directory). It must
    select the network's Linear weights, MindFormers' Llama names: an unknown family failed
    only in the measuring process, and hf-llama or gpt2 measured 0 MB of Linear weights,
    exit 0."""
    if family.endswith((".yaml", ".yml")) or os.sep in family:
        family = str(path.resolve().parent / family)
    try:
        rules = load_rules(family)
    except ConfigError as exc:
        raise ConfigError(path, f"family: {exc}") from None
    if rules.select(TensorInfo.of("model.layers.0.attention.wq.weight", FLOAT16, (2, 2))) is None:
        raise ConfigError(path, f"family {family} selects none of the network's Linear layers "
                          "(MindFormers' Llama: model.layers.N.attention.wq, ...); use llama2, "
                          "or rules that select them")
    return family


def _type_ok(value: object, types: Tuple[Type[Any], ...]) -> bool:
    """isinstance, except that bool is not an int, and an int may stand for a float."""
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types) or (float in types and isinstance(value, int))


def check_architecture(path: Optional[Path], model: Mapping[str, Any]) -> None:
    """Catch typos and run-time keys early: LlamaConfig swallows unknown keywords."""
    missing = [k for k in REQUIRED_KEYS if k not in model]
    if missing:
        raise ConfigError(path, f"model: missing {', '.join(missing)}")
    allowed = {**{k: (t,) for k, t in REQUIRED_KEYS.items()}, **OPTIONAL_KEYS}
    for key, value in model.items():
        if key not in allowed:
            why = "is chosen at run time" if key in RUNTIME_KEYS else \
                "is not an architecture keyword ckpt-rtn knows"
            raise ConfigError(path, f"model.{key} {why}")
        types = allowed[key]
        if not _type_ok(value, types):
            raise ConfigError(path, f"model.{key} must be {types[0].__name__}, got {value!r}")
        minimum = 0 if key.endswith("_token_id") else 1
        if types[0] is int and value < minimum:
            raise ConfigError(path, f"model.{key} must be at least {minimum}, got {value}")
        if types[0] is float and not math.isfinite(value):
            raise ConfigError(path, f"model.{key} must be finite, got {value!r}")
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):  # a Gather traceback
        if model.get(key, 0) >= model["vocab_size"]:
            raise ConfigError(path, f"model.{key} is {model[key]}, beyond the vocabulary "
                              f"(vocab_size {model['vocab_size']})")
    if model.get("theta", 1.0) <= 0:  # NaN perplexity
        raise ConfigError(path, f"model.theta must be positive, got {model['theta']!r}")
    heads, kv_heads = model["num_heads"], model.get("n_kv_heads", model["num_heads"])
    if model["hidden_size"] % heads or heads % kv_heads:
        raise ConfigError(path, "model: hidden_size must be a multiple of num_heads, and "
                          "num_heads of n_kv_heads")


def load_tokenizer(config: ModelConfig) -> "tokenizers.Tokenizer":
    """The model's tokenizer (HF `tokenizers` JSON named by the config)."""
    from tokenizers import Tokenizer

    path = config.tokenizer_path
    paths.input_stat(path, ConfigError, "a tokenizer file")
    try:
        return Tokenizer.from_file(os.fspath(path))
    except Exception as exc:  # tokenizers raises a bare Exception for any bad file
        raise ConfigError(path, f"cannot load the tokenizer: {exc}") from None


def load_text_codec(config: ModelConfig, path: "os.PathLike[str] | str | None" = None
                    ) -> Tuple[Callable[[str], List[int]], Callable[[List[int]], str]]:
    """encode/decode functions for the model's tokenizer, or for `path`.

    `path` may be a tokenizers JSON or a sentencepiece `.model` (the file
    Llama2 checkpoints come with).
    """
    if path is not None and os.fspath(path).endswith(".model"):
        import sentencepiece

        paths.input_stat(path, ConfigError, "a sentencepiece model")
        try:
            processor = sentencepiece.SentencePieceProcessor(model_file=os.fspath(path))
        except (OSError, RuntimeError) as exc:
            raise ConfigError(path, f"cannot load the sentencepiece model: {exc}") from None
        return processor.encode, processor.decode
    if path is not None:
        config = ModelConfig(model=config.model, family=config.family,
                             tokenizer=os.fspath(Path(path).resolve()))
    tokenizer = load_tokenizer(config)
    return (lambda text: tokenizer.encode(text).ids), tokenizer.decode
