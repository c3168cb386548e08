#!/usr/bin/env bash
# Builds the project's images from its Dockerfile without a Docker engine or a registry, cached.
#
# Usage: scripts/images/build.sh [operator] [worker]        (no argument: both)
# Output: progress on stderr; the LAST lines of stdout, one per target asked for, in that order:
#     TARGET IMAGE ARCHIVE
#   e.g.  worker localhost/adaptermerge-worker:3f2a... /root/.cache/adaptermerge/images/worker-3f2a....tar
#   ARCHIVE is a docker-archive tar holding IMAGE: `ctr -n k8s.io images import ARCHIVE` loads it into
#   containerd under that exact name (use it with imagePullPolicy: Never).
# Environment: ADAPTERMERGE_CACHE (default ~/.cache/adaptermerge; images under its images/ folder),
#   ADAPTERMERGE_STORAGE_DRIVER (buildah's: overlay by default, vfs where overlay mounts fail).
# Exit status: non-zero when a build fails (buildah's output is on stderr).
#
# How: a base image (Debian bookworm + python3 + python3-venv, made with mmdebstrap from Debian's
# mirror, imported with buildah as FROM scratch) replaces the Dockerfile's BASE_IMAGE, which names a
# public registry image that cannot be pulled here. buildah builds each target (chroot isolation, host
# network; the host's pip.conf and CA bundle are read-only build volumes, never in a layer) and writes
# the archive. Cached by a key over the Dockerfile, .dockerignore, the target's lock file, the source
# and this script: an unchanged tree prints the same archive without building; a code change reuses
# buildah's cached dependency layer (no torch reinstall). Runs as root (buildah's chroot isolation).
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=scripts/images/storage.sh
. "$repo/scripts/images/storage.sh"  # $cache and the buildah command line ($buildah) for its storage
targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(operator worker)
# The base: what the Dockerfile's default base (python:*-slim-bookworm) provides, from Debian packages.
base_suite=bookworm
base_packages=python3,python3-venv,ca-certificates

log() { echo "images: $*" >&2; }
for target in "${targets[@]}"; do
  case $target in operator|worker) ;; *) echo "usage: $0 [operator] [worker]" >&2; exit 2 ;; esac
done

# Debian's buildah and mmdebstrap, installed once (like scripts/system-deps.sh).
missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]} with apt-get"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
fi

mkdir -p "$cache"
exec 9>"$cache/.build.lock"
flock 9  # a parallel run waits, then finds the archives made

hash16() { sha256sum | cut -c1-16; }

# ---- the base image --------------------------------------------------------------------------------
base_key=$(echo "$base_suite $base_packages" | hash16)
base_image=localhost/adaptermerge-base:$base_key
if ! "${buildah[@]}" inspect --type image "$base_image" >/dev/null 2>&1; then
  base_tar=$cache/base-$base_key.tar
  if [ ! -f "$base_tar" ]; then
    log "making the base root filesystem (mmdebstrap $base_suite: $base_packages)"
    # mmdebstrap picks the output format by the name's extension: the partial file must end in .tar.
    nice -n 10 mmdebstrap --quiet --variant=minbase --include="$base_packages" "$base_suite" "$base_tar.part.tar" >&2
    mv "$base_tar.part.tar" "$base_tar"
  fi
  log "importing $base_image"
  container=$("${buildah[@]}" from scratch)
  "${buildah[@]}" add "$container" "$base_tar" / >/dev/null
  "${buildah[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd /bin/bash "$container"
  "${buildah[@]}" commit --quiet --rm "$container" "$base_image" >/dev/null
fi

# ---- the targets -----------------------------------------------------------------------------------
# Build volumes: how this host reaches PyPI (its pip config and CA bundle), read-only, only while building.
volumes=()
for path in /etc/pip.conf /etc/ssl/certs; do
  [ -e "$path" ] && volumes+=(-v "$path:$path:ro")
done
source_hash=$(cd "$repo" && find pyproject.toml README.md LICENSE merge_worker operator -type f \
  ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum | sha256sum)

results=()
for target in "${targets[@]}"; do
  key=$( { echo "$base_key $source_hash"; cat "$repo/Dockerfile" "$repo/.dockerignore" \
           "$repo/requirements/$target.txt" "$repo/scripts/images/build.sh"; } | hash16)
  image=localhost/adaptermerge-$target:$key
  archive=$cache/$target-$key.tar
  if [ -f "$archive" ]; then
    log "$target: cached ($archive)"
    touch "$archive"  # recently used: kept by the pruning below
  else
    log "$target: building $image"
    start=$SECONDS
    nice -n 10 "${buildah[@]}" bud --layers --isolation chroot --network host "${volumes[@]}" \
      --build-arg "BASE_IMAGE=$base_image" --target "$target" --tag "$image" \
      --file "$repo/Dockerfile" "$repo" >&2
    rm -f "$archive.tmp"
    "${buildah[@]}" push --quiet "$image" "docker-archive:$archive.tmp:$image" >&2
    mv "$archive.tmp" "$archive"
    # Keep the 2 most recently used archives of this target: other checkouts on this machine (a CI
    # clone beside a working copy) may be about to import theirs. Older ones go, with their image
    # tags; the layers they share with newer images stay in buildah's cache.
    for old in $(ls -t "$cache/$target"-*.tar | tail -n +3); do
      old_key=${old##*/"$target"-}; old_key=${old_key%.tar}
      "${buildah[@]}" rmi "localhost/adaptermerge-$target:$old_key" >/dev/null 2>&1 || true
      rm -f "$old"
    done
    log "$target: built in $((SECONDS - start)) s, archive $(du -h "$archive" | cut -f1)"
  fi
  results+=("$target $image $archive")
done
printf '%s\n' "${results[@]}"
