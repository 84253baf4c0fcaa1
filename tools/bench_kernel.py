#!/usr/bin/env python3
"""RTN kernel throughput: the compiled kernels against numpy's reference steps, side by side.

Quantizes one 70B-shaped weight (8192 x 8192 by default, random normal
values, stored in the format asked for) with each scheme, on 1 thread and on
every core (or on each of --threads), with both kernels, and prints GB/s of
input weight and the ratio compiled / numpy. The figures are the quantizer
alone (a scheme's whole `quantize`: bounds, scales, codes, int4 packing),
without reading or writing a file; `tools/bench_convert.py` measures whole
conversions. As in a conversion, the code arrays are lent by a BufferPool
and given back after each run, so the figure is the quantizer's, without
the operating system zeroing fresh pages for those arrays (a fifth to two
fifths of the time, with fresh arrays, on this project's 2-core VM).

    python tools/bench_kernel.py
    python tools/bench_kernel.py --rows 28672 --cols 8192 --dtype bfloat16 --stats
    python tools/bench_kernel.py --threads 1,2,4,8,16
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchkit import counts  # noqa: E402
from ckpt_rtn import rtn  # noqa: E402
from ckpt_rtn.buffers import BufferPool  # noqa: E402
from ckpt_rtn.numerics import FloatFormat, to_storage  # noqa: E402
from ckpt_rtn.schemes import get_scheme  # noqa: E402

SCHEMES = {
    "w8a16": lambda: get_scheme("w8a16"),
    "w8a16-ptq asym": lambda: get_scheme("w8a16-ptq", symmetric=False),
    "w4a16 g128": lambda: get_scheme("w4a16", 128),
    "w4a16 g64 asym": lambda: get_scheme("w4a16", 64, symmetric=False),
}


def best_seconds(fn: Callable[[], object], repeat: int) -> float:
    fn()  # compiles (or loads the cached code), faults the arrays in
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return min(times)


def with_kernel(name: str, fn: Callable[[], float]) -> float:
    if name == "numpy":
        os.environ["CKPT_RTN_KERNEL"] = "numpy"
    else:
        os.environ.pop("CKPT_RTN_KERNEL", None)
    rtn.compiled_kernels.cache_clear()
    assert rtn.kernel_name() == name, f"the {name} kernel is not available"
    return fn()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--cols", type=int, default=8192)
    parser.add_argument("--dtype", choices=[f.value for f in FloatFormat], default="float16")
    parser.add_argument("--stats", action="store_true", help="also measure the error (--report)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=counts, metavar="N,N,...",
                        help="thread counts to measure, e.g. 1,2,4,8,16 (default: 1 and "
                             "every core)")
    args = parser.parse_args()
    fmt = FloatFormat(args.dtype)
    rng = np.random.default_rng(0)
    weight = to_storage((rng.standard_normal((args.rows, args.cols)) * 0.02).astype(np.float32),
                        fmt)
    cores = len(os.sched_getaffinity(0))
    print(f"weight [{args.rows}, {args.cols}] {fmt.value} ({weight.nbytes / 1e6:.0f} MB), "
          f"{cores} cores, numpy {np.__version__}, error stats {'on' if args.stats else 'off'}")
    print(f"{'scheme':18s} {'threads':>7s} {'numba GB/s':>11s} {'numpy GB/s':>11s} {'ratio':>6s}")
    for label, make in SCHEMES.items():
        scheme = make()
        for threads in args.threads or sorted({1, cores}):
            pool: Optional[ThreadPoolExecutor] = ThreadPoolExecutor(threads) if threads > 1 else None

            buffers = BufferPool(2 * weight.nbytes)

            def once() -> None:
                result = scheme.quantize(weight, fmt, pool=pool, stats=args.stats,
                                         buffers=buffers)
                buffers.give(result.arrays)

            def run() -> float:
                return best_seconds(once, args.repeat)

            rates = {name: weight.nbytes / with_kernel(name, run) / 1e9
                     for name in ("numba", "numpy")}
            if pool is not None:
                pool.shutdown()
            print(f"{label:18s} {threads:7d} {rates['numba']:11.2f} {rates['numpy']:11.2f} "
                  f"{rates['numba'] / rates['numpy']:6.1f}")


if __name__ == "__main__":
    main()
