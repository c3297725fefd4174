#!/usr/bin/env bash
# The package as a user gets it: build the sdist and wheel (python -m build), check them (twine check), install the
# wheel into a fresh virtual environment outside this checkout and run `st-daft --help` and a 3-step training there;
# then serve the exported query route in a second fresh environment with model2vec alone (no torch) and check that
# its vectors equal the trained model's encode_query (max difference < 1e-4).
# Usage: scripts/package_check.sh (from an environment with build and twine: the dev extra). The wheel environment
# reuses CPU torch==2.13.0 as scripts/setup.sh installs it (TORCH_INDEX_URL as there); no CUDA build is accepted.
set -euo pipefail
cd "$(dirname "$0")/.."
repo="$(pwd)"
work="$(mktemp -d)"
# the two environments hold a few thousand files: removed in the background, so that the check's time is its own
trap '( rm -rf "$work" & )' EXIT
pip_quiet=(python -m pip install --quiet --disable-pip-version-check --no-compile)

echo "package check: building sdist and wheel"
python -m build --no-isolation --sdist --wheel --outdir "$work/dist" . >"$work/build.log" 2>&1 || {
    cat "$work/build.log"
    exit 1
}
python -m twine check --strict "$work"/dist/*
wheel="$(ls "$work"/dist/*.whl)"

echo "package check: built in ${SECONDS} s; installing $(basename "$wheel") into a fresh environment"
python3 -m venv "$work/wheel-env"
(
    # shellcheck disable=SC1091
    . "$work/wheel-env/bin/activate"
    "${pip_quiet[@]}" "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
    "${pip_quiet[@]}" "$wheel"
    cd "$work"   # away from the checkout: st_daft must come from the wheel
    python - <<'PY'
import torch

import st_daft

assert torch.version.cuda is None, f"a CUDA build of torch was installed ({torch.__version__})"
assert "site-packages" in st_daft.__file__, f"st_daft imported from {st_daft.__file__}, not from the wheel"
PY
    st-daft --help >/dev/null
    export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    python "$repo/scripts/package_fixture.py" "$work/fixture" >/dev/null
    st-daft train --data "$work/fixture/beir" --output "$work/run" --document-encoder "$work/fixture/document-model" \
        --stages align --max-steps 3 --eval-steps 1 --align-batch-size 4 \
        >"$work/train.log" 2>&1 || {
        cat "$work/train.log"
        exit 1
    }
    python - "$work" <<'PY'
import json
import sys
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer

work = Path(sys.argv[1])
summary = json.loads((work / "run" / "daft_summary.json").read_text())
steps = [stage["steps"] for stage in summary["stages"]]
assert steps == [3], f"expected one stage of 3 steps, got {steps}"
queries = [json.loads(line)["text"] for line in (work / "fixture" / "beir" / "queries.jsonl").open()]
vectors = SentenceTransformer(str(work / "run")).encode_query(queries)
np.save(work / "encode_query.npy", vectors)
(work / "queries.json").write_text(json.dumps(queries))
print(f"package check: trained 3 steps from the wheel; {len(queries)} queries encoded")
PY
    st-daft export "$work/run" "$work/route-m2v" --format model2vec >/dev/null
)

echo "package check: trained from the wheel at ${SECONDS} s; serving the exported route with model2vec alone"
python3 -m venv "$work/serve-env"
(
    # shellcheck disable=SC1091
    . "$work/serve-env/bin/activate"
    "${pip_quiet[@]}" model2vec
    cd "$work"
    python - "$work" <<'PY'
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
from model2vec import StaticModel

work = Path(sys.argv[1])
assert importlib.util.find_spec("torch") is None, "torch is installed in the serving environment"
queries = json.loads((work / "queries.json").read_text())
served = StaticModel.from_pretrained(str(work / "route-m2v")).encode(queries)
expected = np.load(work / "encode_query.npy")
difference = float(np.abs(served - expected).max())
assert served.shape == expected.shape and difference < 1e-4, f"served vectors differ by {difference}"
assert "torch" not in sys.modules
print(f"package check: model2vec serves the route without torch; max difference to encode_query {difference:.1e}")
PY
)
echo "package check: passed in ${SECONDS} s"
