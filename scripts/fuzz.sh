#!/usr/bin/env bash
# Builds the libFuzzer targets in fuzz/ with clang (ASan + UBSan) into
# ./build-fuzz and runs each for a bounded time on a scratch copy of its seed
# corpus (fuzz/corpus/<target>/). Fails if any target finds a crash, a leak,
# undefined behaviour, a failed invariant, a timeout or runs out of memory;
# the reproducer is left in build-fuzz/artifacts/<target>/ (re-run it with
# build-fuzz/fuzz/<target> FILE).
# Usage: scripts/fuzz.sh [SECONDS per target, default 60]
# Env: SWITCHYARD_JOBS (build parallelism), FUZZ_TARGETS (subset to run; a
#      target written NAME:SECONDS runs that long instead of SECONDS),
#      FUZZ_CC / FUZZ_CXX (default clang-14 / clang++-14).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
jobs=${SWITCHYARD_JOBS:-$(nproc)}
targets=(${FUZZ_TARGETS:-tokenizer_fuzzer safetensors_fuzzer request_validation_fuzzer
          chat_template_fuzzer openai_request_fuzzer expert_frame_fuzzer})
build=build-fuzz

# -O1 without NDEBUG: library assertions (Abseil, nlohmann_json) stay on.
CC=${FUZZ_CC:-clang-14} CXX=${FUZZ_CXX:-clang++-14} cmake -S . -B "$build" -G Ninja \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O1 -g1" \
  -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g1" \
  -DSWITCHYARD_FUZZ=ON -DSWITCHYARD_BUILD_TESTS=OFF -DSWITCHYARD_BUILD_BENCHMARKS=OFF \
  -DSWITCHYARD_CUDA=OFF >/dev/null
cmake --build "$build" -j"$jobs" --target "${targets[@]%%:*}"

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:symbolize=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
failed=()
for spec in "${targets[@]}"; do
  t=${spec%%:*}
  t_seconds=$seconds
  [ "$spec" != "$t" ] && t_seconds=${spec#*:}
  corpus=$build/corpus/$t
  artifacts=$build/artifacts/$t
  log=$build/logs/$t.log
  rm -rf "$corpus" "$artifacts"
  mkdir -p "$corpus" "$artifacts" "$(dirname "$log")"
  cp fuzz/corpus/"$t"/* "$corpus"/
  args=(-max_total_time="$t_seconds" -rss_limit_mb=2048 -timeout=30 -max_len=4096
        -print_final_stats=1 -artifact_prefix="$artifacts"/)
  [ -f fuzz/"${t%_fuzzer}".dict ] && args+=(-dict=fuzz/"${t%_fuzzer}".dict)
  echo "--- $t: fuzzing for ${t_seconds}s (log: $log)"
  if "$build"/fuzz/"$t" "${args[@]}" "$corpus" >"$log" 2>&1; then
    grep -E '^(#[0-9]+[[:space:]]+DONE|stat::number_of_executed_units|stat::peak_rss_mb)' "$log" || true
    echo "    corpus: $(ls "$corpus" | wc -l) inputs"
  else
    echo "!!! $t FAILED; last lines of $log:"
    tail -n 60 "$log"
    echo "!!! reproducer(s): $(ls "$artifacts"/* 2>/dev/null | tr '\n' ' ')"
    failed+=("$t")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "fuzz: all targets ran their time without a finding"
