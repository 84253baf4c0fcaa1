#!/usr/bin/env python3
"""Per-tensor cost: convert a checkpoint of many tiny tensors, next to `cat`.

MoE checkpoints hold ~100 000 tensors (DeepSeek-V3), so what ckpt-rtn spends
per tensor, not per byte, sets their conversion time. This writes a file of
N one-element float16 tensors (Llama2 norm names, so every tensor goes
through the rules and is copied), then times, each in a fresh process with
its peak RSS:

  (a) `cat in > out`, the time the bytes themselves take (page cache warm);
  (b) `ckpt-rtn convert -q` of the same file to the same format.

    python tools/bench_many_tensors.py --tensors 100000 --format ckpt safetensors

With `--shards S` the N tensors are split over S files in rank_<i>/ folders and
the directory is converted (its manifest, saved after each shard, and its
checks across shards then count too); `cat` becomes `cp -r`.

Prints, per format and count, the wall times, convert minus cat (the
per-tensor overhead) and peak RSS. Issue #10's targets on the 2-core machine:
100 000 tensors in <= 5 s beyond cat, at <= 250 MB peak RSS.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from typing import List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from bench_convert import measure  # noqa: E402
from ckpt_rtn import dtypes  # noqa: E402
from ckpt_rtn.formats import TensorInfo, open_writer  # noqa: E402


def tiny_tensors(count: int) -> List[TensorInfo]:
    """`count` one-element [1] float16 tensors under Llama2 norm names (copied, not quantized)."""
    return [TensorInfo.of(f"model.layers.{i // 2}.{('attention_norm', 'ffn_norm')[i % 2]}.weight",
                          dtypes.FLOAT16, (1,)) for i in range(count)]


def write(path: str, infos: List[TensorInfo], fmt: str) -> None:
    one = np.ones(1, np.float16)
    with open_writer(path, infos, format=fmt, metadata={}) as writer:
        for info in infos:
            writer.write(info.name, one.reshape(info.shape))


def write_shards(directory: str, infos: List[TensorInfo], fmt: str, shards: int) -> None:
    """`infos` split into `shards` near-equal files, one per rank_<i>/ folder."""
    for rank in range(shards):
        os.makedirs(os.path.join(directory, f"rank_{rank}"))
        write(os.path.join(directory, f"rank_{rank}", f"model.{fmt}"), infos[rank::shards], fmt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, nargs="+", default=[100_000])
    parser.add_argument("--format", nargs="+", choices=("ckpt", "safetensors"),
                        default=["ckpt", "safetensors"])
    parser.add_argument("--shards", type=int, default=1,
                        help="Split the tensors over this many files and convert the directory.")
    parser.add_argument("--dir", default=None, help="Scratch directory (default: a temp dir).")
    args = parser.parse_args()
    scratch = args.dir or tempfile.mkdtemp(prefix="ckpt-rtn-many-")
    os.makedirs(scratch, exist_ok=True)
    env = f"PYTHONPATH={os.path.dirname(HERE)} "
    print(f"{'format':<12} {'tensors':>9} {'file MB':>8} {'cat s':>7} {'convert s':>10} "
          f"{'overhead s':>11} {'peak RSS MB':>12}")
    for fmt in args.format:
        for count in args.tensors:
            sharded = args.shards > 1
            src = os.path.join(scratch, f"many_{fmt}" if sharded else f"many.{fmt}")
            dst = os.path.join(scratch, f"out_{fmt}" if sharded else f"out.{fmt}")
            if sharded:
                write_shards(src, tiny_tensors(count), fmt, args.shards)
            else:
                write(src, tiny_tensors(count), fmt)
            measure(f"cat {' '.join(files(src))} > /dev/null")  # warm the page cache
            cat = measure(f"cp -r {src} {dst}" if sharded else f"cat {src} > {dst}")
            remove(dst)
            run = measure(f"{env}{sys.executable} -m ckpt_rtn convert -q --config llama2 "
                          f"{src} {dst}")
            if run["rc"]:
                raise SystemExit(f"convert of {src} failed with exit status {run['rc']}")
            remove(dst)
            size = sum(os.path.getsize(path) for path in files(src))
            print(f"{fmt:<12} {count:>9} {size / 1e6:>8.1f} {cat['wall']:>7.2f} "
                  f"{run['wall']:>10.2f} {run['wall'] - cat['wall']:>11.2f} "
                  f"{run['rss'] / 1e6:>12.0f}")
            remove(src)


def files(path: str) -> List[str]:
    """`path` itself, or the files under it."""
    if not os.path.isdir(path):
        return [path]
    return [os.path.join(root, name) for root, _, names in os.walk(path) for name in names]


def remove(path: str) -> None:
    """A file or a directory tree."""
    if os.path.isdir(path):
        shutil.rmtree(path)
    else:
        os.unlink(path)


if __name__ == "__main__":
    main()
