#!/usr/bin/env bash
# Lays out a fresh volume folder for the demo merge (dev-assistant.yaml): the base model, the example
# adapters and their eval sets. Copies, never symlinks: the worker rejects symlinks that leave a volume.
# The model is hard-linked where the filesystem allows (no 540 MB copy; nothing ever writes to it).
# Usage: make-store.sh STORE_DIR MODEL_DIR   (STORE_DIR must not exist yet)
set -euo pipefail
store=$1 model=$2
skills=$(cd "$(dirname "$0")/../skills" && pwd)
if [ -e "$store" ]; then
  echo "make-store: $store already exists; give a new folder" >&2
  exit 2
fi
mkdir -p "$store/models" "$store/adapters" "$store/eval"
target=$store/models/smollm2-135m-instruct
cp -al "$model" "$target" 2>/dev/null || { rm -rf "$target"; cp -r "$model" "$target"; }
for skill in python sql extract; do
  cp -r "$skills/adapters/$skill" "$store/adapters/$skill"
  cp "$skills/eval/$skill.jsonl" "$store/eval/$skill.jsonl"
done
