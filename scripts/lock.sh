#!/usr/bin/env bash
# Regenerates the lock files from pyproject.toml's version ranges:
#   requirements/dev.txt       base + worker + operator + dev  (scripts/bootstrap.sh, CI)
#   requirements/worker.txt    base + worker                   (the worker image)
#   requirements/operator.txt  base + operator                 (the operator image)
# Exact versions with sha256 hashes for every platform (a universal resolution for Python >= 3.11), in
# pip's requirements format: consumers need only `pip install --require-hashes -r FILE`, not uv.
# Resolution keeps every version already in a lock unless a range excludes it; to move a dependency
# on purpose: `scripts/lock.sh --upgrade-package NAME` (any extra args go to every `uv pip compile`).
# The worker and operator locks are constrained to dev.txt's versions: the images ship what CI tested.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
UV_VERSION=${UV_VERSION:-0.13.9}
cache=${ADAPTERMERGE_CACHE:-$HOME/.cache/adaptermerge}
python=${PYTHON:-python3}
uv=$cache/tools/uv-$UV_VERSION/bin/uv

if ! "$uv" --version 2>/dev/null | grep -qF "$UV_VERSION"; then
  echo "lock: installing uv $UV_VERSION from PyPI" >&2
  rm -rf "$cache/tools/uv-$UV_VERSION"
  PIP_ROOT_USER_ACTION=ignore "$python" -m pip install -q --disable-pip-version-check --no-deps \
    --target "$cache/tools/uv-$UV_VERSION" "uv==$UV_VERSION" >&2
fi

cd "$repo"
compile() {  # compile OUTPUT EXTRA... [-- UV_ARGS...]
  local out=$1; shift
  local args=()
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do args+=(--extra "$1"); shift; done
  [ $# -gt 0 ] && shift
  "$uv" pip compile --quiet pyproject.toml "${args[@]}" --universal --python-version 3.11 \
    --generate-hashes --custom-compile-command scripts/lock.sh -o "$out" "$@" "${extra_args[@]}"
}
extra_args=("$@")
compile requirements/dev.txt worker operator dev
compile requirements/worker.txt worker -- --constraint requirements/dev.txt
compile requirements/operator.txt operator -- --constraint requirements/dev.txt
echo "lock: wrote requirements/dev.txt requirements/worker.txt requirements/operator.txt" >&2
