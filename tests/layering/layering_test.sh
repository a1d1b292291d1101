#!/usr/bin/env bash
# The one-way layout (README "Layout"), as ctest checks it:
#  1. scripts/check-layering.py passes on this tree, and fails on a copy with
#     an include pointing up (so the check can fail);
#  2. the switchyard-expert link line (build.ninja) names no gateway,
#     attention, scheduler or CLI library: an expert links only what an
#     expert needs, in CUDA builds too.
# usage: layering_test.sh SOURCE_DIR BINARY_DIR
set -euo pipefail
src=$1
bin=$2
python3 "$src/scripts/check-layering.py" "$src"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/scripts" "$tmp/cuda" "$tmp/core"
cp "$src/scripts/check-layering.py" "$tmp/scripts/"
printf '#include "gateway/step_runner.h"\n' > "$tmp/cuda/bad.h"
if python3 "$tmp/scripts/check-layering.py" "$tmp" > "$tmp/out.txt"; then
  echo "FAIL: check-layering.py accepted cuda/ including gateway/"
  exit 1
fi
grep -q "cuda/bad.h:1" "$tmp/out.txt" || { echo "FAIL: violation not reported:"; cat "$tmp/out.txt"; exit 1; }
echo "ok: an upward include is reported: $(head -1 "$tmp/out.txt")"

link=$(grep -E '^build bin/switchyard-expert: ' "$bin/build.ninja" -A 8 | sed '/^build /{2,$d}' | tr ' ' '\n' |
  grep -E 'lib[a-z_]+\.a$' | sort -u || true)
if [ -z "$link" ]; then
  echo "FAIL: no link line for bin/switchyard-expert in $bin/build.ninja"
  exit 1
fi
echo "switchyard-expert links: $(echo $link | xargs -n1 basename | tr '\n' ' ')"
bad=$(echo "$link" | grep -E 'switchyard_(gateway|attention|cli)' || true)
if [ -n "$bad" ]; then
  echo "FAIL: switchyard-expert links $bad"
  exit 1
fi
echo "ok: switchyard-expert links no gateway or attention library"
