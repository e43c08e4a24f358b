#!/usr/bin/env bash
# Shared set-up of scripts/test.sh and scripts/generate.sh; source it from bash (it sets REPO_ROOT, PY, COMFYUI_PATH).
#
# 1. creates/reuses .venv ($PYTHON_BIN, default python3.11), installs the pinned torch/torchvision when missing
#    and requirements-dev.txt when the requirement files changed;
# 2. uses the ComfyUI at COMFYUI_PATH, else unpacks the pinned copy into .cache/comfyui (scripts/setup_comfyui.sh)
#    and exports COMFYUI_PATH.
# Every step prints one "==> ..." line; a second run reuses everything the first one installed.

TORCH_VERSION="2.14.1"
TORCHVISION_VERSION="0.29.1"
PYTHON_BIN="${PYTHON_BIN:-python3.11}"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"
VENV="$REPO_ROOT/.venv"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

step() { printf '==> %s\n' "$*"; }

if [[ ! -x "$PY" ]]; then
    if ! command -v "$PYTHON_BIN" >/dev/null 2>&1; then
        echo "error: $PYTHON_BIN not found; install Python 3.11 or set PYTHON_BIN=/path/to/python3.11" >&2
        exit 1
    fi
    step "creating $VENV with $PYTHON_BIN"
    "$PYTHON_BIN" -m venv "$VENV"
fi

if "$PY" - "$TORCH_VERSION" "$TORCHVISION_VERSION" <<'PYEOF' 2>/dev/null
import sys
import torch, torchvision
ok = torch.__version__.split("+")[0] == sys.argv[1] and torchvision.__version__.split("+")[0] == sys.argv[2]
sys.exit(0 if ok else 1)
PYEOF
then
    step "torch $TORCH_VERSION / torchvision $TORCHVISION_VERSION already installed"
else
    step "installing torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
    "${PIP[@]}" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
fi

REQ_HASH="$(cat requirements.txt requirements-dataset.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)"
HASH_FILE="$VENV/.layerdiff-req-hash"
if [[ -f "$HASH_FILE" && "$(cat "$HASH_FILE")" == "$REQ_HASH" ]]; then
    step "requirements up to date"
else
    step "installing requirements-dev.txt"
    "${PIP[@]}" -r requirements-dev.txt
    echo "$REQ_HASH" > "$HASH_FILE"
fi

COMFYUI_PATH="$(bash scripts/setup_comfyui.sh)"
export COMFYUI_PATH
step "ComfyUI host: $COMFYUI_PATH"
