// Generating a continuation for one prompt with a StepRunner: prefill, then
// one token per step until a stop condition. The scheduler (services issue)
// interleaves many of these; this single-sequence loop is the reference it
// must agree with and what `switchyard generate --model` runs.
//
// Thread-safety: Generate is thread-compatible (one runner per call).
#ifndef SWITCHYARD_GATEWAY_GENERATE_H_
#define SWITCHYARD_GATEWAY_GENERATE_H_

#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "attention_service/kv_cache.h"
#include "core/tokenizer.h"
#include "gateway/sampler.h"
#include "gateway/step_runner.h"

namespace switchyard {

enum class FinishReason { kLength, kEos, kStopSequence, kCancelled };
// "length", "eos", "stop", "cancelled".
std::string_view FinishReasonName(FinishReason reason);

struct GenerateOptions {
  int max_new_tokens = 16;              // >= 1
  SamplingParams sampling;              // default: greedy
  std::vector<int32_t> stop_token_ids;  // generation ends after emitting one (not in text)
  bool ignore_eos = false;              // default: EOS ends generation
};

struct GenerateResult {
  std::vector<int32_t> prompt_ids;
  std::vector<int32_t> token_ids;  // generated tokens, including a final EOS/stop token
  std::string text;                // decoded generated text, without EOS/stop tokens
  FinishReason finish_reason = FinishReason::kLength;
};

// `on_text` (optional) receives each valid-UTF-8 text delta as it is decoded.
// Bad options or a prompt over the context are INVALID_ARGUMENT; a pool that
// cannot hold prompt + max_new_tokens slots is RESOURCE_EXHAUSTED before any
// step (the slots are reserved up front, as the scheduler does).
absl::StatusOr<GenerateResult> Generate(StepRunner& runner, KvCachePool& pool,
                                        const Tokenizer& tokenizer,
                                        absl::Span<const int32_t> prompt_ids,
                                        const GenerateOptions& options,
                                        const std::function<void(std::string_view)>& on_text = {});

}  // namespace switchyard

#endif  // SWITCHYARD_GATEWAY_GENERATE_H_
