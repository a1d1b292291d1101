#!/usr/bin/env bash
# Sets up a fresh Debian 12 machine, builds everything and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
scripts/check-format.sh
python3 scripts/check-layering.py
# Everything but the tests first: proves that -DSWITCHYARD_BUILD_TESTS=OFF
# builds and links every library, server, tool and benchmark (the emulator's
# included); the second call only adds the test suites.
scripts/build.sh -DSWITCHYARD_BUILD_TESTS=OFF
scripts/build.sh -DSWITCHYARD_BUILD_TESTS=ON
cd build
ctest --output-on-failure -j"${SWITCHYARD_JOBS:-$(nproc)}" --timeout 900
cd ..
# Sanitizer builds (ASan + UBSan, TSan) of the scheduler, gateway, engine and
# sampler suites, then 30 s of fuzzing per libFuzzer target: about 6 minutes
# more on 2 cores (measured 3.3 + 2.5 min from scratch).
scripts/sanitize.sh
scripts/fuzz.sh 30
