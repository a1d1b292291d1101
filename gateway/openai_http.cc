#include "gateway/openai_http.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <netdb.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <condition_variable>
#include <cstdlib>
#include <ctime>
#include <mutex>
#include <optional>
#include <set>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "core/host_port.h"
#include "gateway/openai_api.h"
#include "httplib.h"

namespace switchyard {
namespace {

using openai::Endpoint;

// How often a waiting request checks whether its client is still there.
constexpr auto kPollInterval = std::chrono::milliseconds(50);

// One request's events, from the scheduler thread to the thread serving the
// HTTP request. Shared by both (the scheduler drops its reference after the
// terminal event).
class HttpCall final : public GenerationSink {
 public:
  // What arrived since the last Take.
  struct Update {
    std::string text;
    std::vector<TokenLogprobs> logprobs;  // of the tokens since the last Take, when requested
    bool terminal = false;
    std::optional<FinishEvent> finish;  // set on success (also when cancelled)
    absl::Status error;                 // set on failure
  };

  void OnTokens(const TokenEvent& e) override {
    std::lock_guard<std::mutex> lock(mu_);
    text_ += e.text_delta;
    logprobs_.insert(logprobs_.end(), e.logprobs.begin(), e.logprobs.end());
    cv_.notify_all();
  }
  void OnFinish(const FinishEvent& e) override {
    std::lock_guard<std::mutex> lock(mu_);
    text_ += e.text_delta;
    finish_ = e;
    terminal_ = true;
    cv_.notify_all();
  }
  void OnError(const absl::Status& status) override {
    std::lock_guard<std::mutex> lock(mu_);
    error_ = status;
    terminal_ = true;
    cv_.notify_all();
  }

  // Waits up to `timeout` for news, then takes what has arrived.
  Update Take(std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, timeout, [&] { return terminal_ || !text_.empty() || !logprobs_.empty(); });
    Update u;
    u.text.swap(text_);
    u.logprobs.swap(logprobs_);
    u.terminal = terminal_;
    if (terminal_) {
      u.finish = finish_;
      u.error = error_;
    }
    return u;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::string text_;                     // not yet taken
  std::vector<TokenLogprobs> logprobs_;  // not yet taken
  bool terminal_ = false;
  std::optional<FinishEvent> finish_;
  absl::Status error_;
};

std::string NumericHost(const sockaddr_storage& addr, socklen_t len, int* port) {
  char host[NI_MAXHOST], service[NI_MAXSERV];
  if (getnameinfo(reinterpret_cast<const sockaddr*>(&addr), len, host, sizeof(host), service,
                  sizeof(service), NI_NUMERICHOST | NI_NUMERICSERV) != 0) {
    return "";
  }
  *port = std::atoi(service);
  return host;
}

// The socket of the connection `req` came on: cpp-httplib does not expose
// it, so it is found by its addresses (unique among open connections). -1
// if not found; the request then is only cancelled when a write fails.
int FindConnectionFd(const httplib::Request& req) {
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  int found = -1;
  while (dirent* entry = readdir(dir)) {
    int fd = 0;
    if (!absl::SimpleAtoi(entry->d_name, &fd)) continue;
    sockaddr_storage peer{}, local{};
    socklen_t peer_len = sizeof(peer), local_len = sizeof(local);
    if (getpeername(fd, reinterpret_cast<sockaddr*>(&peer), &peer_len) != 0) continue;
    if (peer.ss_family != AF_INET && peer.ss_family != AF_INET6) continue;
    if (getsockname(fd, reinterpret_cast<sockaddr*>(&local), &local_len) != 0) continue;
    int peer_port = -1, local_port = -1;
    if (NumericHost(peer, peer_len, &peer_port) != req.remote_addr ||
        peer_port != req.remote_port) {
      continue;
    }
    if (NumericHost(local, local_len, &local_port) != req.local_addr ||
        local_port != req.local_port) {
      continue;
    }
    found = fd;
    break;
  }
  closedir(dir);
  return found;
}

// True when the client closed (or reset) its side of the connection.
bool PeerGone(int fd) {
  if (fd < 0) return false;
  pollfd p{fd, POLLRDHUP, 0};
  return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0;
}

// A token as text: the vocabulary piece with SentencePiece's "▁" as a space
// and a byte-fallback token ("<0x0A>") as its byte.
std::string TokenText(const Tokenizer& tokenizer, int32_t id) {
  const std::string piece = tokenizer.IdToToken(id).value_or("");
  int byte = 0;
  if (piece.size() == 6 && piece.rfind("<0x", 0) == 0 && piece[5] == '>' &&
      absl::SimpleHexAtoi(piece.substr(3, 2), &byte)) {
    return std::string(1, static_cast<char>(byte));
  }
  return absl::StrReplaceAll(piece, {{"\xE2\x96\x81", " "}});
}

void AppendLogprobs(const Tokenizer& tokenizer, const std::vector<TokenLogprobs>& in,
                    std::vector<openai::TokenLogprob>* out) {
  for (const TokenLogprobs& lp : in) {
    openai::TokenLogprob t{TokenText(tokenizer, lp.id), lp.logprob, {}};
    for (const auto& [id, logprob] : lp.top) t.top.emplace_back(TokenText(tokenizer, id), logprob);
    out->push_back(std::move(t));
  }
}

void Reply(httplib::Response& res, const openai::Error& error) {
  res.status = error.http_status;
  res.set_content(openai::ErrorJson(error), "application/json");
}

absl::Status ShuttingDown() {
  return absl::UnavailableError("the gateway is shutting down; retry on another gateway");
}

}  // namespace

struct OpenAiHttpServer::Handlers {
  OpenAiHttpOptions options;
  Scheduler* scheduler = nullptr;
  const Tokenizer* tokenizer = nullptr;
  ModelConfig config;
  int64_t created = 0;  // when the server started, /v1/models' `created`

