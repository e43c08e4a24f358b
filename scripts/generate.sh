#!/usr/bin/env bash
# One command from a fresh machine to a layered picture: bash scripts/generate.sh [options]
#
# Sets up .venv and the ComfyUI host exactly as scripts/test.sh does (scripts/setup_env.sh: pinned torch,
# requirements, COMFYUI_PATH or the pinned ComfyUI in .cache/comfyui), then runs scripts/generate_layers.py with
# the given options: a shipped workflow through ComfyUI's own executor, with the bundled toy shapes model unless
# --checkpoint/--weights name a real SD1.5 checkpoint and LayerDiff weights. `--help` lists the options.
set -euo pipefail

CALLER_DIR="$PWD"
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"

cd "$CALLER_DIR"  # relative --out/--checkpoint/--weights paths are the caller's
exec "$PY" "$REPO_ROOT/scripts/generate_layers.py" "$@"
