// The key/value cache of the attention side.
//
// A KvCachePool owns a memory budget counted in token slots (one slot holds
// one position's K and V for every layer), handed out in fixed blocks of
// kBlockTokens slots. By default (KvLayout::kPaged) the K/V of every block
// live in one slab the pool allocates up front; each sequence keeps a block
// table (block index per kBlockTokens positions) and attention reads its
// K/V through it, so sequences grow a block at a time without copying and
// any free block serves any sequence. Reserve fails with RESOURCE_EXHAUSTED
// when no block is free, and a sequence's blocks go back to the pool when its
// SequenceKv is destroyed.
//
// Prefix reuse (paged storage, host or device): once a block is full, the
// scheduler publishes it under the hash of every token up to its end
// (Publish). A published block is shared read-only by every sequence whose
// context starts with the same tokens (AttachCachedPrefix), and when no
// sequence holds it any more it stays cached, evicted least recently used
// first when the pool needs a free block. Only full blocks are shared and a
// sequence only ever writes past its length, so a shared block is never
// written: no copy is needed.
//
// KvLayout::kContiguous keeps each sequence's K/V in its own growing arrays
// (the layout before paging): the oracle tests check the paged layout
// against. A GPU runner keeps K/V on the device (host_storage = false): the
// pool then only accounts blocks, and the runner keeps a device slab of
// total_blocks() blocks indexed by the same block ids (the pool's
// attachment()), read through each sequence's block_table(); prefix reuse
// works the same way there.
//
// Host K/V are stored as FP32 (KvDtype::kF32, exact: the HF-parity mode) or
// as BF16 (kBf16: half the bytes, so twice the tokens in the same memory;
// K/V are rounded to nearest even when written and widened to FP32 when
// attention reads them). The pool is sized in token slots; TokensForBytes
// converts a byte budget, HostKvBudgetBytes gives the default one.
//
// Thread-safety: KvCachePool is thread-safe. A SequenceKv is used by one
// thread at a time (the engine step that owns it).
#ifndef SWITCHYARD_ATTENTION_SERVICE_KV_CACHE_H_
#define SWITCHYARD_ATTENTION_SERVICE_KV_CACHE_H_

#include <atomic>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "core/model_config.h"

namespace switchyard {

class SequenceKv;

// How host K/V are stored.
enum class KvDtype {
  kF32,   // 4 bytes per value, exact
  kBf16,  // 2 bytes per value, rounded to nearest even when written
};
// "f32" or "bf16".
const char* KvDtypeName(KvDtype dtype);
// What --kv-cache-dtype auto means for host K/V: kBf16 when the CPU's
// matmul precision is BF16 (SWITCHYARD_CPU_PRECISION=bf16, cpu_ops.h), kF32
// (exact, the HF-parity mode) otherwise.
KvDtype DefaultHostKvDtype();
// "auto" (DefaultHostKvDtype()), "bf16" or "f32"; INVALID_ARGUMENT naming
// --kv-cache-dtype otherwise.
absl::StatusOr<KvDtype> ParseKvDtype(absl::string_view text);
// Bytes per K or V value.
inline int KvDtypeBytes(KvDtype dtype) { return dtype == KvDtype::kBf16 ? 2 : 4; }

enum class KvLayout {
  kPaged,       // blocks of one preallocated slab, read through a block table
  kContiguous,  // one growing array per sequence and layer (the test oracle)
};

class KvCachePool {
 public:
  static constexpr int kBlockTokens = 16;

  // max_tokens: the budget in token slots across all sequences; whole blocks
  // of it are usable (max_tokens / kBlockTokens blocks).
  // host_storage: keep K/V in host memory (default). A GPU runner passes
  // false: the pool then only accounts blocks, and the runner keeps the
  // tensors on the device (see SequenceKv::attachment).
  // layout: how host K/V are stored (default paged; ignored without host storage).
  // If the address space for the paged slab cannot be mapped, the pool says
  // so on stderr and falls back to the contiguous layout.
  // dtype: the element type of K/V (default FP32); without host storage it
  // only sets bytes_per_token().
  KvCachePool(const ModelConfig& config, int64_t max_tokens, bool host_storage = true,
              KvLayout layout = KvLayout::kPaged, KvDtype dtype = KvDtype::kF32);
  ~KvCachePool();
  KvCachePool(const KvCachePool&) = delete;
  KvCachePool& operator=(const KvCachePool&) = delete;

  std::unique_ptr<SequenceKv> NewSequence();

  // Slots a sequence of `tokens` positions takes: whole blocks, so more than
  // `tokens` unless it is a multiple of kBlockTokens. Admission compares this,
  // not `tokens`, with capacity_tokens().
  static int64_t SlotsFor(int64_t tokens) {
    return (tokens + kBlockTokens - 1) / kBlockTokens * kBlockTokens;
  }

