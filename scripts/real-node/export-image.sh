#!/usr/bin/env bash
# Writes a built image (a reference printed by build-images.sh) as a docker-archive tar to stdout, for
# `ctr images import -` (tests/support/real_node.py); no multi-GB file is left behind.
set -euo pipefail
# shellcheck source=buildah-storage.sh
. "$(dirname "$0")/buildah-storage.sh"
# The archive goes to fd 3 (this script's stdout); anything buildah itself prints goes to stderr.
buildah push --quiet "$1" "docker-archive:/dev/fd/3:$1" 3>&1 1>&2
