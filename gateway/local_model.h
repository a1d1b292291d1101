// A whole model in one process: checkpoint, tokenizer, dense model, every
// expert in-process, KV cache pool and model runner. What `switchyard
// generate --model` and the CPU benchmark use, and the baseline the split
// cluster is compared with.
//
// Thread-safety: loading is single-threaded; afterwards see each member.
#ifndef SWITCHYARD_GATEWAY_LOCAL_MODEL_H_
#define SWITCHYARD_GATEWAY_LOCAL_MODEL_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "attention_service/attention_model.h"
#include "attention_service/kv_cache.h"
#include "core/tokenizer.h"
#include "expert_service/expert_backend.h"
#include "expert_service/expert_ffn.h"
#include "gateway/model_runner.h"

namespace switchyard {

struct LocalModelOptions {
  int64_t kv_cache_tokens = 65536;  // KV cache budget in token slots
  // How the KV cache stores K/V; default DefaultHostKvDtype() (BF16 only in
  // the CPU's BF16 precision).
  std::optional<KvDtype> kv_dtype;
  bool load_tokenizer = true;  // false: a checkpoint without tokenizer files is fine
};

class LocalModel {
 public:
  static absl::StatusOr<std::unique_ptr<LocalModel>> Load(const std::string& dir,
                                                          const LocalModelOptions& options = {});

  const ModelConfig& config() const { return attention_->config(); }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  bool has_tokenizer() const { return tokenizer_ != nullptr; }
  KvCachePool& kv_pool() { return *kv_pool_; }
  ModelRunner& runner() { return *runner_; }
  const AttentionModel& attention() const { return *attention_; }
  const ExpertStore& experts() const { return *experts_; }

 private:
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<AttentionModel> attention_;
  std::unique_ptr<ExpertStore> experts_;
  std::unique_ptr<LocalExpertBackend> backend_;
  std::unique_ptr<KvCachePool> kv_pool_;
  std::unique_ptr<ModelRunner> runner_;
};

}  // namespace switchyard

#endif  // SWITCHYARD_GATEWAY_LOCAL_MODEL_H_