  int64_t capacity_tokens() const { return max_tokens_; }
  int64_t used_tokens() const { return used_blocks_.load() * kBlockTokens; }
  int64_t live_sequences() const { return live_sequences_.load(); }
  int64_t total_blocks() const { return total_blocks_; }
  // Blocks no sequence holds (cached ones included: they are evicted on demand).
  int64_t free_blocks() const { return total_blocks_ - used_blocks_.load(); }
  // Blocks no sequence holds that still keep a published prefix.
  int64_t cached_blocks() const;
  // Whether sequences can share published prefix blocks: paged host storage,
  // or device storage (whose runner pages a device slab by the pool's block ids).
  bool prefix_caching() const { return slab_ != nullptr || !host_storage_; }
  // Whether the K/V live in this pool's host memory (else on a device).
  bool host_storage() const { return host_storage_; }
  // Bytes one token slot takes (K and V, all layers, in dtype()).
  int64_t bytes_per_token() const { return BytesPerToken(config_, dtype_); }
  static int64_t BytesPerToken(const ModelConfig& config, KvDtype dtype) {
    return int64_t{2} * config.num_hidden_layers * config.kv_dim() * KvDtypeBytes(dtype);
  }
  // Token slots (whole blocks) that `bytes` of K/V in `dtype` hold.
  static int64_t TokensForBytes(const ModelConfig& config, KvDtype dtype, int64_t bytes) {
    return bytes / BytesPerToken(config, dtype) / kBlockTokens * kBlockTokens;
  }
  // The element type of the K/V (host storage), or the one the device slab
  // is accounted in (device storage).
  KvDtype dtype() const { return dtype_; }
  // Bytes of K/V the whole pool holds (every block), wherever it is stored.
  int64_t capacity_bytes() const { return total_blocks_ * kBlockTokens * bytes_per_token(); }
  const ModelConfig& config() const { return config_; }
  KvLayout layout() const { return layout_; }

  // Backend state that lives as long as the pool (a GPU runner's device
  // slab of total_blocks() blocks). Set once: SetAttachmentIfUnset keeps an
  // existing one and returns whichever is now set.
  std::shared_ptr<void> attachment() const;
  std::shared_ptr<void> SetAttachmentIfUnset(std::shared_ptr<void> attachment);

 private:
  friend class SequenceKv;
  // Appends `n` free blocks to `table`; false (and nothing taken) if fewer are free.
  struct BlockInfo {
    int refs = 0;            // sequences whose table holds the block
    bool published = false;  // in by_hash_ (then in lru_ while refs == 0)
    uint64_t hash = 0;
    std::list<int32_t>::iterator lru;
  };
  // Appends `n` free blocks to `table` (evicting cached ones if it must);
  // false (and nothing taken) if fewer are free.
  bool TryAcquire(int n, std::vector<int32_t>* table);
  void Release(const std::vector<int32_t>& blocks);
  // The published block for `hash`, now also held by the caller, or -1.
  int32_t Share(uint64_t hash);
  // Makes `block` (full, written) findable under `hash` unless another block
  // already is.
  void Publish(int32_t block, uint64_t hash);
  // K of block `block`, layer `layer`: [kBlockTokens, Hkv*hd] in dtype_; V follows it.
  char* BlockKeys(int32_t block, int layer) const {
    return slab_ + (static_cast<int64_t>(block) * layers_ + layer) * 2 * block_plane_ * elem_bytes_;
  }

  ModelConfig config_;
  int64_t max_tokens_;
  bool host_storage_;
  KvLayout layout_;
  KvDtype dtype_;
  int elem_bytes_;  // KvDtypeBytes(dtype_)
  int layers_;
  int64_t block_plane_;  // values of one block's K (or V) in one layer
  int64_t total_blocks_;
  // The paged slab, [blocks][L][K|V][kBlockTokens][Hkv*hd] in dtype_, mapped
  // at construction; the OS backs its pages only as blocks are written.
  char* slab_ = nullptr;
  size_t slab_bytes_ = 0;
  mutable std::mutex mu_;
  std::vector<int32_t> free_;  // guarded by mu_; released unpublished blocks, popped from the back
  std::vector<BlockInfo> info_;                    // guarded by mu_; [blocks handed out so far]
  std::unordered_map<uint64_t, int32_t> by_hash_;  // guarded by mu_; published blocks
  std::list<int32_t> lru_;  // guarded by mu_; published, refs == 0, oldest first
  std::atomic<int64_t> used_blocks_{0};
  std::atomic<int64_t> live_sequences_{0};
  std::shared_ptr<void> attachment_;  // guarded by mu_
};

class SequenceKv {
 public:
  ~SequenceKv();
  SequenceKv(const SequenceKv&) = delete;
  SequenceKv& operator=(const SequenceKv&) = delete;

