#!/usr/bin/env bash
# Builds the images the real node runs, without a Docker engine and without a public registry
# (docs/real-node.md):
#   pause     the pod sandbox image, from pause.c (gcc -static);
#   base      a Debian root filesystem made by mmdebstrap from Debian packages, standing in for the
#             Dockerfile's public base image (passed as the BASE_IMAGE build arg);
#   operator, worker   the Dockerfile's two targets, built by buildah.
# Cached: buildah's storage (with its layer cache) lives under the cache, so an unchanged tree rebuilds
# nothing. Usage: build-images.sh [TARGET...] (the Dockerfile's targets, default: operator worker; pause
# and base are always built). Prints one line per image on stdout: "<name> <reference> <image id>".
# Progress goes to stderr.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
here=$repo/scripts/real-node
# shellcheck source=buildah-storage.sh
. "$here/buildah-storage.sh"
DEBIAN_SUITE=${DEBIAN_SUITE:-bookworm}
# python-is-python3: the Dockerfile calls `python`, as the official python images provide it.
BASE_PACKAGES=${BASE_PACKAGES:-python3,python3-venv,python-is-python3,ca-certificates}
mkdir -p "$cache/buildah" "$cache/base"

log() { echo "real-node/build-images: $*" >&2; }
image_id() { buildah images --no-trunc --quiet "$1" 2>/dev/null | head -n 1 | sed 's/^sha256://'; }

# Parallel test runs share the storage: the second waits instead of building over the first.
exec 9>"$cache/buildah/.lock"
flock 9

# ---- pause: keyed by the source's hash -------------------------------------------------------------
pause_key=$(sha256sum "$here/pause.c" | cut -c1-12)
pause_ref=localhost/adaptermerge-pause:$pause_key
if [ -z "$(image_id "$pause_ref")" ]; then
  log "building $pause_ref"
  work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
  gcc -static -O2 -s -o "$work/pause" "$here/pause.c"
  ctr=$(buildah from scratch)
  buildah copy "$ctr" "$work/pause" /pause >/dev/null
  buildah config --entrypoint '["/pause"]' "$ctr"
  buildah commit --quiet --format docker --rm "$ctr" "$pause_ref" >/dev/null
fi
echo "pause $pause_ref $(image_id "$pause_ref")"

# ---- base: keyed by suite and packages -------------------------------------------------------------
base_key=$(printf '%s %s' "$DEBIAN_SUITE" "$BASE_PACKAGES" | sha256sum | cut -c1-12)
base_ref=localhost/adaptermerge-base:$DEBIAN_SUITE-$base_key
if [ -z "$(image_id "$base_ref")" ]; then
  tarball=$cache/base/$DEBIAN_SUITE-$base_key.tar
  if [ ! -f "$tarball" ]; then
    log "making a $DEBIAN_SUITE root filesystem with mmdebstrap ($BASE_PACKAGES)"
    mmdebstrap --quiet --variant=minbase --include="$BASE_PACKAGES" "$DEBIAN_SUITE" "$tarball.tmp" >&2
    mv "$tarball.tmp" "$tarball"
  fi
  log "importing it as $base_ref"
  ctr=$(buildah from scratch)
  buildah add "$ctr" "$tarball" / >/dev/null
  buildah config --cmd '["bash"]' "$ctr"
  buildah commit --quiet --format docker --rm "$ctr" "$base_ref" >/dev/null
fi
echo "base $base_ref $(image_id "$base_ref")"

# ---- the Dockerfile's targets -----------------------------------------------------------------------
# The build borrows this machine's CA bundle and pip.conf (how it reaches PyPI) as read-only build
# volumes: they are used by RUN steps and never become part of an image.
volumes=()
for f in /etc/ssl/certs /etc/pip.conf; do [ -e "$f" ] && volumes+=(-v "$f:$f:ro"); done
targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(operator worker)
for target in "${targets[@]}"; do
  log "building the Dockerfile's $target target (cached layers are reused)"
  buildah bud --quiet --layers --format docker --isolation chroot --network host "${volumes[@]}" \
    --build-arg "BASE_IMAGE=$base_ref" \
    --target "$target" -t "localhost/adaptermerge-$target:build" -f "${DOCKERFILE:-$repo/Dockerfile}" "$repo" >&2
  id=$(image_id "localhost/adaptermerge-$target:build")
  # Tagged by content: the chart names exactly the image that was built.
  ref=localhost/adaptermerge-$target:dev-${id:0:12}
  buildah tag "localhost/adaptermerge-$target:build" "$ref"
  echo "$target $ref $id"
done
