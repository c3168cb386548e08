#!/usr/bin/env bash
# Builds the real Kubernetes components used by the tests (kube-apiserver, kube-controller-manager,
# kubectl; kubelet, kube-scheduler and kube-proxy for the real node), etcd and helm from Go modules, and
# caches the binaries outside the repo keyed by version.
# A second run with the same versions does nothing. Prints the bin folder on the last line of stdout.
#
# Why wrapper modules: k8s.io/kubernetes requires its staging modules at v0.0.0 and redirects them to
# ./staging with replace directives, which only apply in its own repo; `go install ...@v` is refused.
# A throwaway module that requires it and replaces each staging module by its published v0.N.P builds.
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.36.3}
ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
HELM_VERSION=${HELM_VERSION:-v3.22.0}
cache=${ADAPTERMERGE_CACHE:-$HOME/.cache/adaptermerge}
bin=$cache/control-plane/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION/bin
mkdir -p "$bin"
export GOFLAGS=-buildvcs=false CGO_ENABLED=0

log() { echo "build-control-plane: $*" >&2; }

# The version output is captured before grep reads it: with `grep -q` in a pipe, grep exits at the
# first match, the writer can die of SIGPIPE, and under pipefail the check failed and rebuilt.
stamp_matches() {  # $1 = binary, $2 = expected version string in the output of "$1" ${3:---version}
  local out
  [ -x "$1" ] && out=$("$1" ${3:---version} 2>/dev/null) && grep -qF -- "$2" <<<"$out"
}

build_kubernetes() {  # $@ = the binaries to build (names under k8s.io/kubernetes/cmd/)
  local work=$cache/control-plane/src/k8s-$K8S_VERSION
  mkdir -p "$work"
  cd "$work"
  local gomod
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local patch=${K8S_VERSION##*.}
  local staging_version=v0.$minor.$patch
  {
    echo "module adaptermerge.local/k8s-build"
    echo
    grep -E '^go [0-9]' "$gomod"
    grep -E '^godebug' "$gomod" || true   # a dependency's godebug line is ignored: copy it
    echo
    echo "replace ("
    # Every staging module the upstream go.mod redirects to ./staging gets its published version.
    sed -n 's#^[[:space:]]*\(k8s\.io/[^[:space:]]*\) => \./staging/src/.*#\1#p' "$gomod" |
      while read -r m; do echo "	$m => $m $staging_version"; done
    echo ")"
  } > go.mod
  log "kubernetes $K8S_VERSION: $(grep -c ' => ' go.mod) staging modules pinned to $staging_version"
  go get "k8s.io/kubernetes@$K8S_VERSION" >&2
  local pkgs=("${@/#/k8s.io/kubernetes/cmd/}")
  go get "${pkgs[@]/%/@$K8S_VERSION}" >&2
  local v=k8s.io/component-base/version cv=k8s.io/client-go/pkg/version flags=""
  local date; date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  for p in $v $cv; do
    flags+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
    flags+=" -X $p.gitTreeState=clean -X $p.buildDate=$date"
  done
  log "compiling $* (about 12 min for all six cold on 2 cores)"
  go build -trimpath -tags selinux,notest,grpcnotrace -ldflags "-s -w $flags" -o "$bin/" "${pkgs[@]}"
}

build_etcd() {
  local work=$cache/control-plane/src/etcd-$ETCD_VERSION
  mkdir -p "$work"
  cd "$work"
  printf 'module adaptermerge.local/etcd-build\n\ngo 1.25\n' > go.mod
  go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" >&2
  log "compiling etcd $ETCD_VERSION"
  go build -trimpath -ldflags "-s -w" -o "$bin/etcd" go.etcd.io/etcd/server/v3
}

build_helm() {
  log "compiling helm $HELM_VERSION"
  local major=${HELM_VERSION%%.*}
  GOBIN=$bin go install -trimpath -ldflags "-s -w -X helm.sh/helm/$major/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/$major/cmd/helm@$HELM_VERSION"
}

# Parallel test runs on one machine share the cache: the second waits instead of building over the first.
exec 9>"$cache/control-plane/.build.lock"
flock 9
stamp_matches "$bin/etcd" "${ETCD_VERSION#v}" || build_etcd
# kubectl is built too although Debian ships /usr/bin/kubectl v1.32: kubectl is supported only within
# one minor version of the server (1.35-1.37 for a 1.36 server), so 1.32 is outside the skew policy.
# kubelet, kube-scheduler and kube-proxy (the `kubernetes` Service that in-cluster config dials) run the
# real node of tests/node (docs/real-node.md). Only missing or stale binaries are built.
stale=()
for b in kube-apiserver kube-controller-manager kubectl kubelet kube-scheduler kube-proxy; do
  if [ "$b" = kubectl ]; then version_args="version --client"; else version_args=--version; fi
  stamp_matches "$bin/$b" "$K8S_VERSION" "$version_args" || stale+=("$b")
done
[ ${#stale[@]} -eq 0 ] || build_kubernetes "${stale[@]}"
stamp_matches "$bin/helm" "$HELM_VERSION" "version --short" || build_helm
echo "$bin"
