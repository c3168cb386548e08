#!/usr/bin/env bash
# Builds versitygw, the S3-compatible server the storage tests start (posix backend: objects are files
# in a folder), from Go modules, and caches the binary outside the repo keyed by version.
# A second run with the same version does nothing. Prints the binary's path on the last line of stdout.
#
# Why versitygw and not MinIO: versitygw's module has no replace directives, so `go install ...@v` works
# as is with CGO_ENABLED=0, and it is one binary with a plain posix backend; MinIO's module is several
# times larger (a much longer cold build on 2 cores) and its upstream no longer tags releases for
# `go install`.
set -euo pipefail

VERSITYGW_VERSION=${VERSITYGW_VERSION:-v1.8.0}
cache=${ADAPTERMERGE_CACHE:-$HOME/.cache/adaptermerge}
bin=$cache/s3-server/versitygw-$VERSITYGW_VERSION/bin
mkdir -p "$bin"
export GOFLAGS=-buildvcs=false CGO_ENABLED=0

log() { echo "build-s3-server: $*" >&2; }

# The version output is captured before grep reads it: with `grep -q` in a pipe, grep exits at the
# first match, the writer can die of SIGPIPE, and under pipefail the check failed and rebuilt.
stamp_matches() {
  local out
  [ -x "$bin/versitygw" ] && out=$("$bin/versitygw" --version 2>/dev/null) && grep -qF -- "${VERSITYGW_VERSION#v}" <<<"$out"
}

# Parallel test runs on one machine share the cache: the second waits instead of building over the first.
exec 9>"$cache/s3-server/.build.lock"
flock 9
if ! stamp_matches; then
  log "compiling versitygw $VERSITYGW_VERSION (a few minutes cold on 2 cores)"
  GOBIN=$bin nice -n 10 go install -trimpath \
    -ldflags "-s -w -X main.Version=$VERSITYGW_VERSION -X main.Build=adaptermerge" \
    "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION"
fi
echo "$bin/versitygw"
