// The MoE dispatch plan of one layer: which rows go to which expert, and how
// the expert outputs come back. Shared by every StepRunner (the CPU runner
// and the CUDA runner build the same plan, so their batches and their
// summation order are the same), and by the CPU oracle of the CUDA gather
// and combine kernels.
//
//   grouped row i  = x[gather[i]]                       (token order within an expert)
//   expert e rows  = [offset[e], offset[e + 1])
//   h[t]          += Σ_k combine_weights[t, k] · out[combine_rows[t, k]]
//                    with token t's experts in expert-index order, summed
//                    from zero before h is added to (as the reference sums them)
//
// Legend: T tokens, K experts per token, E experts, D hidden.
//
// Thread-safety: a plan is an immutable value once built.
#ifndef SWITCHYARD_GATEWAY_MOE_DISPATCH_H_
#define SWITCHYARD_GATEWAY_MOE_DISPATCH_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "expert_service/expert_backend.h"

namespace switchyard {

struct MoeDispatch {
  int tokens = 0;                      // T
  int top_k = 0;                       // K
  int num_experts = 0;                 // E
  std::vector<int> offset;             // [E + 1]
  std::vector<int32_t> gather;         // [T K]: the token of each grouped row
  std::vector<int32_t> combine_rows;   // [T, K]: token t's grouped rows, expert-index order
  std::vector<float> combine_weights;  // [T, K]: their router weights

  int rows(int expert) const { return offset[expert + 1] - offset[expert]; }
  int total_rows() const { return tokens * top_k; }
};

// Builds the plan from the router's choice: experts and weights [T, K].
// INTERNAL when a chosen expert is outside [0, E) (a router bug, not input).
absl::StatusOr<MoeDispatch> PlanMoeDispatch(absl::Span<const int32_t> experts,
                                            absl::Span<const float> weights, int tokens, int top_k,
                                            int num_experts);

// grouped[T K, D] = x[gather[i], D] (CPU).
void GatherExpertRows(const MoeDispatch& plan, const float* x, int dim, float* grouped);

// One ExpertBatch per expert with rows, pointing into grouped in/out [T K, D].
std::vector<ExpertBatch> ExpertBatches(const MoeDispatch& plan, const float* grouped_in,
                                       float* grouped_out, int dim);

// h[T, D] += Σ_k w[t, k] · out[combine_rows[t, k]] (CPU).
void CombineExpertRows(const MoeDispatch& plan, const float* grouped_out, int dim, float* h);

}  // namespace switchyard

#endif  // SWITCHYARD_GATEWAY_MOE_DISPATCH_H_
