#!/usr/bin/env bash
# Run all tests: unit tests (tests/), then nbval over the executed notebooks in notebooks/.
# Usage: bash scripts/test.sh [extra pytest args for both runs]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
status=0
python -m pytest tests "$@" || status=$?
# Pretrain the zoo models first (cached after the first run), so that no notebook cell that nbval compares
# also prints the one-time "pretraining ..." lines.
python -c "from minipeft import zoo; [zoo.path(n) for n in zoo.names()]" || status=$?
# --nbval-lax: only cells tagged nbval-check-output are compared (the rest must just run).
python -m pytest --nbval-lax --nbval-current-env \
    --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider notebooks/ "$@" || status=$?
exit $status
