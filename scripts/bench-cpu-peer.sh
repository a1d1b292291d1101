#!/usr/bin/env bash
# The CPU engine side by side with llama.cpp (issue #11), in one run: each
# round runs llama.cpp's batch-1 decode, this project's cpu_decode_bench (the
# STREAM triad, batch-1 and 16-sequence decode with their roofline fraction,
# 16 x 64-token prefill) for each configuration, then llama.cpp's
# 16-sequence generation and prefill; then the serving path: `switchyard
# bench` against one gateway with `--experts local` at 1 and 16 streams.
# Only ratios within a run mean anything on a shared machine; the load
# average is printed with every round.
#
# usage: scripts/bench-cpu-peer.sh LLAMA_BIN_DIR MODEL.gguf
#   LLAMA_BIN_DIR holds llama-bench and llama-batched-bench, MODEL.gguf the
#   F16 cpu-bench model (how to build both: ../shared/tools/peers/README.md;
#   llama.cpp itself stays outside this repository).
# environment (defaults in brackets):
#   REPS [2]        rounds
#   THREADS [2]     threads for both engines
#   CFGS ["auto:f32 auto:bf16"]  ISA:PRECISION pairs for cpu_decode_bench
#                   (ISA auto = the CPU's best level; else SWITCHYARD_CPU_ISA)
#   SERVING [1]     0 leaves out the serving-path runs
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -eq 2 ] || { sed -n 2,22p "$0" >&2; exit 2; }
llama=$1
gguf=$2
bench=build/bench/cpu_decode_bench
bin=build/bin
. scripts/bench-lib.sh
for f in "$llama/llama-bench" "$llama/llama-batched-bench" "$gguf" "$bench" "$bin/switchyard" \
  "$bin/switchyard-gateway"; do
  [ -e "$f" ] || { echo "bench-cpu-peer: $f is missing" >&2; exit 1; }
done
threads=${THREADS:-2}
lscpu | grep -E "Model name" || true
for r in $(seq "${REPS:-2}"); do
  echo "### round $r $(date +%T) load $(cut -d' ' -f1-3 /proc/loadavg)"
  LD_LIBRARY_PATH=$llama "$llama/llama-bench" -m "$gguf" -t "$threads" -p 0 -n 32 -r 2 2>&1 |
    grep -E "tg32" | sed 's/^/llama.cpp batch 1: /'
  for cfg in ${CFGS:-auto:f32 auto:bf16}; do
    isa=${cfg%%:*}
    precision=${cfg##*:}
    echo "switchyard isa=$isa precision=$precision"
    vars=(SWITCHYARD_CPU_PRECISION="$precision" OMP_NUM_THREADS="$threads")
    [ "$isa" = auto ] || vars+=(SWITCHYARD_CPU_ISA="$isa")
    env "${vars[@]}" "$bench" --benchmark_min_time=1 --benchmark_filter='Triad|Step|Prefill' 2>&1 |
      grep -E "^BM_"
  done
  echo "llama.cpp 16 sequences (S_PP prefill t/s, S_TG generation t/s):"
  LD_LIBRARY_PATH=$llama "$llama/llama-batched-bench" -m "$gguf" -t "$threads" -c 4096 -npp 64 \
    -ntg 16 -npl 16 2>&1 | grep -E "^\|" | tail -3
done
[ "${SERVING:-1}" = 1 ] || exit 0
model=$(bench_model "")
port=$(free_port)
log=$(mktemp)
OMP_NUM_THREADS=$threads "$bin/switchyard-gateway" --model "$model" --listen "127.0.0.1:$port" \
  --experts local >"$log" 2>&1 &
gw=$!
trap 'kill -TERM $gw 2>/dev/null || true; rm -f "$log"' EXIT
wait_ready "$port" $gw || { cat "$log" >&2; exit 1; }
for c in 1 16; do
  echo "serving path, --experts local, $c stream(s), 16 prompt / 32 output tokens, load $(cut -d' ' -f1 /proc/loadavg):"
  "$bin/switchyard" bench --server "127.0.0.1:$port" --concurrency $c --requests $((c * 2)) \
    --prompt-tokens 16 --output-tokens 32 2>&1 | grep -iE "tokens/s|ttft|itl" || true
done
