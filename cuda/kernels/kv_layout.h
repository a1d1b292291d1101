// Where the K/V of every sequence live on the device, shared by kv_append
// and attention (and the runner that owns the slab).
//
// Legend: N blocks in the slab, L layers, Bt = kKvBlockTokens positions per
// block, Hkv kv heads, hd head dim, kv_dim = Hkv * hd, B sequences in the step.
//
// Paged: one slab allocated up front, [N][L][2][Bt][kv_dim] (per block and
// layer the keys of its Bt positions, then their values), FP32 or BF16
// (KvDType). A sequence owns a list of blocks, its block table: position p
// lives in block table[p / Bt], slot p % Bt. Growing a sequence appends
// blocks to its table (nothing is copied), and a block may sit in several
// tables (a shared prefix) since only full, never rewritten blocks are
// shared. The block ids are the host KvCachePool's
// (attention_service/kv_cache.h), so both sides agree on who owns what.
//
// The step's tables are concatenated into one device array:
//   block_tables  [Σ_b num_blocks_b] int32: sequence b's table is
//                 block_tables[seqs[b].table_begin .. + seqs[b].num_blocks)
//   seqs          [B] SeqKvDesc
#ifndef SWITCHYARD_CUDA_KERNELS_KV_LAYOUT_H_
#define SWITCHYARD_CUDA_KERNELS_KV_LAYOUT_H_

#include <cstdint>

#ifdef __CUDACC__
#define SY_HOST_DEVICE __host__ __device__
#else
#define SY_HOST_DEVICE
#endif

namespace switchyard::cuda {

// Positions per block; equal to KvCachePool::kBlockTokens (the runner checks).
inline constexpr int kKvBlockTokens = 16;

// Element type of the slab.
enum class KvDType : int32_t {
  kF32,   // exact: the FP32 parity mode
  kBF16,  // half the bytes; K/V rounded to nearest even when appended
};

// One sequence of the step: where its block table sits in block_tables.
struct SeqKvDesc {
  int32_t table_begin = 0;
  int32_t num_blocks = 0;  // its positions are < num_blocks * kKvBlockTokens
};

// The slab and the step's block tables (all device pointers).
struct PagedKv {
  void* slab = nullptr;  // [N][L][2][Bt][kv_dim] of dtype
  KvDType dtype = KvDType::kF32;
  int32_t layers = 0;                     // L
  const int32_t* block_tables = nullptr;  // [Σ num_blocks]
  const SeqKvDesc* seqs = nullptr;        // [B]
};

// Offset in elements of the K (which = 0) or V (which = 1) row of `slot`
// (< kKvBlockTokens) of `block` in `layer`.
SY_HOST_DEVICE inline int64_t PagedKvRowOffset(int32_t block, int layers, int layer, int which,
                                               int slot, int kv_dim) {
  return (((static_cast<int64_t>(block) * layers + layer) * 2 + which) * kKvBlockTokens + slot) *
         kv_dim;
}

// Elements of one block (every layer, K and V).
SY_HOST_DEVICE inline int64_t PagedKvBlockElems(int layers, int kv_dim) {
  return static_cast<int64_t>(layers) * 2 * kKvBlockTokens * kv_dim;
}

}  // namespace switchyard::cuda

#endif  // SWITCHYARD_CUDA_KERNELS_KV_LAYOUT_H_
