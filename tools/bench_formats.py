#!/usr/bin/env python3
"""Per-tensor cost of the format readers and writers alone (`ckpt_rtn.formats`).

MoE checkpoints hold ~100 000 tensors, so what a reader or writer spends per
tensor, not per byte, matters. For N one-element float32 tensors this times,
per format: planned_size, writing the file, indexing it (open_reader), and
reading every tensor then finish() (with a CRC when --crc). Each figure is
the best of --repeat runs in CPU seconds of this process, which a busy
machine disturbs less than wall time; peak RSS is for the whole run.

    python tools/bench_formats.py --tensors 100000 1000000 --crc

(tools/bench_many_tensors.py times whole `ckpt-rtn convert` runs.)
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from typing import Callable, List

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from ckpt_rtn import dtypes, formats  # noqa: E402
from ckpt_rtn.formats import TensorInfo  # noqa: E402


def best(repeat: int, run: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        start = time.process_time()
        run()
        times.append(time.process_time() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, nargs="+", default=[100_000])
    parser.add_argument("--format", nargs="+", choices=formats.FORMATS,
                        default=list(formats.FORMATS))
    parser.add_argument("--crc", action="store_true", help="Write and verify CRCs.")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    scratch = tempfile.mkdtemp(prefix="ckpt-rtn-formats-")
    one = np.ones(1, np.float32)
    print(f"{'format':<12} {'tensors':>9} {'planned_size':>12} {'write':>7} {'index':>7} "
          f"{'read+finish':>11}   (CPU seconds)")
    for count in args.tensors:
        # short names: a million entries must fit safetensors' 100 MB header
        infos: List[TensorInfo] = [TensorInfo.of(f"layers.{i // 256}.experts.{i % 256}.w",
                                                 dtypes.FLOAT32, (1,)) for i in range(count)]
        for fmt in args.format:
            path = os.path.join(scratch, f"many.{fmt}")

            def write() -> None:
                with formats.open_writer(path, infos, format=fmt, metadata={"format": "ms"},
                                         crc=args.crc) as writer:
                    for info in infos:
                        writer.write(info.name, one)

            def index() -> None:
                formats.open_reader(path, verify_crc=False).close()

            def read_all() -> None:
                with formats.open_reader(path, defer_crc=True) as reader:
                    for info in reader.tensors:
                        reader.read(info)
                    reader.finish()

            plan = best(args.repeat, lambda: formats.planned_size(
                infos, format=fmt, metadata={"format": "ms"}, crc=args.crc))
            wrote = best(args.repeat, write)
            indexed = best(args.repeat, index)
            read = best(args.repeat, read_all)
            print(f"{fmt:<12} {count:>9} {plan:>12.2f} {wrote:>7.2f} {indexed:>7.2f} "
                  f"{read:>11.2f}", flush=True)
            os.unlink(path)
    os.rmdir(scratch)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
