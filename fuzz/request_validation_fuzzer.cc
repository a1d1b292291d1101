// libFuzzer target for the Generation API's request validation
// (gateway/request_validation.h): arbitrary bytes parsed as a
// switchyard.v1.GenerateRequest, validated against the tiny-mixtral fixture's
// tokenizer and config, under the default limits and under tight ones. A
// request it rejects must get INVALID_ARGUMENT; a request it accepts must be
// one the scheduler can run: prompt ids inside the vocabulary, max_new_tokens
// within the limit, prompt + max_new_tokens within the context, and every
// other field inside its documented range.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "core/chat_template.h"
#include "core/model_config.h"
#include "core/tokenizer.h"
#include "core/utf8.h"
#include "fuzz/fuzz_check.h"
#include "fuzz/tiny_mixtral_env.h"
#include "gateway/request_validation.h"
#include "gateway/sampler.h"
#include "switchyard/v1/generation.pb.h"

namespace {

using switchyard::GenerationRequest;
using switchyard::RequestLimits;

using Env = switchyard::fuzz::TinyMixtralEnv;

// Validates `req` with the chat template or without one: bad input is
// INVALID_ARGUMENT, and only a `messages` prompt without a template is
// FAILED_PRECONDITION (the gateway cannot serve that form at all).
void Check(const switchyard::v1::GenerateRequest& req, const RequestLimits& limits,
           bool with_template) {
  const Env& env = switchyard::fuzz::GetTinyMixtralEnv();
  const int V = env.config.vocab_size;
  absl::StatusOr<GenerationRequest> r = switchyard::ValidateGenerateRequest(
      req, *env.tokenizer, env.config, limits, with_template ? env.chat_template.get() : nullptr);
  if (!r.ok()) {
    const bool no_template_for_messages =
        !with_template && req.messages_size() > 0 &&
        r.status().code() == absl::StatusCode::kFailedPrecondition;
    FUZZ_CHECK(r.status().code() == absl::StatusCode::kInvalidArgument || no_template_for_messages,
               "rejected with %s", r.status().ToString().c_str());
    return;
  }
  const GenerationRequest& g = *r;

  // The prompt.
  FUZZ_CHECK(!g.prompt_ids.empty(), "accepted an empty prompt");
  for (int32_t id : g.prompt_ids) {
    FUZZ_CHECK(id >= 0 && id < V && id < env.tokenizer->vocab_size(),
               "prompt id %d outside the vocabulary (%d)", id, V);
  }
  if (req.prompt_case() == switchyard::v1::GenerateRequest::kText) {
    FUZZ_CHECK(static_cast<int64_t>(req.text().size()) <= limits.max_prompt_bytes,
               "accepted a %zu-byte prompt", req.text().size());
    FUZZ_CHECK(switchyard::IsValidUtf8(req.text()), "accepted a non-UTF-8 prompt");
    FUZZ_CHECK(g.prompt_ids == env.tokenizer->Encode(req.text()), "prompt ids != Encode(text)");
  } else {
    FUZZ_CHECK(req.prompt_case() == switchyard::v1::GenerateRequest::kTokenIds,
               "accepted a request without a prompt");
    FUZZ_CHECK(
        g.prompt_ids.size() == static_cast<size_t>(req.token_ids().ids_size()) &&
            std::equal(g.prompt_ids.begin(), g.prompt_ids.end(), req.token_ids().ids().begin()),
        "prompt ids != token_ids");
  }

  // Length.
  const int max_new = g.options.max_new_tokens;
  const int max_new_limit = switchyard::EffectiveMaxNewTokensLimit(limits, env.config);
  FUZZ_CHECK(max_new >= 1 && max_new <= max_new_limit, "max_new_tokens %d outside [1, %d]", max_new,
             max_new_limit);
  if (req.stopping().has_max_new_tokens()) {
    FUZZ_CHECK(static_cast<uint32_t>(max_new) == req.stopping().max_new_tokens(),
               "max_new_tokens %d != requested %u", max_new, req.stopping().max_new_tokens());
  } else {
    FUZZ_CHECK(max_new == limits.default_max_new_tokens, "max_new_tokens %d != default %d", max_new,
               limits.default_max_new_tokens);
  }
  FUZZ_CHECK(
      static_cast<int64_t>(g.prompt_ids.size()) + max_new <= env.config.max_position_embeddings,
      "prompt %zu + max_new_tokens %d > context %d", g.prompt_ids.size(), max_new,
      env.config.max_position_embeddings);

  // Stopping.
  FUZZ_CHECK(static_cast<int>(g.stop.size()) <= limits.max_stop_strings, "%zu stop strings",
             g.stop.size());
  FUZZ_CHECK(static_cast<int>(g.stop.size()) == req.stopping().stop_size(), "stop strings dropped");
  for (const std::string& s : g.stop) {
    FUZZ_CHECK(!s.empty() && static_cast<int>(s.size()) <= limits.max_stop_string_bytes &&
                   switchyard::IsValidUtf8(s),
               "bad stop string accepted");
  }
  FUZZ_CHECK(
      static_cast<int>(g.options.stop_token_ids.size()) == req.stopping().stop_token_ids_size(),
      "stop token ids dropped");
  FUZZ_CHECK(static_cast<int>(g.options.stop_token_ids.size()) <= limits.max_stop_token_ids,
             "%zu stop token ids", g.options.stop_token_ids.size());
  for (int32_t id : g.options.stop_token_ids) {
    FUZZ_CHECK(id >= 0 && id < V, "stop token id %d outside the vocabulary", id);
  }
  FUZZ_CHECK(g.options.ignore_eos == req.stopping().ignore_eos(), "ignore_eos changed");

  // Sampling.
  const switchyard::SamplingParams& p = g.options.sampling;
  absl::Status sampling = switchyard::ValidateSamplingParams(p);
  FUZZ_CHECK(sampling.ok(), "accepted sampling parameters that fail validation: %s",
             sampling.ToString().c_str());
  FUZZ_CHECK(p.repetition_penalty <= 10.0f, "repetition_penalty %g", p.repetition_penalty);
  FUZZ_CHECK(req.sampling().has_seed() == p.seed.has_value() &&
                 (!p.seed.has_value() || *p.seed == req.sampling().seed()),
             "seed changed");

  // Logprobs.
  FUZZ_CHECK(g.top_logprobs >= 0 && g.top_logprobs <= limits.max_top_logprobs, "top_logprobs %d",
             g.top_logprobs);
  FUZZ_CHECK(g.top_logprobs == 0 || g.return_logprobs, "top_logprobs without return_logprobs");
  FUZZ_CHECK(g.request_id == req.request_id(), "request_id changed");
  FUZZ_CHECK(static_cast<int>(g.request_id.size()) <= limits.max_request_id_bytes,
             "request_id of %zu bytes", g.request_id.size());
  for (unsigned char c : g.request_id) {
    FUZZ_CHECK(c >= 0x20 && c <= 0x7e, "request_id byte 0x%02x is not printable", c);
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  switchyard::fuzz::SilenceProtobufLogs();
  switchyard::fuzz::GetTinyMixtralEnv();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  switchyard::v1::GenerateRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;

  for (bool with_template : {false, true}) Check(request, RequestLimits{}, with_template);
  RequestLimits tight;
  tight.default_max_new_tokens = 8;
  tight.max_new_tokens_limit = 64;
  tight.max_prompt_bytes = 32;
  tight.max_stop_strings = 2;
  tight.max_stop_string_bytes = 4;
  tight.max_top_logprobs = 2;
  tight.max_stop_token_ids = 3;
  tight.max_request_id_bytes = 4;
  tight.max_messages = 2;
  for (bool with_template : {false, true}) Check(request, tight, with_template);
  return 0;
}
