#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the test suite: python -m pytest (all tests, ~a few minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
scripts/setup.sh "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check st_daft tests benchmarks examples
ruff format --check st_daft tests benchmarks examples
# the docs site, warnings as errors, into a throwaway folder (offline: no fonts or inventories are fetched);
# not --quiet: it hides the warnings from --strict, and the build then passes whatever they say
docs_site="$(mktemp -d)"
NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true mkdocs build --strict --site-dir "$docs_site"
rm -rf "$docs_site"
python -m pytest -q -p no:cacheprovider "$@"
