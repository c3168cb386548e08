#!/usr/bin/env bash
# Installs what the real node of tests/node runs on, from Debian (docs/real-node.md):
#   containerd + runc                  the container runtime the kubelet talks CRI to;
#   containernetworking-plugins        the bridge/host-local/loopback CNI plugins (in /usr/lib/cni);
#   iptables                           kube-proxy's iptables mode (the `kubernetes` Service for in-cluster config);
#   buildah + gcc                      build the pause image (scripts/real-node/build-pause-image.sh;
#                                      scripts/images/build.sh installs what the project's images need).
# Idempotent: quick when everything is there. Progress goes to stderr.
set -euo pipefail

log() { echo "real-node/install-runtime: $*" >&2; }

# command -> Debian package providing it
declare -A packages=(
  [containerd]=containerd [runc]=runc [/usr/lib/cni/bridge]=containernetworking-plugins
  [iptables]=iptables [buildah]=buildah [gcc]=gcc [/usr/include/stdio.h]=libc6-dev
)
missing=()
for cmd in "${!packages[@]}"; do
  if [[ $cmd == /* ]]; then [ -e "$cmd" ]; else command -v "$cmd" >/dev/null; fi || missing+=("${packages[$cmd]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

log "installing ${missing[*]} with apt-get"
sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
# Other scripts may hold the dpkg lock at the same time on a shared machine: wait for it.
apt_get() { DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 "$@" >&2; }
# A fresh machine has no package lists yet; refresh them once, before the first install.
apt_get update -qq
apt_get install -y -qq --no-install-recommends "${missing[@]}"
# Debian starts a system containerd on install; the node runs its own (own root, socket and config).
if command -v systemctl >/dev/null && systemctl is-active --quiet containerd 2>/dev/null; then
  $sudo systemctl disable --now containerd >&2 || true
fi
