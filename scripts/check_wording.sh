#!/usr/bin/env bash
# The project speaks only of itself: no ordinals of work ("the ninth session"), no ticket or issue numbers, no talk
# of the rounds of work that built it, and no absolute path of the machine a page was written on, in README.md,
# docs, the package, tests, benchmarks (results included) and examples. Exits 1 and prints every line that does.
set -uo pipefail
cd "$(dirname "$0")/.."
targets=()
for target in README.md CHANGELOG.md docs st_daft tests benchmarks examples; do
    [[ -e "$target" ]] && targets+=("$target")
done
ordinals="first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|thirteenth|fourteenth"
ordinals+="|fifteenth|sixteenth|seventeenth|eighteenth|nineteenth|twentieth|[0-9]+(st|nd|rd|th)"
history="\\b(${ordinals})[ _-]sessions?\\b"
history+="|\\b(this|that|a|one|each|every|same|earlier|later|previous|next|last|work|working|whole) sessions?\\b"
history+="|\\bthe session\\b|\\bsessions? (measured|of work)\\b|\\bin this round\\b"
history+="|\\b(issue|ticket)s? ?#?[0-9]+|(^|[ (])#[0-9]+\\b|\\bissue #"
status=0
if grep -rniIE --exclude-dir=__pycache__ --exclude-dir=site "$history" "${targets[@]}"; then
    echo "check_wording: work history above (ordinals of work, ticket numbers); say what the project does instead" >&2
    status=1
fi
# the folder above the checkout, and home folders, spelled from the root
above="$(cd .. && pwd)/"
if grep -rnIF --exclude-dir=__pycache__ --exclude-dir=site "$above" "${targets[@]}" \
    || grep -rnIE --exclude-dir=__pycache__ --exclude-dir=site "(^|[^A-Za-z0-9_.~])/(home|root|Users)/[A-Za-z]" \
        "${targets[@]}"; then
    echo "check_wording: absolute machine paths above; write them relative to the checkout (../shared/data/...)" >&2
    status=1
fi
exit $status
