# Sourced on the GPU machine, in the root of the working tree's copy, before
# the GPU tests and benchmarks (bench/gpu/README.md):
#   source bench/gpu/env.sh
# - unpacks .gpu.tar.xz (from bench/gpu/pack.sh) when .gpu is not there;
# - the test binaries look for tests/data at the path they were built from
#   (/work/main): link it to this copy when that path is not there;
# - they and the scripts look for the servers in build-gpu/bin and build/bin:
#   link both to the bundle's bin (where no build made them);
# - the bundle's libraries (gpu-bundle) first, then the machine's CUDA 13
#   runtime and cuBLAS wherever they are installed (/usr/local/cuda or pip);
# - SWITCHYARD_REQUIRE_GPU=1: a GPU test without a usable device fails
#   instead of skipping.
# The bundle travels compressed (bench/gpu/pack.sh): unpack it once.
[ -d .gpu ] || { [ -f .gpu.tar.xz ] && tar -xJf .gpu.tar.xz; }
[ -d /work/main/tests/data ] || { mkdir -p /work && ln -sfn "$PWD" /work/main; }
for sy_dir in build-gpu build; do  # never over a real build's bin
  [ -e "$sy_dir/bin" ] || { mkdir -p "$sy_dir" && ln -s "$PWD/.gpu/bin" "$sy_dir/bin"; }
done
# CUDA 13's runtime and cuBLAS (cuBLAS needs cuBLASLt beside it): from
# /usr/local/cuda when there, else wherever they are installed (pip wheels).
sy_path="$PWD/.gpu/lib"
for sy_lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13; do
  sy_found=$(ls "/usr/local/cuda/lib64/$sy_lib" 2>/dev/null ||
    find / -xdev -name "$sy_lib" 2>/dev/null | head -n 1)
  if [ -n "$sy_found" ]; then
    case ":$sy_path:" in *":$(dirname "$sy_found"):"*) ;; *) sy_path="$sy_path:$(dirname "$sy_found")" ;; esac
  else
    echo "env: $sy_lib NOT FOUND" >&2
  fi
done
export LD_LIBRARY_PATH="$sy_path"
export SWITCHYARD_REQUIRE_GPU=1
echo "env: LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
unset sy_path sy_lib sy_found sy_dir
