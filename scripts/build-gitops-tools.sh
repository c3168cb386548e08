#!/usr/bin/env bash
# Builds the GitOps-side tools the operator tests check the operator against, from Go modules, cached
# outside the repo by version (a second run does nothing). Usage: scripts/build-gitops-tools.sh TOOL
# - kstatus: tests/support/kstatus, a tiny program around sigs.k8s.io/cli-utils' kstatus library (what
#   Flux and cli-utils use to tell Current from InProgress and Failed); seconds.
# - kueue: the real Kueue controller manager (sigs.k8s.io/kueue/cmd/kueue) and its CRDs (crds/);
#   about 15 minutes on 2 busy cores the first time.
# Prints the folder holding the tool on the last line of stdout.
set -euo pipefail

KUEUE_VERSION=${KUEUE_VERSION:-v0.17.0}
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${ADAPTERMERGE_CACHE:-$HOME/.cache/adaptermerge}/gitops-tools
export GOFLAGS=-buildvcs=false CGO_ENABLED=0

log() { echo "build-gitops-tools: $*" >&2; }

locked() {  # $1 = folder: a parallel run for the same tool waits instead of building over this one
  mkdir -p "$1"
  exec 9>"$1/.lock"
  flock 9
}

case "${1:-}" in
  kstatus)
    source=$repo/tests/support/kstatus
    dir=$cache/kstatus-$(cat "$source/main.go" "$source/go.mod" "$source/go.sum" | sha256sum | cut -c1-12)
    locked "$dir"
    if [ ! -x "$dir/kstatus" ]; then
      log "kstatus (sigs.k8s.io/cli-utils, as pinned in tests/support/kstatus/go.mod)"
      (cd "$source" && nice -n 10 go build -trimpath -o "$dir/kstatus.tmp" . && mv "$dir/kstatus.tmp" "$dir/kstatus")
    fi
    ;;
  kueue)
    dir=$cache/kueue-$KUEUE_VERSION
    locked "$dir"
    if [ ! -x "$dir/kueue" ]; then
      log "kueue $KUEUE_VERSION"
      GOBIN="$dir/.gobin" nice -n 10 go install -trimpath "sigs.k8s.io/kueue/cmd/kueue@$KUEUE_VERSION" >&2
      mv "$dir/.gobin/kueue" "$dir/kueue"
    fi
    if [ ! -d "$dir/crds" ]; then
      src=$(go mod download -json "sigs.k8s.io/kueue@$KUEUE_VERSION" | sed -n 's/.*"Dir": "\(.*\)",*/\1/p')
      rm -rf "$dir/crds.tmp" && mkdir -p "$dir/crds.tmp"
      cp "$src"/config/components/crd/bases/*.yaml "$dir/crds.tmp/"
      chmod -R u+w "$dir/crds.tmp"
      mv "$dir/crds.tmp" "$dir/crds"
    fi
    ;;
  *)
    echo "usage: $0 kstatus|kueue" >&2
    exit 2
    ;;
esac
echo "$dir"
