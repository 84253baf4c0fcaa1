#!/usr/bin/env bash
# The test command: install what the suite needs (tools/install.sh, PyPI only), then run
# it. .ci/run calls exactly this. Extra arguments go to pytest, and then only that run is
# made.
#
# Without arguments, the converter's own tests then run a second time under numpy 2: the
# mindspore extra pins numpy<2, while most who only convert have numpy 2. That run has a
# virtual environment of its own (ckpt-rtn and its runtime dependencies' newest releases,
# no MindSpore) and a numba cache of its own.
#
# The run's temporary files go to a directory of its own, removed at the end: pytest's
# default, /tmp/pytest-of-$USER, is shared by every session of the user, and a second
# session running meanwhile (a developer's, another checkout's CI) can delete the first
# one's files while its tests use them.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
basetemp="$(mktemp -d "${TMPDIR:-/tmp}/ckpt-rtn-tests.XXXXXX")"
trap 'rm -rf "$basetemp"' EXIT
python3 -m pytest --basetemp="$basetemp/t" "$@"
[ $# -eq 0 ] || exit 0

# The MindSpore-free converter's modules: they import neither MindSpore nor ckpt_rtn.runtime
# and need no data wheel. Their tests that write fixtures with MindSpore skip here
# (conftest.needs_mindspore).
converter=()
for name in bad_input boundary buffers cli direct directory families faults fp8 hf_families \
            kernels memory parts pipeline results squad verify w4a8 w8a8; do
    converter+=("tests/test_$name.py")
done
venv="$basetemp/numpy2"
python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --disable-pip-version-check "numpy>=2" "pytest>=7" \
    "hypothesis>=6" -e .
"$venv/bin/python" -c "import numpy, numba; print('numpy', numpy.__version__, 'numba', \
numba.__version__)"
CKPT_RTN_TESTS_WITHOUT_MINDSPORE=1 NUMBA_CACHE_DIR="$basetemp/numba" "$venv/bin/python" -m pytest \
    --basetemp="$basetemp/t2" "${converter[@]}"
