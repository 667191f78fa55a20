#!/usr/bin/env bash
# Headless screenshots of built book pages (to check theme, math, badges without a browser).
# Usage: bash scripts/screenshot.sh OUTDIR PAGE [PAGE...]
#   PAGE is a path under _build/html, e.g. book/preface.html (build the book first).
# Needs Debian's chromium (installed with apt-get if missing). Serves a copy of _build/html on
# localhost. The book loads MathJax from a CDN; offline, the copy is pointed at a local MathJax 3
# instead: $MATHJAX_ES5 (a folder holding tex-mml-chtml.js), else the one in the PyPI package
# django-static-mathjax, fetched once with pip into .cache/mathjax.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:?usage: screenshot.sh OUTDIR PAGE [PAGE...]}"; shift
[ $# -gt 0 ] || { echo "usage: screenshot.sh OUTDIR PAGE [PAGE...]" >&2; exit 2; }
HTML="$ROOT/_build/html"
[ -d "$HTML" ] || { echo "no $HTML: run bash scripts/book.sh first" >&2; exit 1; }
WIDTH="${WIDTH:-1280}"; HEIGHT="${HEIGHT:-2000}"; PORT="${PORT:-8765}"

CHROME="$(command -v chromium || command -v chromium-browser || true)"
if [ -z "$CHROME" ]; then
    echo "installing chromium (apt-get)"
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
    CHROME="$(command -v chromium)"
fi

mkdir -p "$OUT"
TMP="$(mktemp -d)"
SERVER=""
trap '[ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; rm -rf "$TMP"' EXIT
cp -r "$HTML" "$TMP/site"
MJ="${MATHJAX_ES5:-$ROOT/.cache/mathjax/mathjax/static/mathjax/es5}"
if [ ! -f "$MJ/tex-mml-chtml.js" ] && [ -z "${MATHJAX_ES5:-}" ]; then
    mkdir -p "$ROOT/.cache/mathjax"
    python3 -m pip download -q --no-deps -d "$ROOT/.cache/mathjax" "django-static-mathjax>=3.2,<4" \
        && python3 -c "import glob, zipfile; zipfile.ZipFile(glob.glob('$ROOT/.cache/mathjax/*.whl')[0]).extractall('$ROOT/.cache/mathjax')" \
        || echo "warning: no local MathJax; math will show as TeX source" >&2
fi
if [ -f "$MJ/tex-mml-chtml.js" ]; then
    cp -r "$MJ" "$TMP/site/_mathjax"
    find "$TMP/site" -name '*.html' -exec sed -i \
        's#https://cdn.jsdelivr.net/npm/mathjax@3/es5/#/_mathjax/#g' {} +
fi
python3 -m http.server "$PORT" --bind 127.0.0.1 --directory "$TMP/site" >/dev/null 2>&1 &
SERVER=$!
PROFILE="$TMP/profile"
for _ in $(seq 50); do  # wait for the server
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/')" 2>/dev/null && break
    sleep 0.1
done

for page in "$@"; do
    png="$OUT/$(echo "${page%.html}" | tr '/' '_').png"
    "$CHROME" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --user-data-dir="$PROFILE" --hide-scrollbars --window-size="$WIDTH,$HEIGHT" \
        --virtual-time-budget=5000 --screenshot="$png" "http://127.0.0.1:$PORT/$page" 2>/dev/null
    echo "$png"
done
