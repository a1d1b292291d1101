#include "attention_service/kv_cache.h"

#include "absl/strings/str_cat.h"

namespace switchyard {

KvCachePool::KvCachePool(const ModelConfig& config, int64_t max_tokens, bool host_storage)
    : config_(config), max_tokens_(max_tokens), host_storage_(host_storage) {}

std::unique_ptr<SequenceKv> KvCachePool::NewSequence() {
  return std::unique_ptr<SequenceKv>(new SequenceKv(this));
}

int64_t KvCachePool::bytes_per_token() const {
  return int64_t{2} * config_.num_hidden_layers * config_.kv_dim() * sizeof(float);
}

bool KvCachePool::TryAcquire(int64_t tokens) {
  int64_t used = used_tokens_.load();
  while (true) {
    if (used + tokens > max_tokens_) return false;
    if (used_tokens_.compare_exchange_weak(used, used + tokens)) return true;
  }
}

void KvCachePool::Release(int64_t tokens) { used_tokens_.fetch_sub(tokens); }

SequenceKv::SequenceKv(KvCachePool* pool)
    : pool_(pool),
      kv_dim_(pool->config().kv_dim()),
      keys_(pool->config().num_hidden_layers),
      values_(pool->config().num_hidden_layers) {
  pool_->live_sequences_.fetch_add(1);
}

SequenceKv::~SequenceKv() {
  attachment_.reset();  // device memory first, then the budget
  pool_->Release(reserved_);
  pool_->live_sequences_.fetch_sub(1);
}

absl::Status SequenceKv::Reserve(int new_length) {
  if (new_length <= reserved_) return absl::OkStatus();
  const int target = static_cast<int>(KvCachePool::SlotsFor(new_length));
  if (!pool_->TryAcquire(target - reserved_)) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV cache full: ", pool_->used_tokens(), " of ", pool_->capacity_tokens(),
                     " token slots in use, sequence needs ", target - reserved_, " more"));
  }
  if (pool_->host_storage_) {
    for (size_t l = 0; l < keys_.size(); ++l) {
      keys_[l].resize(static_cast<size_t>(target) * kv_dim_);
      values_[l].resize(static_cast<size_t>(target) * kv_dim_);
    }
  }
  reserved_ = target;
  return absl::OkStatus();
}

}  // namespace switchyard
