#!/usr/bin/env bash
# The device check (benchmarks/device_check.py): each recipe trained on the CUDA GPU beside the same run on the CPU,
# nDCG@10 and first losses compared within a tolerance, timings, a JSON report; exits non-zero on a failure.
#   bash scripts/device_check.sh --data ../shared/data/scifact            # on a GPU machine, under 8 minutes
#   bash scripts/device_check.sh --data DIR --cpu-only --output R.json   # the CPU half alone
# The runs go to $WORK (a new temporary folder by default, removed at the end); $PYTHON, else .venv's python, else
# python, runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python; fi
fi
work="${WORK:-}"
if [[ -z "$work" ]]; then
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' EXIT
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
timeout "${DEVICE_CHECK_TIMEOUT:-480}" "$python" benchmarks/device_check.py --work "$work" "$@"