  // Positions already written and committed.
  int length() const { return length_; }
  // Slots reserved from the pool (a multiple of kBlockTokens).
  int reserved() const { return static_cast<int>(blocks_.size()) * KvCachePool::kBlockTokens; }
  // The element type of key()/value() (the pool's).
  KvDtype dtype() const { return pool_->dtype(); }
  // The pool blocks holding positions [16 i, 16 i + 16), in order.
  const std::vector<int32_t>& block_table() const { return blocks_; }
  // The pool the blocks come from.
  KvCachePool& pool() const { return *pool_; }

  // Makes room for positions [0, new_length). RESOURCE_EXHAUSTED if the pool
  // has too few free blocks (nothing changes then).
  absl::Status Reserve(int new_length);
  // Marks `n` more positions as written.
  void Commit(int n) { length_ += n; }
  // Forgets positions from `new_length` on (their slots stay reserved). Only
  // for sequences that never attached or published a prefix (benchmarks).
  void Truncate(int new_length) { length_ = new_length < length_ ? new_length : length_; }

  // Prefix reuse. A fresh sequence (nothing reserved) whose context is
  // `tokens` takes the longest run of published blocks that matches its
  // first tokens, leaving at least one token to compute (the step that
  // samples needs its logits). Returns the positions it now holds (its
  // length; 0 without prefix caching).
  int AttachCachedPrefix(absl::Span<const int32_t> tokens);
  // Publishes the full blocks among the first length() positions, whose
  // tokens are the first length() of `tokens`.
  void Publish(absl::Span<const int32_t> tokens);

  // Backend state that lives and dies with this sequence. Destroyed with
  // the SequenceKv, before its blocks go back to the pool.
  std::shared_ptr<void>& attachment() { return attachment_; }

  // K or V row of one position in one layer: [Hkv * hd]. pos < reserved();
  // host storage only; key/value in an FP32 pool, key_bf16/value_bf16 (BF16
  // bits) in a BF16 one.
  float* key(int layer, int pos) const { return reinterpret_cast<float*>(Row(layer, pos, 0)); }
  float* value(int layer, int pos) const { return reinterpret_cast<float*>(Row(layer, pos, 1)); }
  uint16_t* key_bf16(int layer, int pos) const {
    return reinterpret_cast<uint16_t*>(Row(layer, pos, 0));
  }
  uint16_t* value_bf16(int layer, int pos) const {
    return reinterpret_cast<uint16_t*>(Row(layer, pos, 1));
  }

 private:
  friend class KvCachePool;
  explicit SequenceKv(KvCachePool* pool);

  char* Row(int layer, int pos, int plane) const {
    const int64_t row_bytes = static_cast<int64_t>(kv_dim_) * pool_->elem_bytes_;
    if (contiguous_) {
      const auto& rows = plane == 0 ? keys_[layer] : values_[layer];
      return const_cast<char*>(rows.data()) + pos * row_bytes;
    }
    return pool_->BlockKeys(blocks_[pos / KvCachePool::kBlockTokens], layer) +
           plane * pool_->block_plane_ * pool_->elem_bytes_ +
           (pos % KvCachePool::kBlockTokens) * row_bytes;
  }

  KvCachePool* pool_;
  int kv_dim_;
  bool contiguous_;
  int length_ = 0;
  int published_ = 0;                      // leading blocks published or attached
  uint64_t chain_hash_ = 0;                // hash of the tokens of those blocks
  std::vector<int32_t> blocks_;            // the block table
  std::vector<std::vector<char>> keys_;    // contiguous layout only: [L][S, Hkv*hd] in dtype
  std::vector<std::vector<char>> values_;  // contiguous layout only: [L][S, Hkv*hd] in dtype
  std::shared_ptr<void> attachment_;
};

// Sizing helpers for a byte budget.
//
// Parses a memory size: an integer with an optional unit B, KiB, MiB, GiB,
// TiB (powers of 1024) or KB, MB, GB, TB (powers of 1000), e.g. "2GiB",
// "512MiB", "1073741824". INVALID_ARGUMENT (naming `flag`) otherwise, or when
// it is 0 or overflows.
absl::StatusOr<int64_t> ParseByteSize(absl::string_view text, absl::string_view flag);
// MemAvailable of /proc/meminfo in bytes, or less in a cgroup with a memory
// limit (its limit minus its usage); UNAVAILABLE when it cannot be read.
absl::StatusOr<int64_t> HostMemAvailableBytes();
// The fraction of MemAvailable (measured once the weights are loaded) the
// host KV cache takes when no size is given.
inline constexpr double kDefaultHostKvMemoryFraction = 0.5;
// "1.5 GiB"-style text for logs.
std::string FormatBytes(int64_t bytes);

// Where one sequence's tokens sit in a step: rows [row_begin, row_begin + tokens)
// of the step's activations, at positions [start_pos, start_pos + tokens).
struct SequenceSlice {
  int row_begin = 0;
  int tokens = 0;
  int start_pos = 0;
  SequenceKv* kv = nullptr;  // must have reserved start_pos + tokens slots
};

}  // namespace switchyard

#endif  // SWITCHYARD_ATTENTION_SERVICE_KV_CACHE_H_
