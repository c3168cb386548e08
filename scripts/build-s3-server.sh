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
dir=$cache/s3-server/versitygw-$VERSITYGW_VERSION
source "$(dirname "$0")/lib/go-install-cached.sh"

go_install_cached "$dir" versitygw "${VERSITYGW_VERSION#v}" \
  "-s -w -X main.Version=$VERSITYGW_VERSION -X main.Build=adaptermerge" \
  "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION"
echo "$dir/bin/versitygw"
