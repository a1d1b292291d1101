// One expert's SwiGLU feed-forward network and the set of experts a process
// holds.
//
// Legend: N tokens routed to this expert, D hidden, F expert ffn.
// An expert computes  y = w2 · (silu(w1 · x) ⊙ (w3 · x)).
#ifndef SWITCHYARD_EXPERT_SERVICE_EXPERT_FFN_H_
#define SWITCHYARD_EXPERT_SERVICE_EXPERT_FFN_H_

#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "core/checkpoint.h"
#include "core/cpu_ops.h"
#include "core/model_config.h"

namespace switchyard {

// The weights of one (layer, expert), FP32 or BF16 (as stored; the math is
// FP32 either way, see core/cpu_ops.h). Immutable after construction;
// Forward is thread-safe.
class ExpertFfn {
 public:
  // w1, w3: [F, D] (gate and up projections); w2: [D, F] (down projection).
  ExpertFfn(int hidden, int ffn, std::vector<float> w1, std::vector<float> w3,
            std::vector<float> w2);
  // The same from matrices of either dtype (w13 is BF16 when w1 and w3 are).
  ExpertFfn(int hidden, int ffn, const cpu::Matrix& w1, const cpu::Matrix& w3, cpu::Matrix w2);

  int hidden() const { return hidden_; }
  int ffn() const { return ffn_; }
  // Both products are on BF16 matrices.
  bool bf16_weights() const { return w13_.is_bf16() && w2_.is_bf16(); }

  // out[N, D] = expert(x[N, D]). N may be 0.
  void Forward(const float* x, int tokens, float* out) const;

  // Forward's steps, for a caller that spreads several experts' products
  // over one team (LocalExpertBackend::RunLayer), bitwise the same:
  // gate_up[N, 2F] = x · w13^T; Activate(gate_up) -> act[N, F];
  // out[N, D] = act · w2^T.
  const cpu::Matrix& w13() const { return w13_; }  // [2F, D]
  const cpu::Matrix& w2() const { return w2_; }    // [D, F]
  void Activate(const float* gate_up, int tokens, float* act) const;

 private:
  int hidden_;
  int ffn_;
  cpu::Matrix w13_;  // [2F, D]: w1 rows then w3 rows, one GEMM for both
  cpu::Matrix w2_;   // [D, F]
};

// The experts one process holds, keyed by (layer, expert). Immutable after
// Load; all methods are thread-safe.
class ExpertStore {
 public:
  // Loads every (layer, expert) that `checkpoint`'s selection includes.
  static absl::StatusOr<std::unique_ptr<ExpertStore>> Load(const Checkpoint& checkpoint);

  const ModelConfig& config() const { return config_; }
  // nullptr when this store does not hold (layer, expert).
  const ExpertFfn* Find(int layer, int expert) const;
  // Held (layer, expert) pairs, sorted.
  std::vector<std::pair<int, int>> Held() const;

 private:
  ModelConfig config_;
  std::map<std::pair<int, int>, std::unique_ptr<ExpertFfn>> experts_;
};

}  // namespace switchyard

#endif  // SWITCHYARD_EXPERT_SERVICE_EXPERT_FFN_H_
