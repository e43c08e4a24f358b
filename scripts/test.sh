#!/usr/bin/env bash
# THE test command (README and .ci/run call exactly this): bash scripts/test.sh [pytest arguments]
#
# 1. creates/reuses .venv (python3.11), installs the pinned torch/torchvision when missing and
#    requirements-dev.txt when the requirement files changed;
# 2. uses the ComfyUI at COMFYUI_PATH, else unpacks the pinned copy into .cache/comfyui (scripts/setup_comfyui.sh);
# 3. runs pytest on tests/ (or on the paths given) and exits with pytest's exit code.
set -euo pipefail

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

REQ_HASH="$(cat requirements.txt requirements-dev.txt | sha256sum | cut -d' ' -f1)"
HASH_FILE="$VENV/.layerdiff-req-hash"
if [[ -f "$HASH_FILE" && "$(cat "$HASH_FILE")" == "$REQ_HASH" ]]; then
    step "test requirements up to date"
else
    step "installing requirements-dev.txt"
    "${PIP[@]}" -r requirements-dev.txt
    echo "$REQ_HASH" > "$HASH_FILE"
fi

COMFYUI_PATH="$(bash scripts/setup_comfyui.sh)"
export COMFYUI_PATH
step "ComfyUI host: $COMFYUI_PATH"

# Run tests/ unless the arguments already name test paths (e.g. tests/test_x.py or tests/test_x.py::test_y).
TARGETS=(tests)
for arg in "$@"; do
    if [[ "$arg" != -* && ( -e "${arg%%::*}" ) ]]; then
        TARGETS=()
        break
    fi
done

step "pytest ${TARGETS[*]+${TARGETS[*]} }$*"
set +e
"$PY" -m pytest ${TARGETS[@]+"${TARGETS[@]}"} -q "$@"
status=$?
set -e
exit "$status"
