// Choosing the next token from the model's logits.
//
// Order of operations (as vLLM and Hugging Face apply them): repetition
// penalty over prompt and output tokens, presence and frequency penalties
// over output tokens, then greedy argmax when temperature is 0; otherwise
// temperature, top-k, top-p, min-p, and a draw from a generator seeded per
// request, so the same seed repeats the same text.
//
// Thread-safety: a Sampler holds one request's random state; one thread at a
// time.
#ifndef SWITCHYARD_GATEWAY_SAMPLER_H_
#define SWITCHYARD_GATEWAY_SAMPLER_H_

#include <cstdint>
#include <optional>
#include <random>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace switchyard {

struct SamplingParams {
  float temperature = 0.0f;         // 0: greedy (default); must be >= 0 and finite
  int top_k = 0;                    // 0: off; else keep the k most likely tokens
  float top_p = 1.0f;               // in (0, 1]; 1: off
  float min_p = 0.0f;               // in [0, 1]; keep tokens with p >= min_p * p_max
  float repetition_penalty = 1.0f;  // > 0; 1: off (HF semantics)
  float presence_penalty = 0.0f;    // in [-2, 2] (OpenAI semantics)
  float frequency_penalty = 0.0f;   // in [-2, 2]
  std::optional<uint64_t> seed;     // unset: a random seed
};

// INVALID_ARGUMENT naming the first bad field.
absl::Status ValidateSamplingParams(const SamplingParams& params);

struct SampledToken {
  int32_t id = 0;
  float logprob = 0.0f;                        // log p(id) under the model's raw distribution
  std::vector<std::pair<int32_t, float>> top;  // most likely tokens with logprobs, best first
};

class Sampler {
 public:
  explicit Sampler(const SamplingParams& params);

  // prompt and output: the ids so far, for the penalties. top_logprobs: how
  // many alternatives to report (0: none).
  SampledToken Sample(absl::Span<const float> logits, absl::Span<const int32_t> prompt,
                      absl::Span<const int32_t> output, int top_logprobs = 0);

 private:
  double Uniform();  // [0, 1), the same sequence on every platform for one seed

  SamplingParams params_;
  std::mt19937_64 rng_;
};

}  // namespace switchyard

#endif  // SWITCHYARD_GATEWAY_SAMPLER_H_
