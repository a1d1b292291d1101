#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: install, build, bring up the
# local cluster (gateway + one expert process per expert) on the demo model,
# stream a generation through the Generation API, and shut everything down.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/build.sh
model=${MODEL:-tests/data/tiny-mixtral}
port=${PORT:-50051}
endpoints=$(mktemp -d)/endpoints.json
build/bin/switchyard up --model "$model" --port "$port" --endpoints-file "$endpoints" &
up_pid=$!
trap 'kill -TERM $up_pid 2>/dev/null; wait $up_pid 2>/dev/null' EXIT
for _ in $(seq 1 600); do
  [ -s "$endpoints" ] && break
  kill -0 $up_pid 2>/dev/null || { echo "switchyard up exited early" >&2; exit 1; }
  sleep 0.1
done
[ -s "$endpoints" ] || { echo "cluster did not become ready" >&2; exit 1; }
echo "--- cluster processes:"
cat "$endpoints"
echo "--- streaming a generation from 127.0.0.1:$port:"
build/bin/switchyard generate --server "127.0.0.1:$port" \
  --prompt "${PROMPT:-The capital of France is}" --max-new-tokens "${MAX_NEW_TOKENS:-32}"
