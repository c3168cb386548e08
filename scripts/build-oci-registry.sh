#!/usr/bin/env bash
# Builds the CNCF distribution registry (the reference OCI registry, `registry serve CONFIG`), which the
# oci:// storage tests start, from Go modules, and caches the binary outside the repo keyed by version;
# beside it `htpasswd` (scripts/htpasswd/), which writes the bcrypt lines the registry's htpasswd auth
# needs (no bcrypt tool or Python package is installed here). A second run with the same version and
# helper source does nothing. Prints the registry's path on the last line of stdout.
set -euo pipefail

REGISTRY_VERSION=${REGISTRY_VERSION:-v3.1.2}
cache=${ADAPTERMERGE_CACHE:-$HOME/.cache/adaptermerge}
dir=$cache/oci-registry/distribution-$REGISTRY_VERSION
bin=$dir/bin
source "$(dirname "$0")/lib/go-install-cached.sh"

# `registry --version` prints "registry github.com/distribution/distribution/v3 v3.1.2" (version.version
# is set by -ldflags).
go_install_cached "$dir" registry " $REGISTRY_VERSION" \
  "-s -w -X github.com/distribution/distribution/v3/version.version=$REGISTRY_VERSION" \
  "github.com/distribution/distribution/v3/cmd/registry@$REGISTRY_VERSION"

# The helper is rebuilt when its source changes (the stamp is the sha256 of its files).
helper_src=$(cd "$(dirname "$0")/htpasswd" && pwd)
helper_sum=$(cat "$helper_src"/go.mod "$helper_src"/go.sum "$helper_src"/main.go | sha256sum | cut -c1-16)
if [ ! -x "$bin/htpasswd" ] || [ "$(cat "$bin/htpasswd.stamp" 2>/dev/null)" != "$helper_sum" ]; then
  echo "build-oci-registry: compiling the htpasswd helper" >&2
  (cd "$helper_src" && nice -n 10 go build -trimpath -o "$bin/htpasswd" .)
  echo "$helper_sum" >"$bin/htpasswd.stamp"
fi
echo "$bin/registry"
