#!/usr/bin/env bash
# The many-core figures of docs/benchmarks.md in one run, made for a lent 16-core box where
# time is short: the machine, whole conversions side by side with cat over a sweep of worker
# counts with the data in RAM, the kernel alone over a sweep of threads, and conversions
# read from the disk with the page cache dropped before each run (root only).
#
#   bash tools/bench_cores.sh OUT_DIR [LAYERS [REPEAT]]
#
# LAYERS 4 makes the 7.9 GB 70B-shaped file of issue #12's 16-core figures. STEPS picks the
# steps (default "ram kernel disk"); RAM_DIR (default /dev/shm/ckpt-rtn-bench) and DISK_DIR
# (default /var/tmp/ckpt-rtn-bench) say where the data goes. Each step writes its own files
# in OUT_DIR as it goes, so a run cut short still leaves what it measured.
set -u
out=${1:?usage: bench_cores.sh OUT_DIR [LAYERS [REPEAT]]}
layers=${2:-4}
repeat=${3:-3}
steps=${STEPS:-ram kernel disk}
ram=${RAM_DIR:-/dev/shm/ckpt-rtn-bench}
disk=${DISK_DIR:-/var/tmp/ckpt-rtn-bench}
here=$(cd "$(dirname "$0")" && pwd)
cores=$(nproc)
sweep=$(python3 -c "print(','.join(str(n) for n in sorted({1, 2, 4, 8, $cores}) if n <= $cores))")
w4="--scheme-args=--scheme w4a16"
export PYTHONUNBUFFERED=1
mkdir -p "$out"
{
    echo "cores: $cores"
    grep -m1 "model name" /proc/cpuinfo
    free -g | head -2
    df -h /dev/shm "$(dirname "$disk")" | tail -2
    python3 -c "import sys, numpy, numba; print('python', sys.version.split()[0], \
'numpy', numpy.__version__, 'numba', numba.__version__)"
} 2>&1 | tee -a "$out/machine.txt"
for step in $steps; do
    case $step in
    ram)
        python3 "$here/bench_convert.py" --layers "$layers" --naive-layers 0 --dir "$ram" \
            --workers "$sweep" --repeat "$repeat" --json "$out/ram.json" \
            "$w4" "--scheme-args=--scheme w4a16 --asymmetric" 2>&1 | tee "$out/ram.txt"
        rm -rf "$ram" ;;
    kernel)
        python3 "$here/bench_kernel.py" --threads "$sweep" 2>&1 | tee "$out/kernel.txt" ;;
    disk)
        python3 "$here/bench_convert.py" --layers "$layers" --naive-layers 0 --dir "$disk" \
            --workers "$cores" --repeat "$repeat" --cold --json "$out/disk.json" "$w4" \
            2>&1 | tee "$out/disk.txt"
        rm -rf "$disk" ;;
    *)
        echo "bench_cores.sh: unknown step $step (ram, kernel, disk)" >&2; exit 2 ;;
    esac
done