  std::mutex mu;
  std::condition_variable idle;
  bool stopping = false;                   // guarded by mu
  std::set<Scheduler::RequestId> running;  // guarded by mu: submitted, not yet answered

  bool Stopping() {
    std::lock_guard<std::mutex> lock(mu);
    return stopping;
  }
  void Untrack(Scheduler::RequestId id) {
    std::lock_guard<std::mutex> lock(mu);
    running.erase(id);
    idle.notify_all();
  }

  void Count(Endpoint endpoint, const std::string& outcome) {
    if (options.metrics == nullptr) return;
    options.metrics
        ->Requests(
            endpoint == Endpoint::kCompletions ? "OpenAI.Completions" : "OpenAI.ChatCompletions",
            outcome)
        .Increment();
  }
  void Fail(Endpoint endpoint, const absl::Status& status, httplib::Response& res) {
    Count(endpoint, OutcomeLabel(static_cast<int>(status.code())));
    Reply(res, openai::ErrorFromStatus(status, endpoint));
  }

  absl::Status Authorize(const httplib::Request& req) const {
    if (options.authenticator == nullptr) return absl::OkStatus();
    const size_t n = req.get_header_value_count("Authorization");
    for (size_t i = 0; i < n; ++i) {
      if (options.authenticator->AcceptsAuthorizationValue(
              req.get_header_value("Authorization", i))) {
        return absl::OkStatus();
      }
    }
    return absl::UnauthenticatedError(
        absl::StrCat(rpc::kInvalidBearerTokenMessage,
                     ": send the header 'Authorization: Bearer TOKEN' (the OpenAI SDKs' api_key) "
                     "with a token of the gateway's --auth-token-file"));
  }

  void Models(const httplib::Request& req, httplib::Response& res) {
    if (absl::Status s = Authorize(req); !s.ok()) {
      Reply(res, openai::ErrorFromStatus(s, Endpoint::kCompletions));
      return;
    }
    res.set_content(openai::ModelsJson(options.model_id, created), "application/json");
  }

