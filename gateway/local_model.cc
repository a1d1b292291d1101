#include "gateway/local_model.h"

#include "core/checkpoint.h"
#include "core/status_macros.h"

namespace switchyard {

absl::StatusOr<std::unique_ptr<LocalModel>> LocalModel::Load(const std::string& dir,
                                                             const LocalModelOptions& options) {
  auto m = std::unique_ptr<LocalModel>(new LocalModel());
  SY_ASSIGN_OR_RETURN(auto checkpoint, Checkpoint::Open(dir, WeightSelection::All()));
  if (options.load_tokenizer) {
    SY_ASSIGN_OR_RETURN(m->tokenizer_, Tokenizer::FromDir(dir));
  }
  SY_ASSIGN_OR_RETURN(m->attention_, AttentionModel::Load(*checkpoint));
  SY_ASSIGN_OR_RETURN(m->experts_, ExpertStore::Load(*checkpoint));
  m->backend_ = std::make_unique<LocalExpertBackend>(m->experts_.get());
  m->kv_pool_ = std::make_unique<KvCachePool>(checkpoint->config(), options.kv_cache_tokens,
                                              /*host_storage=*/true, KvLayout::kPaged,
                                              options.kv_dtype.value_or(DefaultHostKvDtype()));
  m->runner_ = std::make_unique<ModelRunner>(m->attention_.get(), m->backend_.get());
  return m;
}

}  // namespace switchyard
