#!/usr/bin/env bash
# The many-core figures of docs/benchmarks.md in one run: the machine, whole conversions
# side by side with cat over a sweep of worker counts (data in RAM), then the kernel alone
# over a sweep of threads. Made for a lent 16-core box, where time is short: one call.
#
#   bash tools/bench_cores.sh OUT_DIR [LAYERS [REPEAT]]
#
# LAYERS 4 makes the 7.9 GB 70B-shaped file of issue #12's 16-core figures. Set
# BENCH_DIR to put the data elsewhere than /dev/shm. Each step writes its own file
# in OUT_DIR as it goes, so a run cut short still leaves what it measured.
set -u
out=${1:?usage: bench_cores.sh OUT_DIR [LAYERS [REPEAT]]}
layers=${2:-4}
repeat=${3:-3}
data=${BENCH_DIR:-/dev/shm/ckpt-rtn-bench}
here=$(cd "$(dirname "$0")" && pwd)
cores=$(nproc)
sweep=$(python3 -c "print(','.join(str(n) for n in sorted({1, 2, 4, 8, $cores}) if n <= $cores))")
export PYTHONUNBUFFERED=1
mkdir -p "$out" "$data"
{
    echo "cores: $cores"
    grep -m1 "model name" /proc/cpuinfo
    free -g | head -2
    df -h "$data" | tail -1
    python3 -c "import sys, numpy, numba; print('python', sys.version.split()[0], \
'numpy', numpy.__version__, 'numba', numba.__version__)"
} 2>&1 | tee "$out/machine.txt"
python3 "$here/bench_convert.py" --layers "$layers" --naive-layers 0 --dir "$data" \
    --workers "$sweep" --repeat "$repeat" --json "$out/convert.json" \
    --scheme-args "--scheme w4a16" --scheme-args "--scheme w4a16 --asymmetric" \
    2>&1 | tee "$out/convert.txt"
python3 "$here/bench_kernel.py" --threads "$sweep" 2>&1 | tee "$out/kernel.txt"
rm -rf "$data"
