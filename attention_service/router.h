// Top-k expert routing (Mixtral's sparse gate).
//
// Legend: T tokens, E experts, K experts per token.
// probs = softmax(router_logits) over all E experts, keep the top K, and
// renormalise them to sum to one (equal to a softmax over the top-K logits).
#ifndef SWITCHYARD_ATTENTION_SERVICE_ROUTER_H_
#define SWITCHYARD_ATTENTION_SERVICE_ROUTER_H_

#include <cstdint>
#include <vector>

namespace switchyard {

struct Routing {
  int tokens = 0;
  int top_k = 0;
  std::vector<int32_t> experts;  // [T, K], best first
  std::vector<float> weights;    // [T, K], each row sums to 1
};

// router_logits: [T, E]. Ties go to the lower expert index.
Routing RouteTopK(const float* router_logits, int tokens, int num_experts, int top_k);

}  // namespace switchyard

#endif  // SWITCHYARD_ATTENTION_SERVICE_ROUTER_H_
