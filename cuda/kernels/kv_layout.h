// Where a sequence's K/V lives on the device, shared by kv_append and
// attention (and the runner that allocates it).
//
// Legend: L layers, S slots (the sequence's reserved capacity), Hkv kv heads,
// hd head dim, kv_dim = Hkv * hd.
//
// One allocation per sequence, FP32, [L][2][S][kv_dim]: per layer the keys of
// every slot, then the values. Growing a sequence means a new allocation with
// the larger S and a copy of each (layer, K|V) plane's first rows.
#ifndef SWITCHYARD_CUDA_KERNELS_KV_LAYOUT_H_
#define SWITCHYARD_CUDA_KERNELS_KV_LAYOUT_H_

#include <cstdint>

#ifdef __CUDACC__
#define SY_HOST_DEVICE __host__ __device__
#else
#define SY_HOST_DEVICE
#endif

namespace switchyard::cuda {

struct SeqKvDesc {
  float* base = nullptr;  // [L][2][capacity][kv_dim] on the device
  int32_t capacity = 0;   // S
  int32_t unused = 0;
};

// Offset in floats of the K (which = 0) or V (which = 1) row of `pos` in `layer`.
SY_HOST_DEVICE inline int64_t KvRowOffset(int32_t capacity, int layer, int which, int pos,
                                          int kv_dim) {
  return ((static_cast<int64_t>(layer) * 2 + which) * capacity + pos) * kv_dim;
}

}  // namespace switchyard::cuda

#endif  // SWITCHYARD_CUDA_KERNELS_KV_LAYOUT_H_
