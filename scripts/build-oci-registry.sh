#!/usr/bin/env bash
# Builds the CNCF distribution registry (the reference OCI registry, `registry serve CONFIG`), which the
# oci:// storage tests start, from Go modules, and caches the binary outside the repo keyed by version;
# beside it `htpasswd` (scripts/htpasswd/), which writes the bcrypt lines the registry's htpasswd auth
# needs (no bcrypt tool or Python package is installed here). A second run with the same version and
# helper source does nothing. Prints the registry's path on the last line of stdout.
set -euo pipefail

REGISTRY_VERSION=${REGISTRY_VERSION:-v3.1.2}
cache=${ADAPTERMERGE_CACHE:-$HOME/.cache/adaptermerge}
bin=$cache/oci-registry/distribution-$REGISTRY_VERSION/bin
mkdir -p "$bin"
export GOFLAGS=-buildvcs=false CGO_ENABLED=0

log() { echo "build-oci-registry: $*" >&2; }

# `registry --version` prints "registry github.com/distribution/distribution/v3 v3.1.2" (version.Version
# is set by -ldflags below). The output is captured before grep reads it (grep -q in a pipe can SIGPIPE
# the writer and fail under pipefail).
stamp_matches() {
  local out
  [ -x "$bin/registry" ] && out=$("$bin/registry" --version 2>/dev/null) && grep -qF -- " $REGISTRY_VERSION" <<<"$out"
}

# Parallel test runs on one machine share the cache: the second waits instead of building over the first.
exec 9>"$cache/oci-registry/.build.lock"
flock 9
if ! stamp_matches; then
  log "compiling distribution registry $REGISTRY_VERSION (a few minutes cold on 2 cores)"
  GOBIN=$bin nice -n 10 go install -trimpath \
    -ldflags "-s -w -X github.com/distribution/distribution/v3/version.version=$REGISTRY_VERSION" \
    "github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION"
  stamp_matches || { log "built $bin/registry but its --version does not say $REGISTRY_VERSION"; exit 1; }
fi

# The helper is rebuilt when its source changes (the stamp is the sha256 of its files).
helper_src=$(cd "$(dirname "$0")/htpasswd" && pwd)
helper_sum=$(cat "$helper_src"/go.mod "$helper_src"/go.sum "$helper_src"/main.go | sha256sum | cut -c1-16)
if [ ! -x "$bin/htpasswd" ] || [ "$(cat "$bin/htpasswd.stamp" 2>/dev/null)" != "$helper_sum" ]; then
  log "compiling the htpasswd helper"
  (cd "$helper_src" && nice -n 10 go build -trimpath -o "$bin/htpasswd" .)
  echo "$helper_sum" >"$bin/htpasswd.stamp"
fi
echo "$bin/registry"
