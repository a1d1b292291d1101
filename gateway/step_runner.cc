#include "gateway/step_runner.h"

#include <algorithm>
#include <limits>

#include "absl/strings/str_cat.h"
#include "core/cpu_ops.h"
#include "core/status_macros.h"

namespace switchyard {

absl::StatusOr<StepLayout> PrepareStep(const ModelConfig& c, absl::Span<const StepInput> inputs) {
  StepLayout layout;
  const int V = c.vocab_size;
  for (size_t b = 0; b < inputs.size(); ++b) {
    const StepInput& in = inputs[b];
    if (in.kv == nullptr || in.tokens.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("step input ", b, " has no tokens"));
    }
    for (int32_t id : in.tokens) {
      if (id < 0 || id >= V) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", id, " is outside the vocabulary [0, ", V, ")"));
      }
    }
    const int n = static_cast<int>(in.tokens.size());
    const int start = in.kv->length();
    if (start + n > c.max_position_embeddings) {
      return absl::InvalidArgumentError(absl::StrCat("sequence length ", start + n,
                                                     " exceeds the model's context of ",
                                                     c.max_position_embeddings, " tokens"));
    }
    layout.slices.push_back({layout.tokens, n, start, in.kv});
    int first = 0, count = 0;
    if (in.logits == LogitsWanted::kAll) {
      first = layout.tokens, count = n;
    } else if (in.logits == LogitsWanted::kLast) {
      first = layout.tokens + n - 1, count = 1;
    }
    layout.logits_row_begin.push_back(count > 0 ? static_cast<int>(layout.logit_rows.size()) : -1);
    for (int i = 0; i < count; ++i) layout.logit_rows.push_back(first + i);
    layout.tokens += n;
  }
  for (const SequenceSlice& s : layout.slices) {
    SY_RETURN_IF_ERROR(s.kv->Reserve(s.start_pos + s.tokens));
  }
  layout.ids.resize(layout.tokens);
  layout.positions.resize(layout.tokens);
  for (size_t b = 0; b < inputs.size(); ++b) {
    const SequenceSlice& s = layout.slices[b];
    std::copy(inputs[b].tokens.begin(), inputs[b].tokens.end(), layout.ids.begin() + s.row_begin);
    for (int i = 0; i < s.tokens; ++i) layout.positions[s.row_begin + i] = s.start_pos + i;
  }
  return layout;
}

static_assert(kMaxMicroBatchedStepTokens <= cpu::kSkinnyMaxTokens,
              "a split step must stay on the row-invariant CPU kernels");

int MaxSplitStepTokens(bool rows_independent_of_count) {
  return rows_independent_of_count ? std::numeric_limits<int>::max() : kMaxMicroBatchedStepTokens;
}

std::vector<int> SplitIntoMicroBatches(absl::Span<const SequenceSlice> slices, int tokens,
                                       int max_micro_batches, int max_split_tokens) {
  const int sequences = static_cast<int>(slices.size());
  int m = std::max(1, std::min(max_micro_batches, sequences));
  if (tokens > max_split_tokens) m = 1;
  std::vector<int> bounds = {0};
  int64_t done = 0;  // tokens of the sequences before the candidate cut
  for (int b = 0; b + 1 < sequences && static_cast<int>(bounds.size()) < m; ++b) {
    done += slices[b].tokens;
    const int next = static_cast<int>(bounds.size());  // the cut being placed
    const int left = sequences - (b + 1);              // sequences after the cut
    // Cut once this micro-batch has its share of the tokens, or when every
    // later micro-batch needs one of the remaining sequences.
    if (done * m >= static_cast<int64_t>(tokens) * next || left == m - next) {
      bounds.push_back(b + 1);
    }
  }
  bounds.push_back(sequences);
  return bounds;
}

int ResolveMicroBatches(int flag_value, bool experts_off_host) {
  if (flag_value > 0) return flag_value;
  return experts_off_host ? 2 : 1;
}

std::vector<absl::Status> SequencesOfFailedBatches(const MoeDispatch& plan,
                                                   absl::Span<const ExpertBatch> batches,
                                                   absl::Span<const absl::Status> batch_status,
                                                   absl::Span<const SequenceSlice> slices) {
  std::vector<absl::Status> status(slices.size());
  // The input of each row of the step.
  std::vector<int> input_of_token(plan.tokens, -1);
  for (size_t i = 0; i < slices.size(); ++i) {
    for (int t = 0; t < slices[i].tokens; ++t) {
      input_of_token[slices[i].row_begin + t] = static_cast<int>(i);
    }
  }
  for (size_t b = 0; b < batches.size() && b < batch_status.size(); ++b) {
    if (batch_status[b].ok()) continue;
    const int e = batches[b].expert;
    for (int row = plan.offset[e]; row < plan.offset[e + 1]; ++row) {
      const int input = input_of_token[plan.gather[row]];
      if (input >= 0 && status[input].ok()) status[input] = batch_status[b];
    }
  }
  return status;
}

absl::StatusOr<StepOutput> RunStepContainingExpertFailures(absl::Span<const StepInput> inputs,
                                                           const StepAttempt& attempt) {
  std::vector<absl::Status> status(inputs.size());
  std::vector<size_t> live(inputs.size());  // indices into inputs still in the step
  for (size_t i = 0; i < inputs.size(); ++i) live[i] = i;
  int64_t expert_tokens = 0;  // sent by every attempt
  bool any_failed = false;
  while (true) {
    std::vector<StepInput> live_inputs;
    for (size_t i : live) live_inputs.push_back(inputs[i]);
    SY_ASSIGN_OR_RETURN(StepOutput out, attempt(live_inputs));
    expert_tokens += out.expert_tokens;
    std::vector<size_t> survivors;
    for (size_t j = 0; j < live.size(); ++j) {
      if (out.ok(j)) {
        survivors.push_back(live[j]);
      } else {
        status[live[j]] = out.sequence_status[j];
      }
    }
    if (survivors.size() == live.size()) {
      // This attempt committed every sequence in it: map its rows back.
      StepOutput result;
      result.logits = std::move(out.logits);
      result.logits_row_begin.assign(inputs.size(), -1);
      for (size_t j = 0; j < live.size(); ++j) {
        result.logits_row_begin[live[j]] = out.logits_row_begin[j];
      }
      result.expert_tokens = expert_tokens;
      if (any_failed) result.sequence_status = std::move(status);
      return result;
    }
    // A failed attempt commits nothing; run the step again without the failed ones.
    any_failed = true;
    live = std::move(survivors);
    if (live.empty()) {
      StepOutput result;
      result.logits_row_begin.assign(inputs.size(), -1);
      result.expert_tokens = expert_tokens;
      result.sequence_status = std::move(status);
      return result;
    }
  }
}

}  // namespace switchyard
