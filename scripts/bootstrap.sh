#!/usr/bin/env bash
# Creates (once per machine) a virtualenv holding every pinned dependency, keyed by their hash, outside
# the repo so fresh clones and CI reuse it; then gives this checkout its own venv layered on it.
# Prints the checkout's venv (.venv) on the last line of stdout. Usage: scripts/bootstrap.sh [extras]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
extras=${1:-worker,operator,dev}
cache=${ADAPTERMERGE_CACHE:-$HOME/.cache/adaptermerge}
python=${PYTHON:-python3}
# Line 1: the requirements; line 2: data packages installed without their dependencies.
mapfile -t reqs < <("$python" - "$repo/pyproject.toml" "$extras" <<'PY'
import sys, tomllib
pyproject = tomllib.load(open(sys.argv[1], "rb"))
project = pyproject["project"]
deps = list(project["dependencies"])
for extra in sys.argv[2].split(","):
    deps += project["optional-dependencies"][extra]
print(" ".join(sorted(deps)))
print(" ".join(pyproject["tool"]["adaptermerge"]["data-packages"]))
PY
)
key=$(printf '%s\n' "${reqs[@]}" "$("$python" --version)" | sha256sum | cut -c1-16)
venv=$cache/venv-$key
mkdir -p "$cache"
exec 9>"$cache/.bootstrap.lock"
flock 9  # a second bootstrap (a parallel test run) waits instead of clobbering a half-made venv
if [ ! -f "$venv/.complete" ]; then
  echo "bootstrap: creating $venv (one-time: torch is large)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip setuptools wheel >&2
  # shellcheck disable=SC2086  # word splitting of the requirement lists is intended
  "$venv/bin/pip" install -q ${reqs[0]} >&2
  # shellcheck disable=SC2086
  "$venv/bin/pip" install -q --no-deps ${reqs[1]} >&2
  touch "$venv/.complete"
fi
# The checkout gets its own small venv (.venv) layered on the shared one through a .pth file, and the
# project is installed there in editable mode: two checkouts on one machine (a CI clone beside a working
# copy) never run each other's code. Cheap: no dependency is copied.
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# An editable install of some checkout inside the shared venv would shadow every other checkout.
if compgen -G "$site/__editable__*adaptermerge*" >/dev/null; then "$venv/bin/pip" uninstall -q -y adaptermerge >&2; fi
local_venv=$repo/.venv
if [ ! -x "$local_venv/bin/python" ]; then
  "$venv/bin/python" -m venv --without-pip "$local_venv" >&2
fi
local_site=$("$local_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import site; site.addsitedir('$site')" > "$local_site/adaptermerge-shared-venv.pth"
# setuptools warns at length about editable installs on every call: show its output only on failure.
if ! out=$("$venv/bin/pip" --python "$local_venv/bin/python" install -q --no-deps --no-build-isolation -e "$repo" 2>&1); then
  echo "$out" >&2
  exit 1
fi
echo "$local_venv"
