#!/usr/bin/env python3
"""Side-by-side convert benchmark: cat vs ckpt-rtn (1 and all workers) vs naive MindSpore.

Generates a Llama2-70B-shaped FP16 checkpoint (hidden 8192, FFN 28672, 8 KV
heads, vocab 32000; ~1.7 GB per decoder layer plus 1.05 GB of embeddings and
head), then times, each in its own process with its peak RSS:

  (a) `cat in > out`, the I/O floor (page cache warmed first), and
      `dd conv=fsync`, the same copy made durable as ckpt-rtn's output is, and
      `dd oflag=direct conv=fsync`, made durable around the page cache as
      ckpt-rtn writes by default (the storage's own write speed), and the
      same write, in 256 MiB pieces, of as many zeros as W8A16's output has
      bytes: about the least time a conversion that writes that output
      durably can take (its size comes from one untimed conversion first,
      which also compiles the kernels);
  (b) `ckpt-rtn convert` with --workers 1 and with all cores (or each count
      of --workers, for a scaling sweep);
  (c) the naive script a MindSpore user would write: mindspore.load_checkpoint,
      numpy RTN per Linear weight, mindspore.save_checkpoint. It holds the whole
      model in memory several times over, so it runs on a smaller checkpoint
      (--naive-layers), next to ckpt-rtn on that same file.

    python tools/bench_convert.py --layers 11 --naive-layers 1 --dir /tmp/bench
    python tools/bench_convert.py --layers 3 --naive-layers 0 \
        --scheme-args "--scheme w4a16" --scheme-args "--scheme w4a16 --asymmetric"
    python tools/bench_convert.py --layers 4 --naive-layers 0 --dir /dev/shm/bench \
        --workers 1,2,4,8,16 --repeat 3

--scheme-args adds an all-workers ckpt-rtn run with those convert options
(repeatable), next to the default W8A16 runs and cat. --repeat N runs every
command N times, in interleaved rounds (cat, then each ckpt-rtn run, then
again), and keeps each one's fastest run: on a shared or virtual machine one
run of each is at the mercy of what else the machine did meanwhile.

Prints a table and the ratios ckpt-rtn/cat and naive/ckpt-rtn; paste it into
docs/benchmarks.md with the machine's cores and RAM. For each ckpt-rtn run it
also prints, from --report, the conversion's own time (the process's wall
time less Python's start and the imports), the seconds its read,
quantize and write stages were busy, the seconds its quantize stage waited
for numba's set-up before the first weight (kernels), and the conversion's
time over the busiest stage: the stage near it is the one that bounds the
run. A --page-cache run shows what writing around the page cache changes.
--cold drops the page cache before each run on that file (as root), for the
disk-bound figures; by default the input is read into the cache first.

--rev REV (repeatable) also runs every ckpt-rtn command with the package as
it is at that git revision (extracted with `git archive` into a scratch
directory; or REV is a directory holding a ckpt_rtn package), interleaved
with the working tree's: a change and its base,
side by side on one machine in one run. Each tree compiles its kernels in
its first round, so use --repeat 2 or more. --no-report times the ckpt-rtn
runs without --report (no error measurement, no stage times).

    python tools/bench_convert.py --layers 1 --naive-layers 0 --repeat 3 --rev main \
        --scheme-args "--scheme w4a16"

--python PY (repeatable) also runs every ckpt-rtn command of the working tree
under that interpreter, interleaved: a virtual environment holding only what
`pip install .` installs, say, next to the development one. Where SciPy is
importable (MindSpore's extra brings it), numba's set-up imports it to look
for BLAS, which every conversion waits for; the table's first lines say which
interpreter has it.

    python3 -m venv /tmp/converter && /tmp/converter/bin/pip install .
    python tools/bench_convert.py --layers 1 --naive-layers 0 --repeat 5 \
        --python /tmp/converter/bin/python --scheme-args "--scheme w4a16"
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

from benchkit import checkout, counts

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

#: Measures one command in a fresh process: wall time, peak RSS of its children, exit code.
_MEASURE = r"""
import json, resource, subprocess, sys, time
start = time.perf_counter()
rc = subprocess.run(sys.argv[1], shell=True).returncode
wall = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"wall": wall, "rss": rss, "rc": rc}))
"""

#: The baseline: what a MindSpore user writes without a streaming tool.
_NAIVE = r"""
import sys, re, numpy as np, mindspore as ms
src, dst = sys.argv[1], sys.argv[2]
pattern = re.compile(r"(attention\.(wq|wk|wv|wo)|feed_forward\.(w1|w2|w3))\.weight$")
params = ms.load_checkpoint(src)
out = []
for name, p in params.items():
    if not pattern.search(name):
        out.append({"name": name, "data": p})
        continue
    w = p.asnumpy().astype(np.float32)
    scale = (np.abs(w).max(axis=1) / 127.5).astype(np.float16)
    q = np.clip(np.rint((w / scale.astype(np.float32)[:, None]).astype(np.float16)), -128, 127)
    layer = name[:-len(".weight")]
    out.append({"name": layer + "._handler.weight", "data": ms.Tensor(q.astype(np.int8))})
    out.append({"name": layer + "._weight_quantizer.scale", "data": ms.Tensor(scale)})
    out.append({"name": layer + "._weight_quantizer.zp_neg",
                "data": ms.Tensor(np.zeros_like(scale))})
