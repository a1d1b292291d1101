// The key/value cache of the attention side.
//
// A KvCachePool owns a memory budget counted in token slots (one slot holds
// one position's K and V for every layer). Each sequence gets a SequenceKv
// that grows in blocks of kBlockTokens slots against that budget; Reserve
// fails with RESOURCE_EXHAUSTED when the budget is spent, and the slots go
// back to the pool when the SequenceKv is destroyed.
//
// Thread-safety: KvCachePool is thread-safe. A SequenceKv is used by one
// thread at a time (the engine step that owns it).
#ifndef SWITCHYARD_ATTENTION_SERVICE_KV_CACHE_H_
#define SWITCHYARD_ATTENTION_SERVICE_KV_CACHE_H_

#include <atomic>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "core/model_config.h"

namespace switchyard {

class SequenceKv;

class KvCachePool {
 public:
  static constexpr int kBlockTokens = 16;

  // max_tokens: the budget in token slots across all sequences.
  // host_storage: keep K/V in host memory (default). A GPU runner passes
  // false: the pool then only accounts slots, and the runner keeps the
  // tensors on the device (see SequenceKv::attachment).
  KvCachePool(const ModelConfig& config, int64_t max_tokens, bool host_storage = true);

  std::unique_ptr<SequenceKv> NewSequence();

  // Slots a sequence of `tokens` positions takes: whole blocks, so more than
  // `tokens` unless it is a multiple of kBlockTokens. Admission compares this,
  // not `tokens`, with capacity_tokens().
  static int64_t SlotsFor(int64_t tokens) {
    return (tokens + kBlockTokens - 1) / kBlockTokens * kBlockTokens;
  }

  int64_t capacity_tokens() const { return max_tokens_; }
  int64_t used_tokens() const { return used_tokens_.load(); }
  int64_t live_sequences() const { return live_sequences_.load(); }
  // Bytes one token slot takes (K and V, all layers, FP32).
  int64_t bytes_per_token() const;
  const ModelConfig& config() const { return config_; }

 private:
  friend class SequenceKv;
  bool TryAcquire(int64_t tokens);
  void Release(int64_t tokens);

  ModelConfig config_;
  int64_t max_tokens_;
  bool host_storage_;
  std::atomic<int64_t> used_tokens_{0};
  std::atomic<int64_t> live_sequences_{0};
};

class SequenceKv {
 public:
  ~SequenceKv();
  SequenceKv(const SequenceKv&) = delete;
  SequenceKv& operator=(const SequenceKv&) = delete;

  // Positions already written and committed.
  int length() const { return length_; }
  // Slots reserved from the pool (a multiple of kBlockTokens).
  int reserved() const { return reserved_; }

  // Makes room for positions [0, new_length). RESOURCE_EXHAUSTED if the pool's
  // budget cannot cover it (nothing changes then).
  absl::Status Reserve(int new_length);
  // Marks `n` more positions as written.
  void Commit(int n) { length_ += n; }
  // Forgets positions from `new_length` on (their slots stay reserved).
  void Truncate(int new_length) { length_ = new_length < length_ ? new_length : length_; }

  // Backend state that lives and dies with this sequence (a GPU runner's
  // device K/V). Destroyed with the SequenceKv, so freeing a sequence frees
  // its device memory too.
  std::shared_ptr<void>& attachment() { return attachment_; }

  // K or V row of one position in one layer: [Hkv * hd]. pos < reserved().
  float* key(int layer, int pos) {
    return keys_[layer].data() + static_cast<int64_t>(pos) * kv_dim_;
  }
  float* value(int layer, int pos) {
    return values_[layer].data() + static_cast<int64_t>(pos) * kv_dim_;
  }
  const float* key(int layer, int pos) const {
    return keys_[layer].data() + static_cast<int64_t>(pos) * kv_dim_;
  }
  const float* value(int layer, int pos) const {
    return values_[layer].data() + static_cast<int64_t>(pos) * kv_dim_;
  }

 private:
  friend class KvCachePool;
  explicit SequenceKv(KvCachePool* pool);

  KvCachePool* pool_;
  int kv_dim_;
  int length_ = 0;
  int reserved_ = 0;
  std::vector<std::vector<float>> keys_;    // [L][S, Hkv*hd]
  std::vector<std::vector<float>> values_;  // [L][S, Hkv*hd]
  std::shared_ptr<void> attachment_;
};

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
