# Sourced by scripts/book.sh and scripts/test.sh: create/refresh the project's .venv and activate it.
# Everything goes into .venv (nothing registered globally). Needs Python 3.11+ as `python3`
# (or set PYTHON=/path/to/python3.11). The calling script sets `set -euo pipefail`.

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || { echo "error: need Python 3.11+, got $("$PYTHON" --version)" >&2; exit 1; }
    echo "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

# Reinstall only when the dependency files changed since the last install.
STAMP="$VENV/.minipeft-installed"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1) ${MINIPEFT_TORCH:-}"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "installing dependencies into $VENV"
    # torch first, on its own: where a CPU wheel is wanted (CI), MINIPEFT_TORCH names it, so the
    # plain `torch` in requirements.txt is already satisfied and pip does not fetch a CUDA build.
    "$VENV/bin/python" -m pip install -q "${MINIPEFT_TORCH:-torch>=2.2}"
    "$VENV/bin/python" -m pip install -q -r "$ROOT/requirements.txt"
    "$VENV/bin/python" -m pip install -q -e "$ROOT"
    # The chapters' kernelspec is "python3": put one inside the venv so Jupyter never picks a
    # python3 kernel registered elsewhere on the machine (one without minipeft).
    "$VENV/bin/python" -m ipykernel install --sys-prefix --name python3 --display-name "Python 3" >/dev/null
    echo "$WANT" > "$STAMP"
fi

# shellcheck disable=SC1091
source "$VENV/bin/activate"
export JUPYTER_PREFER_ENV_PATH=1      # the venv's kernelspec wins over ~/.local ones
export PYDEVD_DISABLE_FILE_VALIDATION=1  # quiets a debugger warning on kernel stderr
# Torch threads: the book and the tests run one thing at a time, so use the cores (at most 4: the zoo
# models are tiny). Measured on a quiet 2-core machine: 100 tiny-llama steps take 7 s with 2 threads,
# 11 s with 1. But when other jobs share the cores, extra threads wait on each other (seen: 80x
# slower), so set OMP_NUM_THREADS=1 yourself when you run several things at once.
if [ -z "${OMP_NUM_THREADS:-}" ]; then
    OMP_NUM_THREADS="$(nproc 2>/dev/null || echo 1)"
    [ "$OMP_NUM_THREADS" -gt 4 ] && OMP_NUM_THREADS=4
fi
export OMP_NUM_THREADS
# Zoo models are pretrained once and cached here (shared by tests, nbval and the book build).
export MINIPEFT_CACHE="${MINIPEFT_CACHE:-$HOME/.cache/minipeft}"
cd "$ROOT"
