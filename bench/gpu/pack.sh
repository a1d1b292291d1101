#!/usr/bin/env bash
# Here, on the build machine: builds every GPU program in build-gpu
# (Release, CUDA on), packs them with the Debian libraries they need
# (gpu-bundle) into .gpu, and compresses that to .gpu.tar.xz. The bundle is
# ~71 MB, over the device tool's 64 MiB carry limit; the archive is ~13 MB.
# Carry .gpu.tar.xz; `source bench/gpu/env.sh` there unpacks it.
#   bench/gpu/pack.sh            (GPU_BUNDLE=path overrides the packer)
set -euo pipefail
cd "$(dirname "$0")/../.."
bundle=${GPU_BUNDLE:-$(cd .. && pwd)/shared/tools/gpu-bundle}
programs=(tests/cuda_kernels_test tests/cuda_parity_test tests/gpu_cluster_test
  bench/gpu_decode_bench bin/switchyard bin/switchyard-gateway bin/switchyard-expert
  bin/switchyard-delay-proxy)
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
grep -q '^SWITCHYARD_CUDA:BOOL=ON' build-gpu/CMakeCache.txt ||
  { echo "pack: SWITCHYARD_CUDA is off in build-gpu (no nvcc?)" >&2; exit 1; }
ninja -C build-gpu -j"$(nproc)" "${programs[@]##*/}"
rm -rf .gpu .gpu.tar.xz
"$bundle" .gpu "${programs[@]/#/build-gpu/}"
strip --strip-debug .gpu/bin/*
tar -cJf .gpu.tar.xz .gpu
echo "pack: $(du -sh .gpu | cut -f1) bundle in .gpu, $(du -sh .gpu.tar.xz | cut -f1) archive in .gpu.tar.xz"
