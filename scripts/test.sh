#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs what the tests need (cached after the first
# run), builds the real control plane (cached), then runs the whole pytest suite. Extra args go to pytest.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=$("$repo/scripts/bootstrap.sh" | tail -n 1)
PATH="$("$repo/scripts/system-deps.sh" | tail -n 1):$PATH"  # lua5.4, hadolint for tests/packaging
export ADAPTERMERGE_CONTROL_PLANE_BIN
ADAPTERMERGE_CONTROL_PLANE_BIN=$("$repo/scripts/build-control-plane.sh" | tail -n 1)
export PATH="$venv/bin:$PATH" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
cd "$repo"
exec "$venv/bin/python" -m pytest "$@"
