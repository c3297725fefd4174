#!/usr/bin/env bash
# Set up, then train a static query route for all-MiniLM-L6-v2 with DAFT on SciFact train and evaluate it on
# SciFact test through MTEB. Usage: scripts/demo.sh [SCIFACT_DIR] [OUTPUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:-../shared/data/scifact}"
output="${2:-runs/daft-static-scifact}"
venv="${VENV:-.venv}"
scripts/setup.sh "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
st-daft train --data "$data" --output "$output" --query-encoder static --stages align,finetune
st-daft evaluate "$output" --data "$data" --split test --output "$output/scifact-test.json"
