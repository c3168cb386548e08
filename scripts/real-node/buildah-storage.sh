# Sourced by build-images.sh and export-image.sh: buildah with the node's own image storage under the
# cache (overlay: a layer costs its diff, not a full copy as with vfs), so builds are cached between runs.
cache=${ADAPTERMERGE_CACHE:-$HOME/.cache/adaptermerge}/real-node
buildah() { command buildah --root "$cache/buildah/storage" --runroot "$cache/buildah/run" --storage-driver overlay "$@"; }
