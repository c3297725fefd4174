#!/usr/bin/env bash
# The main job: set up (scripts/setup.sh), train a static query route for all-MiniLM-L6-v2 with the default recipe
# on SciFact's training claims, and evaluate it on SciFact test beside BM25, the route fused with BM25, and
# all-MiniLM-L6-v2 itself. Data: the local BEIR folder ../shared/data/scifact when it exists, else BeIR/scifact from
# the Hub. Usage: scripts/demo.sh [DATA] [OUTPUT_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -ge 1 ]]; then
    data="$1"
elif [[ -d ../shared/data/scifact ]]; then
    data="../shared/data/scifact"
else
    data="BeIR/scifact"
fi
output="${2:-runs/default-scifact}"
venv="${VENV:-.venv}"
scripts/setup.sh "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
export TOKENIZERS_PARALLELISM=false
if [[ -d "$data" ]]; then
    export HF_HUB_OFFLINE=1   # a local folder needs no Hub; the packaged all-MiniLM-L6-v2 is used
fi
minilm="$(python -c 'from st_daft import default_document_encoder; print(default_document_encoder())')"
st-daft train --data "$data" --output "$output" --document-store runs/store   # refuses an OUTPUT_DIR that holds a run
st-daft evaluate "$output" "$minilm" --data "$data" --split test --document-store runs/store --baseline bm25 \
    --fuse-bm25 --output "$output/scifact-test.json"
