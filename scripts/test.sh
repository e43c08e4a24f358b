#!/usr/bin/env bash
# THE test command (README and .ci/run call exactly this): bash scripts/test.sh [pytest arguments]
#
# 1. sets up .venv (pinned torch/torchvision, requirements-dev.txt) and the ComfyUI host (COMFYUI_PATH, else the
#    pinned copy in .cache/comfyui): scripts/setup_env.sh, shared with scripts/generate.sh;
# 2. runs pytest on tests/ (or on the paths given) and exits with pytest's exit code.
set -euo pipefail

source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"

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
