"""Peak memory of `ckpt-rtn convert` does not grow with the checkpoint's size."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from ckpt_rtn import dtypes
from ckpt_rtn.formats import TensorInfo, open_writer

from conftest import llama_shapes

#: Runs a command in a fresh process and prints the peak RSS (bytes) of its child.
MEASURE = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
           "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)")
DIMS = dict(hidden=1024, kv=256, ffn=2816, vocab=8000)


def make(path: Path, layers: int) -> int:
    """A Llama-shaped fp16 checkpoint; returns its largest tensor's size."""
    shapes = llama_shapes(layers=layers, **DIMS)
    block = np.random.default_rng(0).standard_normal((64, 4096)).astype(np.float16)
    infos = [TensorInfo.of(k, dtypes.FLOAT16, s) for k, s in shapes.items()]
    with open_writer(path, infos, format="ckpt", metadata={}) as writer:
        for info in infos:
            flat = np.resize(block, int(np.prod(info.shape)))  # cheap, non-constant data
            writer.write(info.name, flat.reshape(info.shape))
    return max(info.nbytes for info in infos)


def peak_rss(src: Path, dst: Path) -> int:
    command = [sys.executable, "-m", "ckpt_rtn", "convert", "-q", str(src), str(dst)]
    out = subprocess.run([sys.executable, "-c", MEASURE, *command], check=True,
                         capture_output=True, text=True).stdout
    return int(out.strip().splitlines()[-1])


def test_peak_rss_is_bounded_and_independent_of_model_size(tmp_path: Path) -> None:
    largest = make(tmp_path / "small.ckpt", layers=2)
    make(tmp_path / "large.ckpt", layers=16)
    grown = (tmp_path / "large.ckpt").stat().st_size - (tmp_path / "small.ckpt").stat().st_size
    assert grown > 300e6
    small = peak_rss(tmp_path / "small.ckpt", tmp_path / "small_out.ckpt")
    large = peak_rss(tmp_path / "large.ckpt", tmp_path / "large_out.ckpt")
    assert large <= 1.5 * 2**30 + 3 * largest
    # 8x the layers, +300 MB of input: the peak may move by a few buffers, not by the model.
    assert large - small < 3 * largest, (small, large, largest)
