#!/usr/bin/env bash
# The test command: install what the suite needs (tools/install.sh, PyPI only), then run
# it. .ci/run calls exactly this. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install.sh
python3 -m pytest "$@"
