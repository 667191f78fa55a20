#!/usr/bin/env bash
# Build the book: execute every chapter in book/ and write _build/html.
# A chapter whose code has a run in _build/.jupyter_cache is not executed again (execute_notebooks:
# cache): an earlier book build, or scripts/test.sh, whose nbval run stores every chapter that passed.
# Fails on any chapter error and on any Sphinx warning. Usage: bash scripts/book.sh [extra jupyter-book args]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# --keep-going: report every warning before failing; -W: any warning fails the build.
jupyter-book build . --builder html -W --keep-going "$@"
echo "book written to $ROOT/_build/html/index.html"
