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

With --rev, the same measurement also runs on the package as at a git
revision (or in a directory holding one), each tree in a fresh process, in
turn, --rounds times, and a last table gives each tree's range of compiled
GB/s side by side: a kernel change's A/B with one command, measured by the
same code.

    python tools/bench_kernel.py
    python tools/bench_kernel.py --rows 28672 --cols 8192 --dtype bfloat16 --stats
    python tools/bench_kernel.py --threads 1,2,4,8,16
    python tools/bench_kernel.py --threads 1,16 --rev e202938 --rev HEAD~1
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: Set for a run on another tree's package (--rev): the directory to import it from.
TREE = "CKPT_RTN_BENCH_TREE"
sys.path.insert(0, os.environ.get(TREE) or ROOT)

from benchkit import checkout, counts  # noqa: E402
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
    parser.add_argument("--rev", action="append", default=[], metavar="REV",
                        help="also measure the package as at this git revision, or in this "
                             "directory (repeatable)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="with --rev: how many times each tree is measured, in turn")
    args = parser.parse_args()
    if args.rev:
        compare(args)
        return
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


def compare(args: argparse.Namespace) -> None:
    """Run this measurement on the working tree and on each --rev, each in a fresh process,
    in turn, --rounds times; print every run, then each tree's range of compiled GB/s."""
    forwarded = ["--rows", str(args.rows), "--cols", str(args.cols), "--dtype", args.dtype,
                 "--repeat", str(args.repeat)]
    forwarded += ["--stats"] if args.stats else []
    forwarded += ["--threads", ",".join(map(str, args.threads))] if args.threads else []
    rates: Dict[Tuple[str, int], Dict[str, List[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-revs-") as scratch:
        trees = [("working tree", ROOT)]
        trees += [(rev, checkout(ROOT, rev, scratch)) for rev in args.rev]  # a bad one fails
        for round_ in range(1, args.rounds + 1):
            for label, tree in trees:
                print(f"== {label}, round {round_}", flush=True)
                run = subprocess.run([sys.executable, os.path.abspath(__file__), *forwarded],
                                     env={**os.environ, TREE: tree}, stdout=subprocess.PIPE,
                                     text=True)  # its errors go to our stderr as they come
                print(run.stdout, end="", flush=True)
                if run.returncode:
                    sys.exit(f"bench_kernel.py on {label} ({tree}) failed: exit {run.returncode}")
                for scheme, threads, numba in table_rows(run.stdout):
                    rates.setdefault((scheme, threads), {}).setdefault(label, []).append(numba)
    names = [label for label, _ in trees]
    width = max(14, *(len(name) for name in names))
    print(f"\ncompiled GB/s, lowest-highest of {args.rounds} rounds")
    print(f"{'scheme':18s} {'threads':>7s} " + " ".join(f"{name:>{width}s}" for name in names))
    for (scheme, threads), by_tree in rates.items():
        cells = [by_tree.get(name, []) for name in names]
        text = [f"{min(c):.2f}-{max(c):.2f}" if c else "-" for c in cells]
        print(f"{scheme:18s} {threads:7d} " + " ".join(f"{t:>{width}s}" for t in text))


def table_rows(output: str) -> List[Tuple[str, int, float]]:
    """(scheme, threads, compiled GB/s) of each row of a run's table."""
    rows = []
    for line in output.splitlines():
        words = line.split()
        if len(words) < 5 or not words[-4].isdigit():
            continue
        try:
            rows.append((" ".join(words[:-4]), int(words[-4]), float(words[-3])))
        except ValueError:
            continue
    return rows


if __name__ == "__main__":
    main()
