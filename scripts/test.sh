#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the checks: ruff, the wording check, the results pages, the docs site, the test
# suite (python -m pytest) and the package check (scripts/package_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
scripts/setup.sh "$venv"
# shellcheck disable=SC1091
. "$venv/bin/activate"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check st_daft tests benchmarks examples
ruff format --check st_daft tests benchmarks examples
# the project speaks only of itself: no work history, no machine paths (README, docs, package, tests, benchmarks)
scripts/check_wording.sh
# the results pages and README say what benchmarks/results holds
python benchmarks/report.py --check
# the docs site, warnings as errors, into a throwaway folder (offline: no fonts or inventories are fetched);
# not --quiet: it hides the warnings from --strict, and the build then passes whatever they say
docs_site="$(mktemp -d)"
NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true mkdocs build --strict --site-dir "$docs_site"
rm -rf "$docs_site"
python -m pytest -q -p no:cacheprovider "$@"
# the built sdist and wheel install and train outside this checkout, and an exported route serves without torch
scripts/package_check.sh
