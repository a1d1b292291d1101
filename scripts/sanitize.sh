#!/usr/bin/env bash
# Builds test suites with AddressSanitizer + UndefinedBehaviorSanitizer
# (./build-asan) and with ThreadSanitizer (./build-tsan), runs them, and fails
# on any test failure or sanitizer report (memory error, leak, undefined
# behaviour, data race, lock-order inversion).
#   ASan + UBSan: scheduler_test gateway_test engine_test sampler_test
#                 health_service_test metrics_test frame_tls_test, and the CUDA kernels on
#                 their CPU emulator (device_emulation_test
#                 cuda_kernels_emulated_test: a kernel's out-of-bounds
#                 device access is a heap overflow there), where the CUDA
#                 toolkit's headers are installed. The whole CUDA runner on
#                 the emulator (cuda_parity_emulated_test, ~2.5 min under
#                 ASan) is left to `ASAN_TESTS=cuda_parity_emulated_test`.
#   TSan:         scheduler_test metrics_test worker_pool_test frame_tls_test
#                 (the suites with threads: the scheduler's loop and its
#                 callers, the /metrics server, core/worker_pool, a TLS frame
#                 socket read and written at once; engine_test and
#                 sampler_test run on one thread, so TSan would only slow
#                 them down; so would scheduler_test's one single-request
#                 ~4000-token prefill, left out under TSan)
# Built with g++ like the normal build, so the project and Debian's gRPC,
# protobuf and Abseil share one toolchain; those libraries are not
# instrumented. That is harmless for ASan/UBSan, but TSan cannot see the
# synchronisation inside an uninstrumented gRPC (completion queues, arenas,
# callback hand-offs), so gateway_test (the Generation API over real gRPC)
# reports ~1700 false races on every message gRPC passes between threads.
# Suppressing those would mean suppressing every stack through gRPC, which
# includes the project's service handlers, so gateway_test is not run under
# TSan; the scheduler's threading (scheduler_test) and the /metrics server
# (metrics_test: plain threads and sockets) are, with no suppressions.
# A suite whose expectations fail with no sanitizer report is rerun once with
# only its failed cases and, if they pass alone, reported as timing-sensitive
# (a warning, at the end); any sanitizer report fails the run.
# Usage: scripts/sanitize.sh [address|thread ...]   (default: both)
# Env: SWITCHYARD_JOBS (build parallelism); ASAN_TESTS / TSAN_TESTS (the test
#      binaries, defaults above).
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${SWITCHYARD_JOBS:-$(nproc)}
kinds=("$@")
[ ${#kinds[@]} -eq 0 ] && kinds=(address thread)

export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1"
# Idle OpenMP threads sleep instead of spinning (results do not depend on it;
# see tests/CMakeLists.txt).
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}

# What a sanitizer report looks like in a log (a report fails the run even if
# the process exited 0).
report='^(WARNING: ThreadSanitizer|==[0-9]+==ERROR)|runtime error:|^SUMMARY: [A-Za-z]+Sanitizer'
failed=()
flaky=()
for kind in "${kinds[@]}"; do
  case $kind in
    address) build=build-asan filter='*'
      tests=(${ASAN_TESTS:-scheduler_test gateway_test engine_test sampler_test health_service_test metrics_test frame_tls_test}) ;;
    # frame_tls_test: a TLS session read by one thread while another writes it.
    thread) build=build-tsan; tests=(${TSAN_TESTS:-scheduler_test metrics_test worker_pool_test frame_tls_test})
      # One request prefilling ~4000 tokens, no second thread to race with:
      # under TSan a third of scheduler_test's time (50 s), all in attention.
      # ASan and ctest run it.
      filter=-SchedulerTest.CapacityNotAMultipleOfTheBlockRefusesUpFrontAndNeverWedges
      # GNU libgomp is not built with TSan either: the barrier that ends an
      # OpenMP parallel region (core/cpu_ops.cc) is invisible to it, so every
      # buffer the region's workers touched looks raced by whoever uses or
      # frees it next. One OpenMP thread runs each region inline on its
      # caller, which TSan then checks like any other code.
      export OMP_NUM_THREADS=1 ;;
    *) echo "unknown sanitizer '$kind' (address|thread)" >&2; exit 2 ;;
  esac
  # -O1 -g1 (added by SWITCHYARD_SANITIZE) and no NDEBUG: library assertions stay on.
  cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_C_FLAGS_RELWITHDEBINFO="-g1" -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-g1" \
    -DSWITCHYARD_SANITIZE="$kind" -DSWITCHYARD_BUILD_BENCHMARKS=OFF -DSWITCHYARD_CUDA=OFF >/dev/null
  # The emulated CUDA suites, where CMake found the toolkit's headers.
  if [ "$kind" = address ] && [ -z "${ASAN_TESTS:-}" ] &&
      grep -q '^SWITCHYARD_CUDA_EMULATOR:BOOL=ON' "$build/CMakeCache.txt"; then
    tests+=(device_emulation_test cuda_kernels_emulated_test)
  fi
  echo "=== $kind: building ${tests[*]} in $build"
  cmake --build "$build" -j"$jobs" --target "${tests[@]}"
  for t in "${tests[@]}"; do
    log=$build/logs/$t.log
    mkdir -p "$(dirname "$log")"
    echo "--- $kind: $t (log: $log)"
    start=$SECONDS
    # Each suite runs as one process (not one per test case as ctest does),
    # so the sanitizer start-up and the fixture loads are paid once.
    if (cd "$build/tests" && "./$t" --gtest_brief=1 --gtest_filter="$filter") >"$log" 2>&1 \
        && ! grep -qE "$report" "$log"; then
      echo "    ok ($((SECONDS - start))s)"
    else
      echo "!!! $kind: $t FAILED after $((SECONDS - start))s; from $log:"
      first=$(grep -nE "$report" "$log" | head -n 1 | cut -d: -f1 || true)
      if [ -n "$first" ]; then
        tail -n +"$((first > 3 ? first - 3 : 1))" "$log" | head -n 80  # the first report
        failed+=("$kind:$t")
        continue
      fi
      tail -n 80 "$log"
      # No sanitizer report: test expectations failed. The same suites pass
      # uninstrumented in ctest; an expectation that fails only at the
      # sanitizer's 2-10x slowdown is run once more, alone, and reported
      # here as timing-sensitive whichever way the rerun goes. A crash or an
      # exit without gtest's list of failed tests is not rerun.
      cases=$(sed -n 's/^\[  FAILED  \] \([A-Za-z0-9_./]*\).*/\1/p' "$log" | sort -u | paste -sd: -)
      rerun_log=$build/logs/$t.rerun.log
      if [ -n "$cases" ] &&
          (cd "$build/tests" && "./$t" --gtest_brief=1 --gtest_filter="$cases") >"$rerun_log" 2>&1 &&
          ! grep -qE "$report" "$rerun_log"; then
        echo "!!! $kind: $t: TIMING-SENSITIVE under $kind: $cases failed, then passed alone (log: $rerun_log)"
        flaky+=("$kind:$t:$cases")
      else
        [ -n "$cases" ] && { echo "    rerun of $cases failed too:"; tail -n 40 "$rerun_log"; }
        failed+=("$kind:$t")
      fi
    fi
  done
done
if [ ${#failed[@]} -gt 0 ]; then
  # Again at the end, briefly, where a truncated CI log still shows it.
  for f in "${failed[@]}"; do
    kind=${f%%:*} t=${f#*:}
    [ "$kind" = address ] && build=build-asan || build=build-tsan
    echo "--- $f: the first failures and reports in $build/logs/$t.log:" >&2
    grep -nE "$report|Failure|FAILED|^Expected|^  Actual|Which is|Value of|death|timed out" \
      "$build/logs/$t.log" | head -n 25 >&2 || tail -n 25 "$build/logs/$t.log" >&2
  done
  echo "sanitize: FAILED: ${failed[*]}" >&2
  exit 1
fi
for f in "${flaky[@]}"; do
  echo "sanitize: WARNING: timing-sensitive under the sanitizer (failed, then passed alone): $f" >&2
done
echo "sanitize: ${kinds[*]}: no sanitizer report; every test passed${flaky[*]:+ (after the reruns above)}"
