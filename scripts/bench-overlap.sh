#!/usr/bin/env bash
# Micro-batch overlap benchmark: one split cluster (`switchyard up`: a
# gateway + one switchyard-expert per expert) and two more gateways on the
# same expert processes, one with --micro-batches 1 (no overlap) and one with
# --micro-batches ${MICRO_BATCHES:-2} (auto would pick 1 here: every expert is on
# this host). `switchyard bench` runs against
# them alternately, ROUNDS times at each concurrency, in one run; prints every
# run and the mean overlap / no-overlap throughput ratio per concurrency.
#
# usage: [ROUNDS=2] [CONCURRENCY="8 16"] scripts/bench-overlap.sh [MODEL_DIR] [bench flags...]
#   MODEL_DIR defaults to a `make-model --preset bench` checkpoint in $TMPDIR.
#   bench flags default to --prompt-tokens 16 --output-tokens 64 (decode
#   steps of one token per stream: the steps that split, see
#   gateway/step_runner.h); --requests is 2 x the concurrency.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/bench-lib.sh
bench_setup "$@"
[ ${#bench_flags[@]} -gt 0 ] || bench_flags=(--prompt-tokens 16 --output-tokens 64)
rounds=${ROUNDS:-2}
overlap=${MICRO_BATCHES:-2}
[ "$overlap" != 1 ] || { echo "MICRO_BATCHES must not be 1 (that is the baseline)" >&2; exit 2; }
concurrency=${CONCURRENCY:-8 16}
out=$(mktemp -d)

up_port=$(free_port)
bench_up "$up_port" "$out/endpoints.json" "$out/up.log"
# The expert processes' addresses as a topology SPEC (0=ADDR;1=ADDR;...).
spec=$(python3 - "$out/endpoints.json" <<'PY'
import json, sys
procs = json.load(open(sys.argv[1]))["processes"]
print(";".join(f"{e}={p['grpc']}" for p in procs if p["role"] == "expert" for e in p["experts"]))
PY
)
declare -A port
for mb in 1 "$overlap"; do
  port[$mb]=$(free_port)
  "$bin/switchyard-gateway" --model "$model" --listen "127.0.0.1:${port[$mb]}" \
    --experts "$spec" --micro-batches "$mb" >"$out/gateway-$mb.log" 2>&1 &
  pids+=($!)
  wait_ready "${port[$mb]}" "${pids[-1]}" || { cat "$out/gateway-$mb.log"; exit 1; }
  grep -h "micro-batches" "$out/gateway-$mb.log" || true
done
for r in $(seq 1 "$rounds"); do
  for c in $concurrency; do
    for mb in 1 "$overlap"; do
      "$bin/switchyard" bench --server "127.0.0.1:${port[$mb]}" --concurrency "$c" \
        --requests $((2 * c)) "${bench_flags[@]}" --json >"$out/r$r-c$c-mb$mb.json"
    done
  done
done

python3 - "$out" "$rounds" "$concurrency" "$model" "${bench_flags[*]}" "$overlap" <<'PY'
import json, sys
out, rounds, conc, model, flags, m = (sys.argv[1], int(sys.argv[2]), sys.argv[3].split(),
                                      sys.argv[4], sys.argv[5], sys.argv[6])
print(f"model {model}, bench {flags}, {rounds} rounds alternating, split cluster on this host")
print(f"| streams | round | --micro-batches 1 tok/s | {m} tok/s | ITL p50 ms (1 / {m}) | ratio |")
print("| --- | --- | --- | --- | --- | --- |")
for c in conc:
    ratios = []
    for r in range(1, rounds + 1):
        a = json.load(open(f"{out}/r{r}-c{c}-mb1.json"))
        b = json.load(open(f"{out}/r{r}-c{c}-mb{m}.json"))
        ratio = b["output_tokens_per_s"] / a["output_tokens_per_s"]
        ratios.append(ratio)
        print(f"| {c} | {r} | {a['output_tokens_per_s']:.1f} | {b['output_tokens_per_s']:.1f} "
              f"| {a['itl_ms']['p50']:.1f} / {b['itl_ms']['p50']:.1f} | {ratio:.3f} |")
        assert a["errors"] == 0 and b["errors"] == 0, "bench errors"
    print(f"| {c} | mean | | | | {sum(ratios) / len(ratios):.3f} |")
PY
