#include "gateway/step_runner.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
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

}  // namespace switchyard
