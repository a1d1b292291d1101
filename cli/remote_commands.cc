// `switchyard generate --server` and `switchyard tokenize --server`: clients
// of a running gateway's GenerationService (protos/switchyard/v1/generation.proto).
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "cli/command_specs.h"
#include "cli/commands.h"
#include "cli/grpc_client.h"
#include "cli/messages_flag.h"
#include "core/flags.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"
#include "switchyard/v1/generation.grpc.pb.h"

namespace switchyard::cli {
namespace {

int Fail(const absl::Status& status, const char* command) {
  std::fprintf(stderr, "switchyard %s: %s\n", command, StatusLine(status).c_str());
  return 1;
}

// Flags that do not go together: one line and the usage hint, exit 2, as
// for unknown flags.
int UsageError(absl::string_view message, const char* command) {
  std::fprintf(stderr, "switchyard %s: %.*s\nsee switchyard %s --help\n", command,
               static_cast<int>(message.size()), message.data(), command);
  return 2;
}

// Exactly one prompt form: --prompt, --token-ids or --messages.
absl::Status CheckPromptForm(const Flags& f) {
  const int forms = f.Has("prompt") + f.Has("token-ids") + f.Has("messages");
  if (forms != 1) {
    return absl::InvalidArgumentError(
        "give exactly one of --prompt TEXT, --token-ids 1,2,3 or --messages JSON_OR_@FILE");
  }
  return absl::OkStatus();
}

// A boolean flag: absent -> `fallback`; `--name` or `--name=true|1|yes` ->
// true; `--name=false|0|no` -> false.
absl::StatusOr<bool> BoolFlag(const Flags& f, const std::string& name, bool fallback) {
  auto v = f.Get(name);
  if (!v) return fallback;
  if (*v == "true" || *v == "1" || *v == "yes") return true;
  if (*v == "false" || *v == "0" || *v == "no") return false;
  return absl::InvalidArgumentError(
      absl::StrCat("--", name, " takes no value or true|false, got '", *v, "'"));
}

// Comma-separated int32 lists from every occurrence of `name`.
absl::StatusOr<std::vector<int32_t>> IntListFlag(const Flags& f, const std::string& name) {
  std::vector<int32_t> out;
  for (const std::string& value : f.GetAll(name)) {
    for (absl::string_view part : absl::StrSplit(value, ',', absl::SkipEmpty())) {
      int32_t id;
      if (!absl::SimpleAtoi(part, &id)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--", name, ": bad token id '", std::string(part), "'"));
      }
      out.push_back(id);
    }
  }
  return out;
}

// What the user asked for, beyond the request itself.
struct GenerateCall {
  v1::GenerateRequest request;
  std::string server;
  int64_t timeout_ms = 0;
  bool json = false;
  bool stream = true;
};

absl::StatusOr<GenerateCall> ParseGenerateCall(const Flags& f) {
  GenerateCall call;
  SY_ASSIGN_OR_RETURN(call.server, f.Required("server"));
  v1::GenerateRequest& r = call.request;

  SY_RETURN_IF_ERROR(CheckPromptForm(f));
  if (f.Has("prompt")) {
    r.set_text(*f.Get("prompt"));
  } else if (f.Has("token-ids")) {
    SY_ASSIGN_OR_RETURN(std::vector<int32_t> ids, IntListFlag(f, "token-ids"));
    r.mutable_token_ids()->mutable_ids()->Add(ids.begin(), ids.end());
  } else {
    // The gateway renders the conversation with its chat template.
    SY_ASSIGN_OR_RETURN(nlohmann::ordered_json messages, ParseMessagesFlag(*f.Get("messages")));
    for (const nlohmann::ordered_json& m : messages) {
      v1::ChatMessage* message = r.add_messages();
      message->set_role(m.at("role").get<std::string>());
      message->set_content(m.at("content").get<std::string>());
    }
  }

  // Sampling: only what was given is sent, so the server's defaults and
  // validation apply to the rest.
  v1::SamplingParameters& s = *r.mutable_sampling();
  if (f.Has("temperature")) {
    SY_ASSIGN_OR_RETURN(double t, f.Double("temperature", 0.0));
    s.set_temperature(static_cast<float>(t));
  }
  if (f.Has("top-p")) {
    SY_ASSIGN_OR_RETURN(double p, f.Double("top-p", 1.0));
    s.set_top_p(static_cast<float>(p));
  }
  if (f.Has("top-k")) {
    SY_ASSIGN_OR_RETURN(int64_t k, f.Int("top-k", 0));
    if (k < std::numeric_limits<int32_t>::min() || k > std::numeric_limits<int32_t>::max()) {
      return absl::InvalidArgumentError("--top-k is out of range");
    }
    s.set_top_k(static_cast<int32_t>(k));
  }
  if (f.Has("min-p")) {
    SY_ASSIGN_OR_RETURN(double p, f.Double("min-p", 0.0));
    s.set_min_p(static_cast<float>(p));
  }
  if (f.Has("repetition-penalty")) {
    SY_ASSIGN_OR_RETURN(double p, f.Double("repetition-penalty", 1.0));
    s.set_repetition_penalty(static_cast<float>(p));
  }
  if (f.Has("presence-penalty")) {
    SY_ASSIGN_OR_RETURN(double p, f.Double("presence-penalty", 0.0));
    s.set_presence_penalty(static_cast<float>(p));
  }
  if (f.Has("frequency-penalty")) {
    SY_ASSIGN_OR_RETURN(double p, f.Double("frequency-penalty", 0.0));
    s.set_frequency_penalty(static_cast<float>(p));
  }
  SY_ASSIGN_OR_RETURN(std::optional<uint64_t> seed, f.OptionalUint("seed"));
  if (seed) s.set_seed(*seed);

  v1::StoppingCriteria& stop = *r.mutable_stopping();
  if (f.Has("max-new-tokens")) {
    SY_ASSIGN_OR_RETURN(int64_t n, f.Int("max-new-tokens", 16));
    if (n < 0 || n > std::numeric_limits<uint32_t>::max()) {
      return absl::InvalidArgumentError(
          absl::StrCat("--max-new-tokens must be a positive integer, got ", n));
    }
    stop.set_max_new_tokens(static_cast<uint32_t>(n));
  }
  for (const std::string& text : f.GetAll("stop")) stop.add_stop(text);
  SY_ASSIGN_OR_RETURN(std::vector<int32_t> stop_ids, IntListFlag(f, "stop-token-id"));
  stop.mutable_stop_token_ids()->Add(stop_ids.begin(), stop_ids.end());
  SY_ASSIGN_OR_RETURN(bool ignore_eos, BoolFlag(f, "ignore-eos", false));
  stop.set_ignore_eos(ignore_eos);

  if (f.Has("logprobs")) {
    SY_ASSIGN_OR_RETURN(int64_t n, f.Int("logprobs", 0));
    if (n < 0 || n > std::numeric_limits<uint32_t>::max()) {
      return absl::InvalidArgumentError(absl::StrCat("--logprobs must be >= 0, got ", n));
    }
    r.set_return_logprobs(true);
    r.set_top_logprobs(static_cast<uint32_t>(n));
  }
  if (auto id = f.Get("request-id")) r.set_request_id(*id);

  SY_ASSIGN_OR_RETURN(call.timeout_ms, f.Int("timeout-ms", 0));
  if (call.timeout_ms < 0) return absl::InvalidArgumentError("--timeout-ms must be >= 0");
  SY_ASSIGN_OR_RETURN(call.json, BoolFlag(f, "json", false));
  SY_ASSIGN_OR_RETURN(call.stream, BoolFlag(f, "stream", !call.json));
  return call;
}

void SetDeadline(grpc::ClientContext& context, int64_t timeout_ms) {
  if (timeout_ms > 0) {
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(timeout_ms));
  }
}

nlohmann::json LogprobsJson(const google::protobuf::RepeatedPtrField<v1::TokenLogprob>& lps) {
  nlohmann::json out = nlohmann::json::array();
  for (const v1::TokenLogprob& lp : lps) {
    nlohmann::json top = nlohmann::json::array();
    for (const v1::TopLogprob& t : lp.top()) {
      top.push_back({{"token_id", t.token_id()}, {"token", t.token()}, {"logprob", t.logprob()}});
    }
    out.push_back({{"token_id", lp.token_id()},
                   {"token", lp.token()},
                   {"logprob", lp.logprob()},
                   {"top", std::move(top)}});
  }
  return out;
}

void PrintLogprobs(const google::protobuf::RepeatedPtrField<v1::TokenLogprob>& lps) {
  if (lps.empty()) return;
  std::printf("logprobs:\n");
  for (const v1::TokenLogprob& lp : lps) {
    std::printf("  %d\t%s\t%.4f", lp.token_id(), lp.token().c_str(), lp.logprob());
    for (const v1::TopLogprob& t : lp.top()) {
      std::printf("\t[%d %s %.4f]", t.token_id(), t.token().c_str(), t.logprob());
    }
    std::printf("\n");
  }
}

void PrintJson(const v1::GenerateResponse& response, bool with_logprobs) {
  nlohmann::json out = {
      {"prompt_token_ids", std::vector<int32_t>(response.prompt_token_ids().begin(),
                                                response.prompt_token_ids().end())},
      {"token_ids", std::vector<int32_t>(response.token_ids().begin(), response.token_ids().end())},
      {"text", response.text()},
      {"finish_reason", ProtoFinishReasonName(response.finish_reason())},
      {"usage",
       {{"prompt_tokens", response.usage().prompt_tokens()},
        {"completion_tokens", response.usage().completion_tokens()}}}};
  if (with_logprobs) out["logprobs"] = LogprobsJson(response.logprobs());
  if (!response.request_id().empty()) out["request_id"] = response.request_id();
  // Replace rather than throw on anything that is not UTF-8.
  std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << std::endl;
}

// Streams the completion, printing text deltas as they arrive unless `quiet`,
// and assembles the whole response. The stream carries no prompt ids; they
// are filled in by the caller.
absl::StatusOr<v1::GenerateResponse> StreamGenerate(v1::GenerationService::Stub& stub,
                                                    const GenerateCall& call, bool quiet) {
  grpc::ClientContext context;
  PrepareContext(context);
  SetDeadline(context, call.timeout_ms);
  auto reader = stub.GenerateStream(&context, call.request);
  v1::GenerateStreamResponse message;
  v1::GenerateResponse whole;
  bool printed = false;
  while (reader->Read(&message)) {
    whole.mutable_text()->append(message.text_delta());
    whole.mutable_token_ids()->MergeFrom(message.token_ids());
    whole.mutable_logprobs()->MergeFrom(message.logprobs());
    if (message.finish_reason() != v1::FINISH_REASON_UNSPECIFIED) {
      whole.set_finish_reason(message.finish_reason());
    }
    if (message.has_usage()) *whole.mutable_usage() = message.usage();
    whole.mutable_prompt_token_ids()->MergeFrom(message.prompt_token_ids());
    if (!message.request_id().empty()) whole.set_request_id(message.request_id());
    if (!quiet && !message.text_delta().empty()) {
      std::fwrite(message.text_delta().data(), 1, message.text_delta().size(), stdout);
      std::fflush(stdout);
      printed = true;
    }
  }
  grpc::Status status = reader->Finish();
  if (!status.ok()) {
    if (printed) std::fputc('\n', stdout);
    return RpcError(status);
  }
  return whole;
}

// The prompt ids for --json output of a streamed call from a gateway that
// does not send them: as given, or the server's tokenization of the text
// (a `messages` prompt is rendered by the gateway, which sends its ids).
absl::StatusOr<std::vector<int32_t>> PromptIds(v1::GenerationService::Stub& stub,
                                               const GenerateCall& call) {
  if (call.request.has_token_ids()) {
    const auto& ids = call.request.token_ids().ids();
    return std::vector<int32_t>(ids.begin(), ids.end());
  }
  grpc::ClientContext context;
  PrepareContext(context);
  SetDeadline(context, call.timeout_ms);
  v1::TokenizeRequest request;
  request.set_text(call.request.text());
  v1::TokenizeResponse response;
  grpc::Status status = stub.Tokenize(&context, request, &response);
  if (!status.ok()) return RpcError(status);
  return std::vector<int32_t>(response.token_ids().begin(), response.token_ids().end());
}

absl::Status GenerateRemote(const std::vector<std::string>& args) {
  SY_ASSIGN_OR_RETURN(Flags flags, Flags::Parse(args, FormFlags("generate", true)));
  SY_ASSIGN_OR_RETURN(GenerateCall call, ParseGenerateCall(flags));
  SY_RETURN_IF_ERROR(ConfigureClientSecurity(flags));
  auto stub = v1::GenerationService::NewStub(MakeChannel(call.server));
  const bool with_logprobs = call.request.return_logprobs();

  if (!call.stream) {
    grpc::ClientContext context;
    PrepareContext(context);
    SetDeadline(context, call.timeout_ms);
    v1::GenerateResponse response;
    grpc::Status status = stub->Generate(&context, call.request, &response);
    if (!status.ok()) return RpcError(status);
    if (call.json) {
      PrintJson(response, with_logprobs);
    } else {
      std::fwrite(response.text().data(), 1, response.text().size(), stdout);
      std::fputc('\n', stdout);
      PrintLogprobs(response.logprobs());
    }
    return absl::OkStatus();
  }

  SY_ASSIGN_OR_RETURN(v1::GenerateResponse whole, StreamGenerate(*stub, call, call.json));
  if (call.json) {
    if (whole.prompt_token_ids().empty() && call.request.messages().empty()) {
      SY_ASSIGN_OR_RETURN(std::vector<int32_t> prompt_ids, PromptIds(*stub, call));
      whole.mutable_prompt_token_ids()->Add(prompt_ids.begin(), prompt_ids.end());
    }
    PrintJson(whole, with_logprobs);
  } else {
    std::fputc('\n', stdout);
    PrintLogprobs(whole.logprobs());
  }
  std::fflush(stdout);
  return absl::OkStatus();
}

absl::Status TokenizeRemote(const std::vector<std::string>& args) {
  SY_ASSIGN_OR_RETURN(Flags flags, Flags::Parse(args, FormFlags("tokenize", true)));
  SY_RETURN_IF_ERROR(ConfigureClientSecurity(flags));
  SY_ASSIGN_OR_RETURN(std::string server, flags.Required("server"));
  v1::TokenizeRequest request;
  SY_ASSIGN_OR_RETURN(*request.mutable_text(), flags.Required("text"));
  if (flags.Has("add-special-tokens")) {
    SY_ASSIGN_OR_RETURN(bool add, BoolFlag(flags, "add-special-tokens", true));
    request.set_add_special_tokens(add);
  }
  SY_ASSIGN_OR_RETURN(int64_t timeout_ms, flags.Int("timeout-ms", 0));
  auto stub = v1::GenerationService::NewStub(MakeChannel(server));
  grpc::ClientContext context;
  PrepareContext(context);
  SetDeadline(context, timeout_ms);
  v1::TokenizeResponse response;
  grpc::Status status = stub->Tokenize(&context, request, &response);
  if (!status.ok()) return RpcError(status);
  std::cout << nlohmann::json(
                   std::vector<int32_t>(response.token_ids().begin(), response.token_ids().end()))
                   .dump()
            << std::endl;
  return absl::OkStatus();
}

// `health`: one grpc.health.v1 Check, for exec probes where the prober
// cannot speak TLS (Kubernetes' grpc probes are plaintext only).
absl::Status Health(const std::vector<std::string>& args) {
  SY_ASSIGN_OR_RETURN(Flags flags, Flags::Parse(args, FormFlags("health", false)));
  SY_RETURN_IF_ERROR(ConfigureClientSecurity(flags));
  SY_ASSIGN_OR_RETURN(std::string server, flags.Required("server"));
  const std::string service = flags.GetOr("service", "");
  SY_ASSIGN_OR_RETURN(int64_t timeout_ms, flags.Int("timeout-ms", 5000));
  if (timeout_ms < 1) return absl::InvalidArgumentError("--timeout-ms must be >= 1");
  SY_ASSIGN_OR_RETURN(bool serving, IsServing(MakeChannel(server, /*own_connection=*/true), service,
                                              std::chrono::milliseconds(timeout_ms)));
  const std::string what = service.empty() ? server : absl::StrCat(server, " ", service);
  if (!serving) return absl::UnavailableError(absl::StrCat(what, " is not serving"));
  std::printf("%s: SERVING\n", what.c_str());
  return absl::OkStatus();
}

}  // namespace

int RunHealth(const std::vector<std::string>& args) {
  absl::Status status = Health(args);
  return status.ok() ? 0 : Fail(status, "health");
}

int RunGenerateRemote(const std::vector<std::string>& args) {
  absl::StatusOr<Flags> flags = Flags::Parse(args, FormFlags("generate", true));
  if (flags.ok()) {
    if (absl::Status form = CheckPromptForm(*flags); !form.ok()) {
      return UsageError(form.message(), "generate");
    }
  }
  absl::Status status = GenerateRemote(args);
  return status.ok() ? 0 : Fail(status, "generate");
}

int RunTokenizeRemote(const std::vector<std::string>& args) {
  absl::Status status = TokenizeRemote(args);
  return status.ok() ? 0 : Fail(status, "tokenize");
}

}  // namespace switchyard::cli
