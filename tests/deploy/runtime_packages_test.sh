#!/usr/bin/env bash
# The runtime stages of deploy/Dockerfile.cpu and deploy/Dockerfile.gpu
# install every shared library the binaries of BUILD_DIR link
# (check_runtime_packages.py: ldd + dpkg -S here, apt-cache dependency closure
# of the stage's packages). The GPU image cannot be built here (its CUDA base
# image cannot be pulled), so this is its only check; the CPU image is also
# built and run by image_smoke_test.sh. Then a self-test: a copy of
# Dockerfile.cpu without libgomp1 must fail, naming it.
# Usage: runtime_packages_test.sh BUILD_DIR SOURCE_DIR
set -euo pipefail
build_dir=${1:?usage: runtime_packages_test.sh BUILD_DIR SOURCE_DIR}
source_dir=${2:?usage: runtime_packages_test.sh BUILD_DIR SOURCE_DIR}
check="$source_dir/tests/deploy/check_runtime_packages.py"
binaries=("$build_dir/bin/switchyard" "$build_dir/bin/switchyard-gateway" "$build_dir/bin/switchyard-expert")
for b in "${binaries[@]}"; do
  [ -x "$b" ] || { echo "FAIL: $b is missing (build it first)" >&2; exit 1; }
done
if grep -q '^SWITCHYARD_CUDA:BOOL=ON' "$build_dir/CMakeCache.txt" 2>/dev/null; then
  echo "binaries built with the CUDA backend: its libraries must come from the CUDA base image"
else
  echo "binaries built without the CUDA backend: the GPU image's CUDA libraries (from its base image) are not checked"
fi
# The CPU image builds with -DSWITCHYARD_CUDA=OFF: the CUDA runtime these
# binaries may link is not part of it.
python3 "$check" --dockerfile "$source_dir/deploy/Dockerfile.cpu" --image-without-cuda "${binaries[@]}"
python3 "$check" --dockerfile "$source_dir/deploy/Dockerfile.gpu" --cuda-base "${binaries[@]}"

# Self-test: the check fails when a needed package is dropped.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
sed 's/ libgomp1 / /' "$source_dir/deploy/Dockerfile.cpu" >"$tmp/Dockerfile"
if grep -q libgomp1 "$tmp/Dockerfile"; then
  echo "FAIL: self-test could not drop libgomp1 from the copy of Dockerfile.cpu" >&2
  exit 1
fi
if python3 "$check" --dockerfile "$tmp/Dockerfile" --image-without-cuda "${binaries[@]}" \
  >"$tmp/out" 2>&1; then
  cat "$tmp/out" >&2
  echo "FAIL: self-test: the check passed without libgomp1" >&2
  exit 1
fi
grep -q 'needs package libgomp1' "$tmp/out" || { cat "$tmp/out" >&2; echo "FAIL: self-test: libgomp1 not named" >&2; exit 1; }
echo "self-test: without libgomp1 the check fails and names it"
echo PASS