  void Generate(Endpoint endpoint, const httplib::Request& req, httplib::Response& res);
  void Unary(Endpoint endpoint, std::shared_ptr<HttpCall> call, Scheduler::RequestId id,
             const openai::ResponseHeader& header, bool logprobs, int fd, httplib::Response& res);
  void Stream(Endpoint endpoint, std::shared_ptr<HttpCall> call, Scheduler::RequestId id,
              const openai::ResponseHeader& header, bool include_usage, bool logprobs, int fd,
              httplib::Response& res);
};

void OpenAiHttpServer::Handlers::Generate(Endpoint endpoint, const httplib::Request& req,
                                          httplib::Response& res) {
  if (absl::Status s = Authorize(req); !s.ok()) {
    // Not counted as a request: like gRPC calls refused for their token.
    Reply(res, openai::ErrorFromStatus(s, endpoint));
    return;
  }
  absl::StatusOr<openai::ParsedRequest> parsed = openai::ParseRequest(endpoint, req.body);
  if (!parsed.ok()) return Fail(endpoint, parsed.status(), res);
  if (parsed->model != options.model_id) {
    Count(endpoint, "invalid_argument");
    Reply(res, {404, "invalid_request_error",
                absl::StrCat("model: '", parsed->model, "' does not exist; this gateway serves '",
                             options.model_id, "' (GET /v1/models)"),
                "model", "model_not_found"});
    return;
  }
  // Without max_tokens, chat generates as much as fits: validate with the
  // smallest budget, then give it what the context leaves.
  if (parsed->max_tokens_defaulted) parsed->request.mutable_stopping()->set_max_new_tokens(1);
  absl::StatusOr<GenerationRequest> validated = ValidateGenerateRequest(
      parsed->request, *tokenizer, config, options.limits, options.chat_template);
  if (!validated.ok()) return Fail(endpoint, validated.status(), res);
  if (parsed->max_tokens_defaulted) {
    const int room =
        config.max_position_embeddings - static_cast<int>(validated->prompt_ids.size());
    validated->options.max_new_tokens =
        std::max(1, std::min(EffectiveMaxNewTokensLimit(options.limits, config), room));
  }

  auto call = std::make_shared<HttpCall>();
  std::unique_lock<std::mutex> lock(mu);
  if (stopping) {
    lock.unlock();
    return Fail(endpoint, ShuttingDown(), res);
  }
  absl::StatusOr<Scheduler::RequestId> id = scheduler->Submit(*std::move(validated), call);
  if (!id.ok()) {
    lock.unlock();
    return Fail(endpoint, id.status(), res);
  }
  running.insert(*id);
  lock.unlock();

  const openai::ResponseHeader header{
      openai::NewResponseId(endpoint == Endpoint::kCompletions ? "cmpl-" : "chatcmpl-"),
      parsed->model, static_cast<int64_t>(std::time(nullptr))};
  const int fd = FindConnectionFd(req);
  const bool logprobs = parsed->request.return_logprobs();
  if (parsed->stream) {
    Stream(endpoint, std::move(call), *id, header, parsed->include_usage, logprobs, fd, res);
  } else {
    Unary(endpoint, std::move(call), *id, header, logprobs, fd, res);
  }
}

void OpenAiHttpServer::Handlers::Unary(Endpoint endpoint, std::shared_ptr<HttpCall> call,
                                       Scheduler::RequestId id,
                                       const openai::ResponseHeader& header, bool logprobs, int fd,
                                       httplib::Response& res) {
  std::string text;
  std::vector<openai::TokenLogprob> token_logprobs;
  bool cancelled = false;
  HttpCall::Update u;
  for (;;) {
    u = call->Take(kPollInterval);
    text += u.text;
    AppendLogprobs(*tokenizer, u.logprobs, &token_logprobs);
    if (u.terminal) break;
    if (!cancelled && (Stopping() || PeerGone(fd))) {
      scheduler->Cancel(id);  // it ends at the next step boundary, freeing its cache
      cancelled = true;
    }
  }
  Untrack(id);
  if (!u.error.ok()) return Fail(endpoint, u.error, res);
  if (u.finish->reason == FinishReason::kCancelled) {
    Count(endpoint, "cancelled");
    Reply(res, openai::ErrorFromStatus(ShuttingDown(), endpoint));  // read only when stopping
    return;
  }
  Count(endpoint, "ok");
  res.set_content(openai::CompletionJson(endpoint, header, text, u.finish->reason,
                                         {u.finish->prompt_tokens, u.finish->completion_tokens},
                                         logprobs ? &token_logprobs : nullptr),
                  "application/json");
}

void OpenAiHttpServer::Handlers::Stream(Endpoint endpoint, std::shared_ptr<HttpCall> call,
                                        Scheduler::RequestId id,
                                        const openai::ResponseHeader& header, bool include_usage,
                                        bool logprobs, int fd, httplib::Response& res) {
  struct State {
    bool first = true;
    bool cancelled = false;
    bool ended = false;
  };
  auto state = std::make_shared<State>();
  Handlers* self = this;
  res.set_header("Cache-Control", "no-cache");
  res.set_chunked_content_provider(
      "text/event-stream",
      [self, endpoint, call, id, header, include_usage, logprobs, fd, state](
          size_t, httplib::DataSink& sink) {
        auto cancel = [&] {
          if (!state->cancelled) self->scheduler->Cancel(id);
          state->cancelled = true;
        };
        auto write = [&](const std::string& event) {
          if (sink.write(event.data(), event.size())) return true;
          cancel();  // the client is gone
          return false;
        };
        HttpCall::Update u = call->Take(kPollInterval);
        // Chat's first chunk carries the assistant role, even with no text yet.
        const bool role_chunk = state->first && endpoint == Endpoint::kChatCompletions;
        std::vector<openai::TokenLogprob> token_logprobs;
        AppendLogprobs(*self->tokenizer, u.logprobs, &token_logprobs);
        if (!u.text.empty() || role_chunk || !token_logprobs.empty()) {
          if (!write(openai::SseEvent(openai::ChunkJson(endpoint, header, u.text, nullptr,
                                                        state->first,
                                                        logprobs ? &token_logprobs : nullptr)))) {
            return false;
          }
          state->first = false;
        }
        if (!u.terminal) {
          if (self->Stopping() || PeerGone(fd)) cancel();
          return true;
        }
        state->ended = true;
        if (!u.error.ok() || u.finish->reason == FinishReason::kCancelled) {
          // Headers are sent: the error travels as an event (the OpenAI SDKs
          // raise it), and no [DONE] follows.
          const absl::Status status = u.error.ok() ? ShuttingDown() : u.error;
          self->Count(endpoint,
                      u.error.ok() ? "cancelled" : OutcomeLabel(static_cast<int>(status.code())));
          write(openai::SseEvent(openai::ErrorJson(openai::ErrorFromStatus(status, endpoint))));
          sink.done();
          return true;
        }
        self->Count(endpoint, "ok");
        if (!write(openai::SseEvent(openai::ChunkJson(
                endpoint, header, "", openai::OpenAiFinishReason(u.finish->reason), false)))) {
          return false;
        }
        if (include_usage &&
            !write(openai::SseEvent(openai::UsageChunkJson(
                endpoint, header, {u.finish->prompt_tokens, u.finish->completion_tokens})))) {
          return false;
        }
        if (!write(openai::kSseDone)) return false;
        sink.done();
        return true;
      },
      [self, id, state](bool success) {
        // Runs when the response is finished or abandoned.
        if (!state->ended) self->scheduler->Cancel(id);
        self->Untrack(id);
      });
}

absl::StatusOr<std::unique_ptr<OpenAiHttpServer>> OpenAiHttpServer::Start(
    OpenAiHttpOptions options, Scheduler* scheduler, const Tokenizer* tokenizer,
    const ModelConfig& config) {
  absl::StatusOr<HostPort> address = SplitHostPort(options.listen);
  if (!address.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--http-listen '", options.listen, "' ",
                                                   address.status().message(),
                                                   " (expected HOST:PORT)"));
  }
  const std::string host = address->host.empty() ? "0.0.0.0" : address->host;
  int port = address->port;
  if (options.model_id.empty()) return absl::InvalidArgumentError("OpenAI API: no model id");
  std::unique_ptr<OpenAiHttpServer> server(new OpenAiHttpServer());
  auto h = std::make_unique<Handlers>();
  h->options = std::move(options);
  h->scheduler = scheduler;
  h->tokenizer = tokenizer;
  h->config = config;
  h->created = static_cast<int64_t>(std::time(nullptr));
  Handlers* handlers = h.get();
  server->handlers_ = std::move(h);

  auto s = std::make_unique<httplib::Server>();
  const int threads = std::max(1, handlers->options.threads);
  s->new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
  // JSON escapes can make a legal prompt several times its size in the body.
  s->set_payload_max_length(
      static_cast<size_t>(MaxLegalRequestBytes(handlers->options.limits, config)) * 6);
  s->Get("/v1/models", [handlers](const httplib::Request& req, httplib::Response& res) {
    handlers->Models(req, res);
  });
  s->Post("/v1/completions", [handlers](const httplib::Request& req, httplib::Response& res) {
    handlers->Generate(Endpoint::kCompletions, req, res);
  });
  s->Post("/v1/chat/completions", [handlers](const httplib::Request& req, httplib::Response& res) {
    handlers->Generate(Endpoint::kChatCompletions, req, res);
  });
  s->set_error_handler(httplib::Server::HandlerWithResponse([](const httplib::Request& req,
                                                               httplib::Response& res) {
    if (!res.body.empty()) return httplib::Server::HandlerResponse::Unhandled;
    openai::Error e{res.status, "invalid_request_error", "", "", ""};
    if (res.status == 404) {
      e.message = absl::StrCat("Invalid URL (", req.method, " ", req.path,
                               "): this gateway serves GET /v1/models, POST /v1/completions and "
                               "POST /v1/chat/completions");
      e.code = "unknown_url";
    } else if (res.status == 413) {
      e.message = "body: the request is larger than the largest legal request";
    } else {
      e.message = absl::StrCat("HTTP ", res.status, " for ", req.method, " ", req.path);
      if (res.status >= 500) e.type = "server_error";
    }
    Reply(res, e);
    return httplib::Server::HandlerResponse::Handled;
  }));
  s->set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr) {
    Reply(res, {500, "server_error", "internal error while serving the request", "", ""});
  });
  if (port == 0) {
    port = s->bind_to_any_port(host);
    if (port < 0) port = -1;
  } else if (!s->bind_to_port(host, port)) {
    port = -1;
  }
  if (port <= 0) {
    return absl::UnavailableError(
        absl::StrCat("OpenAI HTTP API: cannot listen on '", handlers->options.listen, "'"));
  }
  const bool any = host == "0.0.0.0" || host == "::";
  const std::string shown = any ? "127.0.0.1" : host;
  server->address_ = shown.find(':') != std::string::npos ? absl::StrCat("[", shown, "]:", port)
                                                          : absl::StrCat(shown, ":", port);
  httplib::Server* raw = s.get();
  server->server_ = std::move(s);
  server->thread_ = std::thread([raw] { raw->listen_after_bind(); });
  return server;
}

void OpenAiHttpServer::Stop() {
  if (stopped_.exchange(true)) return;
  {
    std::unique_lock<std::mutex> lock(handlers_->mu);
    handlers_->stopping = true;
    for (Scheduler::RequestId id : handlers_->running) handlers_->scheduler->Cancel(id);
    // The cancelled requests answer (503 or an SSE error event) before the
    // server closes their connections.
    handlers_->idle.wait_for(lock, std::chrono::seconds(5),
                             [&] { return handlers_->running.empty(); });
  }
  server_->stop();
  if (thread_.joinable()) thread_.join();
}

OpenAiHttpServer::~OpenAiHttpServer() { Stop(); }

}  // namespace switchyard
