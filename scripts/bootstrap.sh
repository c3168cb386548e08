#!/usr/bin/env bash
# Creates (once per machine) a virtualenv holding every pinned dependency, keyed by their hash, outside
# the repo so fresh clones and CI reuse it; then installs this checkout into it (cheap, no deps).
# Prints the venv's path on the last line of stdout. Usage: scripts/bootstrap.sh [extras, default all]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
extras=${1:-worker,operator,dev}
cache=${ADAPTERMERGE_CACHE:-$HOME/.cache/adaptermerge}
python=${PYTHON:-python3}
key=$("$python" - "$repo/pyproject.toml" "$extras" <<'PY'
import hashlib, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
deps = list(project["dependencies"])
for extra in sys.argv[2].split(","):
    deps += project["optional-dependencies"][extra]
print(hashlib.sha256("\n".join(sorted(deps)).encode()).hexdigest()[:16])
PY
)
venv=$cache/venv-$key
if [ ! -f "$venv/.complete" ]; then
  echo "bootstrap: creating $venv (one-time: torch is large)" >&2
  rm -rf "$venv"
  mkdir -p "$cache"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip setuptools wheel >&2
  # Dependencies only; the project itself goes in below so each checkout installs itself.
  "$venv/bin/pip" install -q $("$python" - "$repo/pyproject.toml" "$extras" <<'PY'
import sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
deps = list(project["dependencies"])
for extra in sys.argv[2].split(","):
    deps += project["optional-dependencies"][extra]
print(" ".join(deps))
PY
) >&2
  touch "$venv/.complete"
fi
"$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$repo" >&2
echo "$venv"
