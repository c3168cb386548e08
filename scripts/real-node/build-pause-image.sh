#!/usr/bin/env bash
# Builds the real node's pod sandbox ("pause") image from pause.c (gcc -static) with buildah, as a
# docker-archive for `ctr images import`: a public pause image cannot be pulled here (docs/real-node.md).
# Cached by the source's hash. Prints "pause IMAGE ARCHIVE" on the last line of stdout, as
# scripts/images/build.sh does for the Dockerfile's targets.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=scripts/images/storage.sh
. "$repo/scripts/images/storage.sh"  # $cache (the images folder) and $buildah for its storage
key=$(cat "$repo/scripts/real-node/pause.c" "$0" | sha256sum | cut -c1-16)
image=localhost/adaptermerge-pause:$key
archive=$cache/pause-$key.tar
mkdir -p "$cache"
exec 9>"$cache/.pause.lock"
flock 9
if [ ! -f "$archive" ]; then
  echo "real-node: building $image" >&2
  work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
  gcc -static -O2 -s -o "$work/pause" "$repo/scripts/real-node/pause.c"
  container=$("${buildah[@]}" from scratch)
  "${buildah[@]}" copy "$container" "$work/pause" /pause >/dev/null
  "${buildah[@]}" config --entrypoint '["/pause"]' "$container"
  "${buildah[@]}" commit --quiet --rm "$container" "$image" >/dev/null
  "${buildah[@]}" push --quiet "$image" "docker-archive:$archive.tmp:$image" >&2
  mv "$archive.tmp" "$archive"
fi
echo "pause $image $archive"
