# Sourced on the GPU machine, in the root of the working tree's copy, before
# the GPU tests and benchmarks (bench/gpu/README.md):
#   source bench/gpu/env.sh
# - unpacks .gpu.tar.xz (from bench/gpu/pack.sh) when .gpu is not there;
# - the test binaries look for tests/data at the path they were built from
#   (/work/main): link it to this copy when that path is not there;
# - they and the scripts look for the servers in build-gpu/bin and build/bin:
#   link both to the bundle's bin (where no build made them);
# - the bundle's libraries (gpu-bundle) first, then the machine's CUDA 13
#   cuBLAS wherever it is installed (/usr/local/cuda or a pip wheel);
# - SWITCHYARD_REQUIRE_GPU=1: a GPU test without a usable device fails
#   instead of skipping.
# The bundle travels compressed (bench/gpu/pack.sh): unpack it once.
[ -d .gpu ] || { [ -f .gpu.tar.xz ] && tar -xJf .gpu.tar.xz; }
[ -d /work/main/tests/data ] || { mkdir -p /work && ln -sfn "$PWD" /work/main; }
for sy_dir in build-gpu build; do  # never over a real build's bin
  [ -e "$sy_dir/bin" ] || { mkdir -p "$sy_dir" && ln -s "$PWD/.gpu/bin" "$sy_dir/bin"; }
done
sy_cublas=$(ls /usr/local/cuda/lib64/libcublas.so.13 2>/dev/null ||
  find / -xdev -name 'libcublas.so.13' 2>/dev/null | head -n 1)
export LD_LIBRARY_PATH="$PWD/.gpu/lib${sy_cublas:+:$(dirname "$sy_cublas")}:/usr/local/cuda/lib64"
export SWITCHYARD_REQUIRE_GPU=1
echo "env: cuBLAS ${sy_cublas:-NOT FOUND}; LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
unset sy_cublas sy_dir
