#!/usr/bin/env bash
# Side-by-side load benchmark: the same model served by one gateway process
# with in-process experts (--experts local) and by the split cluster (gateway
# + one switchyard-expert process per expert, `switchyard up`), measured in
# one run with `switchyard bench`. Prints both results and their ratio.
#
# usage: [DEVICE=cuda [PRECISION=bf16|f32]] [EXPERTS_PER_PROCESS="1 8"] \
#          [TRANSPORTS="frames grpc"] [SPINS="0 200"] [ROUNDS=3] \
#          scripts/bench-cluster.sh [MODEL_DIR] [bench flags...]
#   MODEL_DIR defaults to a `make-model --preset bench` checkpoint in $TMPDIR.
#   DEVICE=cuda runs every process on GPU 0 (gateway and experts alike).
#   EXPERTS_PER_PROCESS: the split layouts to measure, each `up
#   --experts-per-process N` one after another after the local run (default
#   1: one process per expert).
#   TRANSPORTS: the gateway's --expert-transport values to measure for each
#   layout (default "frames", the gateway's default).
#   SPINS: the --frame-spin-us values (gateway and experts alike) to measure
#   for each layout and transport (default "0", the default).
#   ROUNDS: how many times to measure every deployment (default 1). On a
#   shared machine one run of the same thing can be 1.3x another minutes
#   later, and the first run of a series is often the slowest, so rounds
#   alternate the order (odd rounds local first, even rounds local last);
#   the table shows each deployment's median round and every round's
#   split / local ratio, taken within that round.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
bench_setup "$@"
device_flags=()
[ -n "${DEVICE:-}" ] && device_flags+=(--device "$DEVICE")
[ -n "${PRECISION:-}" ] && device_flags+=(--precision "$PRECISION")
[ ${#bench_flags[@]} -gt 0 ] || bench_flags=(--concurrency 8 --requests 32 --prompt-tokens 64 --output-tokens 32)
out=$(mktemp -d)

# serve_and_bench NAME COMMAND...: starts COMMAND (a gateway answering on
# $port), benches it into $out/NAME.json, stops it.
serve_and_bench() {
  local name=$1
  shift
  "$@" >"$out/$name.log" 2>&1 &
  local pid=$!
  pids+=("$pid")
  wait_ready "$port" "$pid" || { cat "$out/$name.log"; exit 1; }
  "$bin/switchyard" bench --server "127.0.0.1:$port" "${bench_flags[@]}" --json >"$out/$name.json"
  kill -TERM "$pid"; wait "$pid" || true
}

rounds=${ROUNDS:-1}
[[ "$rounds" =~ ^[1-9][0-9]*$ ]] || { echo "bench-cluster: ROUNDS must be a positive integer, got '$rounds'" >&2; exit 2; }
layouts=(${EXPERTS_PER_PROCESS:-1})
transports=(${TRANSPORTS:-frames})
spins=(${SPINS:-0})
runs=()
for epp in "${layouts[@]}"; do
  for transport in "${transports[@]}"; do
    for spin in "${spins[@]}"; do runs+=("$epp-$transport-$spin"); done
  done
done

bench_local() {  # bench_local ROUND
  port=$(free_port)
  serve_and_bench "local-$1" "$bin/switchyard-gateway" --model "$model" \
    --listen "127.0.0.1:$port" --experts local "${device_flags[@]}"
}
bench_splits() {  # bench_splits ROUND
  local run epp transport spin
  for run in "${runs[@]}"; do
    IFS=- read -r epp transport spin <<<"$run"
    port=$(free_port)
    serve_and_bench "split-$run-$1" "$bin/switchyard" up --model "$model" \
      --port "$port" --experts-per-process "$epp" "${device_flags[@]}" \
      --gateway-arg=--expert-transport="$transport" \
      --gateway-arg=--frame-spin-us="$spin" --expert-arg=--frame-spin-us="$spin"
  done
}
for ((round = 1; round <= rounds; round++)); do
  if ((round % 2 == 1)); then
    bench_local "$round"; bench_splits "$round"
  else
    bench_splits "$round"; bench_local "$round"
  fi
done

python3 - "$out" "$model" "${bench_flags[*]}" "${DEVICE:-}" "${#transports[@]}" "${#spins[@]}" \
  "$rounds" "${runs[@]}" <<'PY'
import json, statistics, sys
out, model, flags, device, transports, spins, rounds, runs = (
    sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]),
    int(sys.argv[7]), sys.argv[8:])
def load(name):
    return [json.load(open(f"{out}/{name}-{r}.json")) for r in range(1, rounds + 1)]
def median_round(results):
    # The round whose throughput is the median (the lower middle of an even count).
    ranked = sorted(results, key=lambda r: r["output_tokens_per_s"])
    return ranked[(len(ranked) - 1) // 2]
local = load("local")
def label(run):
    epp, transport, spin = run.split("-", 2)
    text = f"{epp}, {transport}" if transports > 1 else epp
    return f"{text}, spin {spin} us" if spins > 1 else text
splits = [(label(r), load(f"split-{r}")) for r in runs]
def row(name, results):
    r = median_round(results)
    return (f"| {name} | {r['output_tokens_per_s']:.1f} | {r['ttft_ms']['p50']:.1f} | {r['ttft_ms']['p99']:.1f} "
            f"| {r['itl_ms']['p50']:.1f} | {r['itl_ms']['p99']:.1f} | {r['errors']} |")
print(f"model {model}, bench {flags}, device {device or 'cpu'}"
      + (f", {rounds} rounds (median round per row)" if rounds > 1 else ""))
print("| deployment | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | errors |")
print("| --- | --- | --- | --- | --- | --- | --- |")
print(row("--experts local (1 process)", local))
for epp, split in splits:
    print(row(f"split, --experts-per-process {epp}", split))
for epp, split in splits:
    ratios = [s["output_tokens_per_s"] / l["output_tokens_per_s"] for s, l in zip(split, local)]
    text = f"{statistics.median(ratios):.3f}"
    if rounds > 1:
        text += " (median; rounds " + ", ".join(f"{x:.3f}" for x in ratios) + ")"
    print(f"split (--experts-per-process {epp}) / local output throughput: {text}")
PY
