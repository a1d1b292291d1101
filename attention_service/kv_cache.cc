#include "attention_service/kv_cache.h"

#include "absl/strings/str_cat.h"

namespace switchyard {

KvCachePool::KvCachePool(const ModelConfig& config, int64_t max_tokens, bool host_storage,
                         KvLayout layout)
    : config_(config),
      max_tokens_(max_tokens),
      host_storage_(host_storage),
      layout_(layout),
      layers_(config.num_hidden_layers),
      block_plane_(static_cast<int64_t>(kBlockTokens) * config.kv_dim()),
      total_blocks_(max_tokens / kBlockTokens) {
  if (host_storage_ && layout_ == KvLayout::kPaged) {
    slab_.reset(new float[static_cast<size_t>(total_blocks_) * layers_ * 2 * block_plane_]);
  }
  // Popped from the back: the lowest blocks go first.
  free_.reserve(total_blocks_);
  for (int64_t b = total_blocks_ - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
}

std::unique_ptr<SequenceKv> KvCachePool::NewSequence() {
  return std::unique_ptr<SequenceKv>(new SequenceKv(this));
}

int64_t KvCachePool::bytes_per_token() const {
  return int64_t{2} * config_.num_hidden_layers * config_.kv_dim() * sizeof(float);
}

bool KvCachePool::TryAcquire(int n, std::vector<int32_t>* table) {
  std::lock_guard<std::mutex> lock(mu_);
  if (static_cast<int64_t>(free_.size()) < n) return false;
  table->insert(table->end(), free_.end() - n, free_.end());
  free_.resize(free_.size() - n);
  used_blocks_.fetch_add(n);
  return true;
}

void KvCachePool::Release(const std::vector<int32_t>& blocks) {
  std::lock_guard<std::mutex> lock(mu_);
  free_.insert(free_.end(), blocks.rbegin(), blocks.rend());
  used_blocks_.fetch_sub(static_cast<int64_t>(blocks.size()));
}

SequenceKv::SequenceKv(KvCachePool* pool)
    : pool_(pool),
      kv_dim_(pool->config().kv_dim()),
      contiguous_(pool->host_storage_ && pool->layout_ == KvLayout::kContiguous) {
  if (contiguous_) {
    keys_.resize(pool->config().num_hidden_layers);
    values_.resize(pool->config().num_hidden_layers);
  }
  pool_->live_sequences_.fetch_add(1);
}

SequenceKv::~SequenceKv() {
  attachment_.reset();  // device memory first, then the blocks
  pool_->Release(blocks_);
  pool_->live_sequences_.fetch_sub(1);
}

absl::Status SequenceKv::Reserve(int new_length) {
  const int have = static_cast<int>(blocks_.size());
  const int want = static_cast<int>(KvCachePool::SlotsFor(new_length) / KvCachePool::kBlockTokens);
  if (want <= have) return absl::OkStatus();
  if (!pool_->TryAcquire(want - have, &blocks_)) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV cache full: ", pool_->used_tokens(), " of ", pool_->capacity_tokens(),
                     " token slots in use, sequence needs ",
                     (want - have) * KvCachePool::kBlockTokens, " more"));
  }
  if (contiguous_) {
    const size_t rows = static_cast<size_t>(reserved()) * kv_dim_;
    for (size_t l = 0; l < keys_.size(); ++l) {
      keys_[l].resize(rows);
      values_[l].resize(rows);
    }
  }
  return absl::OkStatus();
}

}  // namespace switchyard
