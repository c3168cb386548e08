# Sourced by scripts/images/*.sh: where the images and buildah's storage live, and buildah's command line
# for that storage (its own root, so builds never touch another buildah user's images on the machine).
# ADAPTERMERGE_STORAGE_DRIVER: overlay (default) or vfs (copies every layer: slower, more disk; for
# kernels where overlay mounts fail).
cache=${ADAPTERMERGE_CACHE:-$HOME/.cache/adaptermerge}/images
driver=${ADAPTERMERGE_STORAGE_DRIVER:-overlay}
# shellcheck disable=SC2034  # used by the scripts that source this file
buildah=(buildah --root "$cache/buildah-$driver/root" --runroot "$cache/buildah-$driver/run"
         --storage-driver "$driver")
