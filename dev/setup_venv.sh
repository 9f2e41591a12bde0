#!/usr/bin/env bash
# Make the Python environment the tests use: .venv/ (git ignores it), with the pinned packages of
# dev/requirements.txt from PyPI, plus the header-only cuDNN C++ frontend for the cuDNN build of the
# CUDA trainer (installed without its Python dependencies: only its include/ is used).
# Made once; reused while dev/requirements.txt is unchanged (the stamp .venv/.ready holds its hash).
#   dev/setup_venv.sh            make or update .venv
#   PYTHON=python3.12 dev/setup_venv.sh   build it from another interpreter (>= 3.10)
# Any pip option can come from the environment, e.g. PIP_INDEX_URL for a mirror.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
CUDNN_FRONTEND=nvidia-cudnn-frontend==1.32.0
want=$( (cat dev/requirements.txt; echo "$CUDNN_FRONTEND") | sha256sum | cut -c1-16)
if [ -f "$VENV/.ready" ] && [ "$(cat "$VENV/.ready")" = "$want" ] && [ -x "$VENV/bin/python" ]; then exit 0; fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV" || { echo "make test: '$PYTHON -m venv' failed: install Python's venv module (Debian: apt-get install python3-venv)"; exit 1; }
fi
log="$VENV/pip.log"
echo "setting up $VENV from dev/requirements.txt (first time: about 3 GB from PyPI, 2-5 minutes; log in $log)"
pip_install() {
    if ! "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off "$@" >> "$log" 2>&1; then
        if grep -qiE "connection|resolve|timed out|network|proxy|No matching distribution|Could not find a version" "$log"; then
            echo "make test: cannot install from the Python package index (PyPI unreachable, or a pinned version is missing): see $log"
        else
            echo "make test: pip failed installing into $VENV: see $log"
        fi
        exit 1
    fi
}
: > "$log"
pip_install -r dev/requirements.txt
pip_install --no-deps "$CUDNN_FRONTEND"
"$VENV/bin/python" -c "import torch, numpy, transformers, safetensors, matplotlib" >> "$log" 2>&1 ||
    { echo "make test: the packages installed but do not import: see $log"; exit 1; }
echo "$want" > "$VENV/.ready"
echo "$VENV ready: $("$VENV/bin/python" -c 'import torch, transformers, numpy; print("torch", torch.__version__, "| transformers", transformers.__version__, "| numpy", numpy.__version__)')"
