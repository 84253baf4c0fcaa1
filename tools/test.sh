#!/usr/bin/env bash
# The test command: install what the suite needs (tools/install.sh, PyPI only), then run
# it. .ci/run calls exactly this. Extra arguments go to pytest.
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
