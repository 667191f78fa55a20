#!/usr/bin/env bash
# Run all tests: unit tests (tests/), then nbval over the executed notebooks in notebooks/.
# nbval's run of each chapter also fills the book's execution cache (see below).
# Usage: bash scripts/test.sh [extra pytest args for both runs]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
status=0
python -m pytest tests "$@" || status=$?
# Pretrain the zoo models first (cached after the first run), so that no notebook cell that nbval compares
# also prints the one-time "pretraining ..." lines.
# The reference runs (minipeft.runs) are trained here too, for the same reason.
python -c "from minipeft import runs, zoo; [zoo.path(n) for n in zoo.names()]; runs.build_all()" || status=$?
# --nbval-lax: only cells tagged nbval-check-output are compared (the rest must just run).
# -p tests.nbval_book_cache: each notebook whose cells all pass is also stored, with the outputs of
# this run, in the book's execution cache (_build/.jupyter_cache), so that a following
# scripts/book.sh renders those chapters without executing them again.
python -m pytest -p tests.nbval_book_cache --nbval-lax --nbval-current-env \
    --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider notebooks/ "$@" || status=$?
exit $status
