#include "expert_service/expert_ffn.h"

#include <algorithm>
#include <string>

#include "core/cpu_ops.h"
#include "core/status_macros.h"
#include "core/tensor_names.h"

namespace switchyard {
ExpertFfn::ExpertFfn(int hidden, int ffn, std::vector<float> w1, std::vector<float> w3,
                     std::vector<float> w2)
    : ExpertFfn(hidden, ffn, cpu::Matrix::FromF32(std::move(w1), ffn, hidden),
                cpu::Matrix::FromF32(std::move(w3), ffn, hidden),
                cpu::Matrix::FromF32(std::move(w2), hidden, ffn)) {}

ExpertFfn::ExpertFfn(int hidden, int ffn, const cpu::Matrix& w1, const cpu::Matrix& w3,
                     cpu::Matrix w2)
    : hidden_(hidden), ffn_(ffn), w2_(std::move(w2)) {
  SY_CHECK(w1.rows() == ffn && w1.cols() == hidden && w3.rows() == ffn && w3.cols() == hidden);
  SY_CHECK(w2_.rows() == hidden && w2_.cols() == ffn);
  w13_ = cpu::Matrix::StackRows({&w1, &w3});  // [2F, D]
}

void ExpertFfn::Forward(const float* x, int tokens, float* out) const {
  if (tokens == 0) return;
  const int64_t F = ffn_;
  thread_local std::vector<float> gate_up;  // [N, 2F]
  thread_local std::vector<float> act;      // [N, F]
  gate_up.resize(static_cast<size_t>(tokens) * 2 * F);
  act.resize(static_cast<size_t>(tokens) * F);
  cpu::Linear(x, w13_, tokens, gate_up.data());  // [N, 2F]
  Activate(gate_up.data(), tokens, act.data());  // [N, F]
  cpu::Linear(act.data(), w2_, tokens, out);     // [N, D]
}

void ExpertFfn::Activate(const float* gate_up, int tokens, float* act) const {
  const int64_t F = ffn_;
  for (int t = 0; t < tokens; ++t) {
    const float* row = gate_up + t * 2 * F;     // [2F]
    cpu::SwiGlu(row, row + F, F, act + t * F);  // [F]
  }
}

absl::StatusOr<std::unique_ptr<ExpertStore>> ExpertStore::Load(const Checkpoint& checkpoint) {
  auto store = std::make_unique<ExpertStore>();
  store->config_ = checkpoint.config();
  const ModelConfig& c = store->config_;
  for (int layer = 0; layer < c.num_hidden_layers; ++layer) {
    for (int e = 0; e < c.num_local_experts; ++e) {
      if (!checkpoint.selection().IncludesExpert(layer, e)) continue;
      SY_ASSIGN_OR_RETURN(cpu::Matrix w1,
                          cpu::Matrix::Read(checkpoint, names::Expert(layer, e, "w1")));
      SY_ASSIGN_OR_RETURN(cpu::Matrix w3,
                          cpu::Matrix::Read(checkpoint, names::Expert(layer, e, "w3")));
      SY_ASSIGN_OR_RETURN(cpu::Matrix w2,
                          cpu::Matrix::Read(checkpoint, names::Expert(layer, e, "w2")));
      store->experts_[{layer, e}] =
          std::make_unique<ExpertFfn>(c.hidden_size, c.intermediate_size, w1, w3, std::move(w2));
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
