#include "expert_service/expert_ffn.h"

#include <algorithm>

#include "core/cpu_ops.h"
#include "core/status_macros.h"
#include "core/tensor_names.h"

namespace switchyard {

ExpertFfn::ExpertFfn(int hidden, int ffn, std::vector<float> w1, std::vector<float> w3,
                     std::vector<float> w2)
    : hidden_(hidden), ffn_(ffn), w2_(std::move(w2)) {
  const size_t block = static_cast<size_t>(ffn) * hidden;
  SY_CHECK(w1.size() == block && w3.size() == block && w2_.size() == block);
  w13_.resize(2 * block);
  std::copy(w1.begin(), w1.end(), w13_.begin());
  std::copy(w3.begin(), w3.end(), w13_.begin() + block);
}

void ExpertFfn::Forward(const float* x, int tokens, float* out) const {
  if (tokens == 0) return;
  const int64_t F = ffn_;
  thread_local std::vector<float> gate_up;  // [N, 2F]
  thread_local std::vector<float> act;      // [N, F]
  gate_up.resize(static_cast<size_t>(tokens) * 2 * F);
  act.resize(static_cast<size_t>(tokens) * F);
  cpu::Linear(x, w13_.data(), tokens, hidden_, 2 * ffn_, gate_up.data());  // [N, 2F]
  for (int t = 0; t < tokens; ++t) {
    const float* row = gate_up.data() + t * 2 * F;     // [2F]
    cpu::SwiGlu(row, row + F, F, act.data() + t * F);  // [F]
  }
  cpu::Linear(act.data(), w2_.data(), tokens, ffn_, hidden_, out);  // [N, D]
}

absl::StatusOr<std::unique_ptr<ExpertStore>> ExpertStore::Load(const Checkpoint& checkpoint) {
  auto store = std::make_unique<ExpertStore>();
  store->config_ = checkpoint.config();
  const ModelConfig& c = store->config_;
  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    for (int e = 0; e < c.num_local_experts; ++e) {
      if (!checkpoint.selection().IncludesExpert(layer, e)) continue;
      SY_ASSIGN_OR_RETURN(auto w1, checkpoint.ReadF32(names::Expert(layer, e, "w1")));
      SY_ASSIGN_OR_RETURN(auto w3, checkpoint.ReadF32(names::Expert(layer, e, "w3")));
      SY_ASSIGN_OR_RETURN(auto w2, checkpoint.ReadF32(names::Expert(layer, e, "w2")));
      store->experts_[{layer, e}] = std::make_unique<ExpertFfn>(
          c.hidden_size, c.intermediate_size, std::move(w1), std::move(w3), std::move(w2));
    }
  }
  return store;
}

const ExpertFfn* ExpertStore::Find(int layer, int expert) const {
  auto it = experts_.find({layer, expert});
  return it == experts_.end() ? nullptr : it->second.get();
}

std::vector<std::pair<int, int>> ExpertStore::Held() const {
  std::vector<std::pair<int, int>> held;
  for (const auto& [key, _] : experts_) held.push_back(key);
  return held;
}

}  // namespace switchyard