ms.save_checkpoint(out, dst)
"""


def measure(command: str) -> Dict[str, float]:
    result = subprocess.run([sys.executable, "-c", _MEASURE, command], check=True,
                            capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def make(path: str, layers: int) -> int:
    if not os.path.exists(path):
        subprocess.run([sys.executable, os.path.join(HERE, "make_llama_ckpt.py"), "--preset",
                        "70b", "--layers", str(layers), path], check=True)
    return os.path.getsize(path)


def drop_caches() -> None:
    """Write back and drop the page cache, so that the next run reads from the disk."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as exc:
        sys.exit(f"--cold: cannot drop the page cache ({exc}); run as root")


def remove(*paths: str) -> None:
    for path in paths:
        if os.path.exists(path):
            os.unlink(path)


def row(label: str, size: int, m: Dict[str, float],
        report: Optional[str] = None) -> Dict[str, object]:
    """One run's figures; with `report` (a ckpt-rtn --report), also its stage times."""
    ok = m["rc"] == 0
    stages, seconds = None, None
    if ok and report is not None:
        with open(report) as f:
            done = json.load(f)
        stages, seconds = done["stages"], done["seconds"]
        os.unlink(report)
    return {"run": label, "input_gb": size / 1e9, "wall_s": m["wall"] if ok else None,
            "gb_per_s": size / m["wall"] / 1e9 if ok else None, "peak_rss_gib": m["rss"] / 2**30,
            "stages": stages, "convert_s": seconds,
            "status": "ok" if ok else f"failed (exit {m['rc']})"}


Run = Tuple[str, str, Optional[str]]
#: The row of the least time a durable write of W8A16's output takes on this storage.
_FLOOR = "dd oflag=direct bs=256M, W8A16 output's bytes"


#: What an interpreter brings that changes ckpt-rtn's speed (see --python).
_ENVIRONMENT = r"""
import importlib.util, sys
import numba, numpy
scipy = "yes" if importlib.util.find_spec("scipy") else "no"
print(f"Python {sys.version.split()[0]}, numpy {numpy.__version__}, numba {numba.__version__}, "
      f"SciPy importable: {scipy}")
"""


def environment(python: str) -> str:
    """One line on `python`'s versions and whether numba's set-up will import SciPy."""
    try:
        result = subprocess.run([python, "-c", _ENVIRONMENT], capture_output=True, text=True)
    except OSError as exc:
        sys.exit(f"--python {python}: {exc.strerror}")
    lines = (result.stderr if result.returncode else result.stdout).strip().splitlines()
    if result.returncode or not lines:
        sys.exit(f"--python {python}: {lines[-1] if lines else 'not a Python interpreter'}")
    return lines[-1]


def under_interpreters(runs: List[Run], pythons: List[str]) -> List[Run]:
    """Each ckpt-rtn run again under each interpreter, with the working tree's package
    (run from the repository's root, which `python -m` imports first)."""
    prefix = f"{sys.executable} -m ckpt_rtn "
    return [(f"{label} ({python})",
             f"cd {shlex.quote(ROOT)} && {shlex.quote(python)} -m ckpt_rtn "
             + command[len(prefix):], report)
            for python in pythons for label, command, report in runs]


