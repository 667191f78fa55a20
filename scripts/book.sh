#!/usr/bin/env bash
# Build the book: execute every chapter in book/ and write _build/html.
# Fails on any chapter error and on any Sphinx warning. Usage: bash scripts/book.sh [extra jupyter-book args]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
# --keep-going: report every warning before failing; -W: any warning fails the build.
jupyter-book build . --builder html -W --keep-going "$@"
echo "book written to $ROOT/_build/html/index.html"
