#include "gateway/generate.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"

namespace switchyard {

std::string_view FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kLength:
      return "length";
    case FinishReason::kEos:
      return "eos";
    case FinishReason::kStopSequence:
      return "stop";
    case FinishReason::kCancelled:
      return "cancelled";
  }
  return "unknown";
}

absl::StatusOr<GenerateResult> Generate(StepRunner& runner, KvCachePool& pool,
                                        const Tokenizer& tokenizer,
                                        absl::Span<const int32_t> prompt_ids,
                                        const GenerateOptions& options,
                                        const std::function<void(std::string_view)>& on_text) {
  if (prompt_ids.empty()) return absl::InvalidArgumentError("prompt is empty");
  if (options.max_new_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_new_tokens must be >= 1, got ", options.max_new_tokens));
  }
  SY_RETURN_IF_ERROR(ValidateSamplingParams(options.sampling));
  const int context = runner.config().max_position_embeddings;
  if (static_cast<int64_t>(prompt_ids.size()) + options.max_new_tokens > context) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt (", prompt_ids.size(), " tokens) plus max_new_tokens (",
                     options.max_new_tokens, ") exceeds the context of ", context, " tokens"));
  }

  GenerateResult result;
  result.prompt_ids.assign(prompt_ids.begin(), prompt_ids.end());
  Sampler sampler(options.sampling);
  std::unique_ptr<SequenceKv> kv = pool.NewSequence();
  // The worst case up front, as the scheduler does: the cache is sized once
  // (one device allocation on a GPU, not one per block of 16 tokens) and a
  // pool too small fails here rather than halfway through.
  SY_RETURN_IF_ERROR(kv->Reserve(static_cast<int>(prompt_ids.size()) + options.max_new_tokens));
  IncrementalDecoder decoder(&tokenizer, result.prompt_ids);
  auto emit = [&](std::string_view delta) {
    if (delta.empty()) return;
    result.text.append(delta);
    if (on_text) on_text(delta);
  };

  std::vector<int32_t> feed = result.prompt_ids;
  while (true) {
    StepInput input{kv.get(), feed, LogitsWanted::kLast};
    SY_ASSIGN_OR_RETURN(StepOutput step, runner.Step({&input, 1}));
    if (!step.ok(0)) return step.sequence_status[0];
    const int V = runner.config().vocab_size;
    SampledToken next = sampler.Sample(absl::MakeConstSpan(step.logits.data(), V),
                                       result.prompt_ids, result.token_ids);
    result.token_ids.push_back(next.id);
    const bool is_eos = !options.ignore_eos && next.id == tokenizer.eos_id();
    const bool is_stop = std::find(options.stop_token_ids.begin(), options.stop_token_ids.end(),
                                   next.id) != options.stop_token_ids.end();
    if (is_eos || is_stop) {
      result.finish_reason = is_eos ? FinishReason::kEos : FinishReason::kStopSequence;
      break;
    }
    SY_ASSIGN_OR_RETURN(std::string delta, decoder.Push(next.id));
    emit(delta);
    if (static_cast<int>(result.token_ids.size()) >= options.max_new_tokens) {
      result.finish_reason = FinishReason::kLength;
      break;
    }
    feed.assign(1, next.id);
  }
  emit(decoder.Finish());
  return result;
}

}  // namespace switchyard