def at_revisions(runs: List[Run], trees: List[Tuple[str, str]]) -> List[Run]:
    """Each ckpt-rtn run again from each (revision, tree): run from the tree's directory,
    `python -m` imports that tree's package before any installed one."""
    return [(f"{label} @{rev}", f"cd {shlex.quote(tree)} && {command}", report)
            for rev, tree in trees for label, command, report in runs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=11, help="decoder layers (11: ~20 GB)")
    parser.add_argument("--naive-layers", type=int, default=1,
                        help="layers of the naive baseline's checkpoint (0: skip it)")
    parser.add_argument("--dir", default="/tmp/ckpt-rtn-bench")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each command, interleaved; the fastest is kept")
    parser.add_argument("--json", help="also write the rows as JSON here")
    parser.add_argument("--scheme-args", action="append", default=[], metavar="ARGS",
                        help="extra convert options for one more all-workers run "
                             "(repeatable), e.g. '--scheme w4a16 --asymmetric'")
    parser.add_argument("--workers", type=counts, metavar="N,N,...",
                        help="the W8A16 runs' worker counts, e.g. 1,2,4,8,16 for a scaling "
                             "sweep (default: 1 and every core); the largest is the "
                             "'all workers' run that the other runs use")
    parser.add_argument("--cold", action="store_true",
                        help="drop the page cache before each run on the --layers file "
                             "(root only), so each reads its input from the disk: the "
                             "disk-bound figures")
    parser.add_argument("--rev", action="append", default=[], metavar="REV",
                        help="also run each ckpt-rtn command as the package is at this git "
                             "revision, or in this directory (repeatable), interleaved with "
                             "the working tree's")
    parser.add_argument("--python", action="append", default=[], metavar="PY",
                        help="also run each ckpt-rtn command of the working tree under this "
                             "interpreter (repeatable), interleaved: a virtual environment "
                             "with only the converter's install, say")
    parser.add_argument("--no-report", action="store_true",
                        help="run ckpt-rtn without --report (no error measurement, no stage "
                             "times)")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    widest = max(args.workers) if args.workers else len(os.sched_getaffinity(0))
    sweep = args.workers or sorted({1, widest})
    scratch = tempfile.TemporaryDirectory(prefix="bench-revs-")
    trees = [(rev, checkout(ROOT, rev, scratch.name)) for rev in args.rev]  # a bad one fails first
    environments = {python: environment(python) for python in [sys.executable] + args.python}
    directory = os.path.abspath(args.dir)
    big = os.path.join(directory, f"llama70b_{args.layers}l.ckpt")
    out = os.path.join(directory, "out.ckpt")
    size = make(big, args.layers)
    report: Optional[str] = None if args.no_report else os.path.join(directory, "report.json")
    cli = f"{sys.executable} -m ckpt_rtn convert -q --overwrite"
    if report is not None:
        cli += f" --report {report}"
    rows: List[Dict[str, object]] = []

    if args.cold:
        drop_caches()  # refused early, before any run, where this is not root
    else:
        subprocess.run(f"cat {big} > /dev/null", shell=True, check=True)  # warm the page cache
    subprocess.run(f"{cli} --workers {widest} {big} {out}", shell=True, check=True)
    written = -(-os.path.getsize(out) // 4096) * 4096  # whole blocks, as O_DIRECT writes them
    remove(out, *([report] if report is not None else []))
    # cat leaves its output in the page cache; ckpt-rtn syncs its output before renaming it
    # (a crash never leaves a file that looks complete), so a copy that syncs is shown too.
    runs = [("cat in > out", f"cat {big} > {out}", None),
            ("dd conv=fsync (copy + sync)", f"dd if={big} of={out} bs=4M conv=fsync status=none",
             None),
            ("dd oflag=direct (copy + sync, no cache)",
             f"dd if={big} of={out} bs=16M oflag=direct conv=fsync status=none", None),
            (_FLOOR, f"dd if=/dev/zero of={out} bs=256M count={written} iflag=count_bytes "
                     "oflag=direct conv=fsync status=none", None)]
    runs += [(f"ckpt-rtn --workers {workers}", f"{cli} --workers {workers} {big} {out}", report)
             for workers in sweep]
    runs += [(f"ckpt-rtn --workers {widest} --page-cache",
              f"{cli} --workers {widest} --page-cache {big} {out}", report)]
    runs += [(f"ckpt-rtn --workers {widest} {extra}",
              f"{cli} --workers {widest} {extra} {big} {out}", report)
             for extra in args.scheme_args]
    ours = [run for run in runs if run[0].startswith("ckpt-rtn")]
    runs += under_interpreters(ours, args.python) + at_revisions(ours, trees)
    best: Dict[str, Dict[str, object]] = {}
    for _ in range(args.repeat):
        for label, command, path in runs:
            if args.cold:
                drop_caches()
            result = row(label, size, measure(command), path)
            remove(out)
            kept = best.get(label)
            if kept is None or (result["wall_s"] or float("inf")) < (kept["wall_s"] or float("inf")):
                best[label] = result
    rows.extend(best[label] for label, _, _ in runs)
    largest = 32000 * 8192 * 2
    bound = 1.5 * 2**30 + 3 * largest
    print(f"memory bound 1.5 GiB + 3 x largest tensor ({largest / 1e6:.0f} MB) = "
          f"{bound / 2**30:.2f} GiB")

    if args.naive_layers:
        small = os.path.join(args.dir, f"llama70b_{args.naive_layers}l.ckpt")
        small_size = make(small, args.naive_layers)
        subprocess.run(f"cat {small} > /dev/null", shell=True, check=True)
        rows.append(row(f"ckpt-rtn --workers {widest} (naive's input)", small_size,
                        measure(f"{cli} --workers {widest} {small} {out}"), report))
        remove(out)
        naive = f"{sys.executable} -c '{_NAIVE}' {small} {out}"
        rows.append(row("naive MindSpore (naive's input)", small_size, measure(naive)))
        remove(out)

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"machine: {len(os.sched_getaffinity(0))} cores, {ram:.1f} GiB RAM")
    for python, described in environments.items():
        print(f"{python}: {described}")
    # wall: the whole process (Python start, imports, kernel loading included); convert: the
    # conversion's own time from --report, which the stages are measured against.
    # kernels: the time the quantize stage waited for numba's set-up before its first weight.
    width = max(44, *(len(str(r["run"])) for r in rows))
    print(f"{'run':{width}s} {'input GB':>9s} {'wall s':>7s} {'GB/s':>6s} {'peak RSS GiB':>13s} "
          f"{'convert s':>10s} {'read s':>7s} {'quant s':>8s} {'write s':>8s} "
          f"{'kernels s':>10s} {'convert/busiest':>16s}  status")
    for r in rows:
        wall = f"{r['wall_s']:.2f}" if r["wall_s"] else "-"
        speed = f"{r['gb_per_s']:.3f}" if r["gb_per_s"] else "-"
        stages = r["stages"] or {}
        busy = [f"{stages[k]:.2f}" if k in stages else "-"
                for k in ("read_s", "quantize_s", "write_s", "kernels_s")]
        seconds = r["convert_s"]
        converting = f"{seconds:.2f}" if seconds else "-"
        busiest = max((stages[k] for k in ("read_s", "quantize_s", "write_s") if k in stages),
                      default=0.0)
        bound = f"{seconds / busiest:.2f}" if busiest and seconds else "-"
        print(f"{r['run']:{width}s} {r['input_gb']:9.2f} {wall:>7s} {speed:>6s} "
              f"{r['peak_rss_gib']:13.2f} {converting:>10s} {busy[0]:>7s} {busy[1]:>8s} "
              f"{busy[2]:>8s} {busy[3]:>10s} {bound:>16s}  {r['status']}")
    by = {r["run"]: r for r in rows}

    def ratio(a: str, b: str) -> Optional[float]:
        x, y = by.get(a, {}).get("gb_per_s"), by.get(b, {}).get("gb_per_s")
        return x / y if x and y else None

    all_cores = f"ckpt-rtn --workers {widest}"
    for label, value in (
            ("ckpt-rtn (all workers) / cat throughput", ratio(all_cores, "cat in > out")),
            *((f"ckpt-rtn --workers {workers} / cat throughput",
               ratio(f"ckpt-rtn --workers {workers}", "cat in > out"))
              for workers in sweep if workers != widest),
            ("ckpt-rtn (all workers) / copy + sync throughput",
             ratio(all_cores, "dd conv=fsync (copy + sync)")),
            ("ckpt-rtn (all workers) / direct copy + sync throughput",
             ratio(all_cores, "dd oflag=direct (copy + sync, no cache)")),
            ("ckpt-rtn (all workers) / its output's direct write alone",
             ratio(all_cores, _FLOOR)),
            ("ckpt-rtn --page-cache / cat throughput",
             ratio(f"{all_cores} --page-cache", "cat in > out")),
            ("ckpt-rtn / naive throughput (same input)",
             ratio(f"{all_cores} (naive's input)", "naive MindSpore (naive's input)")),
            *((f"ckpt-rtn {extra} / cat throughput",
               ratio(f"{all_cores} {extra}", "cat in > out")) for extra in args.scheme_args),
            *((f"ckpt-rtn (all workers){extra} ({python}) / cat throughput",
               ratio(f"{all_cores}{extra} ({python})", "cat in > out"))
              for python in args.python for extra in [""] + [f" {e}" for e in args.scheme_args])):
        print(f"{label}: {value:.2f}" if value else f"{label}: n/a")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    scratch.cleanup()


if __name__ == "__main__":
    main()
