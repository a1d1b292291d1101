#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine, builds everything and runs every test.
# Ends with each stage's wall time (also when a stage fails), so that a CI
# log's tail shows where the time went.
set -euo pipefail
cd "$(dirname "$0")/.."
stage_names=()
stage_secs=()
stage_start=$SECONDS
stage=""
begin() {
  [ -n "$stage" ] && { stage_names+=("$stage"); stage_secs+=($((SECONDS - stage_start))); }
  stage=$1
  stage_start=$SECONDS
  echo "=== test.sh: $stage"
}
summary() {
  local rc=$?
  [ -n "$stage" ] && { stage_names+=("$stage"); stage_secs+=($((SECONDS - stage_start))); }
  echo "=== test.sh: stage times (total ${SECONDS}s)"
  for i in "${!stage_names[@]}"; do
    printf '    %5ds  %s\n' "${stage_secs[$i]}" "${stage_names[$i]}"
  done
  [ "$rc" -eq 0 ] && echo "=== test.sh: PASS" || echo "=== test.sh: FAILED in stage '$stage' (exit $rc)"
}
trap summary EXIT

begin "install-deps"
scripts/install-deps.sh
begin "format and layering checks"
scripts/check-format.sh
python3 scripts/check-layering.py
# Everything but the tests first: proves that -DSWITCHYARD_BUILD_TESTS=OFF
# builds and links every library, server, tool and benchmark (the emulator's
# included); the second call only adds the test suites.
begin "build (tests off)"
scripts/build.sh -DSWITCHYARD_BUILD_TESTS=OFF
begin "build (tests on)"
scripts/build.sh -DSWITCHYARD_BUILD_TESTS=ON
begin "ctest"
(cd build && ctest --output-on-failure -j"${SWITCHYARD_JOBS:-$(nproc)}" --timeout 900)
# Sanitizer builds (ASan + UBSan, TSan) of the scheduler, gateway, engine and
# sampler suites, then a bounded time of fuzzing per libFuzzer target.
begin "sanitizers"
scripts/sanitize.sh
begin "fuzz"
# The chat-template, OpenAI-request and expert-frame targets get 8 s each
# (with their build, under 30 s added to the stage each); the others 20 s.
FUZZ_TARGETS="tokenizer_fuzzer safetensors_fuzzer request_validation_fuzzer \
  chat_template_fuzzer:8 openai_request_fuzzer:8 expert_frame_fuzzer:8" scripts/fuzz.sh 20
stage_names+=("$stage"); stage_secs+=($((SECONDS - stage_start))); stage=""
