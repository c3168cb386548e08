#!/usr/bin/env bash
# Runs a command in an image built by scripts/images/build.sh, as the image's user (10001), with
# buildah (chroot isolation, which shares the host network): a smoke test without a container runtime.
# Usage: scripts/images/run.sh IMAGE COMMAND [ARG...]    Exit status: the command's.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
# shellcheck source=scripts/images/storage.sh
. "$repo/scripts/images/storage.sh"
[ $# -ge 2 ] || { echo "usage: $0 IMAGE COMMAND [ARG...]" >&2; exit 2; }
image=$1; shift
container=$("${buildah[@]}" from --quiet --pull-never "$image")
trap '"${buildah[@]}" rm "$container" >/dev/null' EXIT
"${buildah[@]}" run --isolation chroot "$container" -- "$@"
