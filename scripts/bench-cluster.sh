#!/usr/bin/env bash
# Side-by-side load benchmark: the same model served by one gateway process
# with in-process experts (--experts local) and by the split cluster (gateway
# + one switchyard-expert process per expert, `switchyard up`), measured in
# one run with `switchyard bench`. Prints both results and their ratio.
#
# usage: [DEVICE=cuda [PRECISION=bf16|f32]] scripts/bench-cluster.sh [MODEL_DIR] [bench flags...]
#   MODEL_DIR defaults to a `make-model --preset bench` checkpoint in $TMPDIR.
#   DEVICE=cuda runs every process on GPU 0 (gateway and experts alike).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
bench_setup "$@"
device_flags=()
[ -n "${DEVICE:-}" ] && device_flags+=(--device "$DEVICE")
[ -n "${PRECISION:-}" ] && device_flags+=(--precision "$PRECISION")
[ ${#bench_flags[@]} -gt 0 ] || bench_flags=(--concurrency 8 --requests 32 --prompt-tokens 64 --output-tokens 32)
out=$(mktemp -d)

port=$(free_port)
"$bin/switchyard-gateway" --model "$model" --listen "127.0.0.1:$port" --experts local \
  "${device_flags[@]}" >"$out/local.log" 2>&1 &
pid=$!
pids+=("$pid")
wait_ready "$port" "$pid" || { cat "$out/local.log"; exit 1; }
"$bin/switchyard" bench --server "127.0.0.1:$port" "${bench_flags[@]}" --json >"$out/local.json"
kill -TERM "$pid"; wait "$pid" || true

port=$(free_port)
"$bin/switchyard" up --model "$model" --port "$port" "${device_flags[@]}" >"$out/split.log" 2>&1 &
pid=$!
pids+=("$pid")
wait_ready "$port" "$pid" || { cat "$out/split.log"; exit 1; }
"$bin/switchyard" bench --server "127.0.0.1:$port" "${bench_flags[@]}" --json >"$out/split.json"
kill -TERM "$pid"; wait "$pid" || true

python3 - "$out/local.json" "$out/split.json" "$model" "${bench_flags[*]}" "${DEVICE:-}" <<'PY'
import json, sys
local, split = (json.load(open(p)) for p in sys.argv[1:3])
def row(name, r):
    return (f"| {name} | {r['output_tokens_per_s']:.1f} | {r['ttft_ms']['p50']:.1f} | {r['ttft_ms']['p99']:.1f} "
            f"| {r['itl_ms']['p50']:.1f} | {r['itl_ms']['p99']:.1f} | {r['errors']} |")
print(f"model {sys.argv[3]}, bench {sys.argv[4]}, device {sys.argv[5] or 'cpu'}")
print("| deployment | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors |")
print("| --- | --- | --- | --- | --- | --- | --- |")
print(row("--experts local (1 process)", local))
print(row("split (gateway + 8 expert processes)", split))
print(f"split / local output throughput: {split['output_tokens_per_s'] / local['output_tokens_per_s']:.3f}")
PY
