# Sourced by the scripts that build a test server from Go modules (build-s3-server.sh,
# build-oci-registry.sh): one cached `go install` of a pinned module version, shared by parallel runs.
#
# go_install_cached DIR BINARY WANT LDFLAGS MODULE@VERSION
#   Installs BINARY into DIR/bin unless `DIR/bin/BINARY --version` already prints WANT; a lock on DIR
#   makes a second build (a parallel test run on the same cache) wait instead of building over the first.

go_install_cached() {
  local dir=$1 binary=$2 want=$3 ldflags=$4 module=$5
  mkdir -p "$dir/bin"
  exec 9>"$dir/.build.lock"
  flock 9
  if ! _version_matches "$dir/bin/$binary" "$want"; then
    echo "$binary: compiling $module (a few minutes cold on 2 cores)" >&2
    GOFLAGS=-buildvcs=false CGO_ENABLED=0 GOBIN=$dir/bin nice -n 10 go install -trimpath -ldflags "$ldflags" "$module"
    _version_matches "$dir/bin/$binary" "$want" || {
      echo "$binary: built $dir/bin/$binary but its --version does not say $want" >&2
      return 1
    }
  fi
  exec 9>&-
}

# The output is captured before grep reads it: with `grep -q` in a pipe, grep exits at the first match,
# the writer can die of SIGPIPE, and under pipefail the check fails and rebuilds.
_version_matches() {
  local out
  [ -x "$1" ] && out=$("$1" --version 2>/dev/null) && grep -qF -- "$2" <<<"$out"
}
