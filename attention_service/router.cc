#include "attention_service/router.h"

#include <algorithm>
#include <numeric>

#include "core/cpu_ops.h"

namespace switchyard {

Routing RouteTopK(const float* router_logits, int tokens, int num_experts, int top_k) {
  Routing r;
  r.tokens = tokens;
  r.top_k = top_k;
  r.experts.resize(static_cast<size_t>(tokens) * top_k);
  r.weights.resize(static_cast<size_t>(tokens) * top_k);
  std::vector<float> probs(num_experts);  // [E]
  std::vector<int> order(num_experts);    // [E]
  for (int t = 0; t < tokens; ++t) {
    std::copy_n(router_logits + static_cast<int64_t>(t) * num_experts, num_experts, probs.begin());
    cpu::SoftmaxInPlace(probs.data(), num_experts);
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + top_k, order.end(), [&](int a, int b) {
      return probs[a] > probs[b] || (probs[a] == probs[b] && a < b);
    });
    float sum = 0.0f;
    for (int k = 0; k < top_k; ++k) sum += probs[order[k]];
    for (int k = 0; k < top_k; ++k) {
      r.experts[t * top_k + k] = order[k];
      r.weights[t * top_k + k] = probs[order[k]] / sum;
    }
  }
  return r;
}

}  // namespace switchyard
