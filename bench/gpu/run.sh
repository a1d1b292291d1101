#!/usr/bin/env bash
# On the GPU machine, in the root of the working tree's copy (carry
# .gpu.tar.xz from bench/gpu/pack.sh): runs one stage of the GPU checks and
# writes its logs and results to $OUT (default ./out). Each stage fits one
# 10-minute device call on an H100; decode, peer and cluster need the model
# folder, which the decode stage writes and a later call on the same warm
# machine reuses. Where a session has only ~15 minutes of device time
# (starts included), run `tests` first, then `decode`; the rest next time.
#   bench/gpu/run.sh tests     kernels, parity (then memcheck of the kernels
#                              where compute-sanitizer works), split cluster
#   bench/gpu/run.sh decode    gpu_decode_bench at batch 1/16/64/256
#   bench/gpu/run.sh peer      hf_peer_bench.py on the same model
#   bench/gpu/run.sh cluster   split vs in-process serving at the same batches
#   bench/gpu/run.sh overlap   micro-batch overlap at 1 ms RTT, 16 streams, long
#                              prompts, --micro-batches 2 and 4 (needs root
#                              for network namespaces; skips otherwise)
# MODEL (default /tmp/mixtral-4l) and LAYERS (default 4) choose the model.
set -uo pipefail
cd "$(dirname "$0")/../.."
source bench/gpu/env.sh
out=${OUT:-out}
mkdir -p "$out"
model=${MODEL:-/tmp/mixtral-4l}
layers=${LAYERS:-4}
export SWITCHYARD_GPU_BENCH_MODEL=$model
status=0
step() {  # step NAME COMMAND...: runs it, tees its output to $out/NAME.log
  echo "== $1: ${*:2}"
  "${@:2}" 2>&1 | tee "$out/$1.log"
  local rc=${PIPESTATUS[0]}
  echo "== $1: exit $rc"
  [ "$rc" -eq 0 ] || status=1
}
case ${1:-} in
  tests)
    nvidia-smi -L
    step kernels .gpu/bin/cuda_kernels_test
    step parity .gpu/bin/cuda_parity_test
    if command -v compute-sanitizer >/dev/null; then
      step memcheck compute-sanitizer --tool memcheck --error-exitcode 1 .gpu/bin/cuda_kernels_test
    fi
    step gpu_cluster .gpu/bin/gpu_cluster_test
    grep -h "SKIPPED\|FAILED\|max |diff|" "$out"/*.log | sort | uniq -c | sort -rn | head -40
    ;;
  decode)
    step gpu_decode .gpu/bin/gpu_decode_bench --make-model-layers="$layers" \
      --benchmark_out="$out/gpu_decode.json" --benchmark_out_format=json
    ;;
  peer)
    step hf_peer python3 bench/hf_peer_bench.py --model "$model" --json "$out/hf_peer.json"
    ;;
  cluster)
    [ -f "$model/config.json" ] || { echo "no model in $model: run the decode stage first"; exit 1; }
    for c in 1 16 64 256; do
      step "split_vs_local_c$c" env DEVICE=cuda scripts/bench-cluster.sh "$model" \
        --concurrency "$c" --requests $((c * 4)) --prompt-tokens 128 --output-tokens 64
    done
    ;;
  overlap)
    [ -f "$model/config.json" ] || { echo "no model in $model: run the decode stage first"; exit 1; }
    for m in 2 4; do
      step "overlap_m$m" env DEVICE=cuda BIN_DIR="$PWD/build-gpu/bin" RTTS_MS=1 STREAMS=16 \
        NO_DIRECT=1 REPEATS=2 PROMPT_TOKENS=1024 OUTPUT_TOKENS=64 OVERLAP_MICRO_BATCHES=$m \
        scripts/bench-netem.sh "$model"
    done
    ;;
  *)
    sed -n '2,17p' "$0"
    exit 2
    ;;
esac
exit $status
