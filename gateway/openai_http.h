// The gateway's OpenAI-compatible HTTP API (switchyard-gateway
// --http-listen): GET /v1/models, POST /v1/completions and POST
// /v1/chat/completions, unary or as server-sent events ("stream": true),
// served with cpp-httplib (Debian's libcpp-httplib-dev).
//
// Requests take the gRPC path's route: the JSON maps onto a GenerateRequest
// (gateway/openai_api.h), ValidateGenerateRequest checks it (with the chat
// template for messages) and the shared Scheduler runs it. Errors are
// OpenAI's JSON error object: 400 bad input (naming the field), 401 without
// a valid bearer token (when auth is configured), 404 unknown model or route,
// 429 queue full, 503 draining. A client that disconnects has its request
// cancelled, and its KV cache freed, at the next step boundary.
//
// Thread-safety: thread-safe; requests are served on the server's own
// threads (a pool of OpenAiHttpOptions::threads).
#ifndef SWITCHYARD_GATEWAY_OPENAI_HTTP_H_
#define SWITCHYARD_GATEWAY_OPENAI_HTTP_H_

#include <atomic>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "core/chat_template.h"
#include "core/model_config.h"
#include "core/tokenizer.h"
#include "gateway/gateway_metrics.h"
#include "gateway/request_validation.h"
#include "gateway/scheduler.h"
#include "rpc/auth.h"

namespace httplib {
class Server;
}

namespace switchyard {

struct OpenAiHttpOptions {
  // "HOST:PORT" ("[::1]:PORT" for IPv6); port 0 picks a free one. Required.
  std::string listen;
  // The model id /v1/models lists and requests must name. Required.
  std::string model_id;
  RequestLimits limits;  // the same validation limits as gRPC
  // Renders chat messages; not owned. nullptr (default): chat requests get
  // 400 (no chat template).
  const ChatTemplate* chat_template = nullptr;
  // Bearer-token auth; not owned. nullptr (default): no auth.
  const rpc::BearerTokenAuthenticator* authenticator = nullptr;
  // Requests by method and outcome; not owned. nullptr (default): none.
  GatewayMetrics* metrics = nullptr;
  // Requests served at once (each open connection holds a thread while it
  // is served); more wait for a free thread. Default 64.
  int threads = 64;
};

class OpenAiHttpServer {
 public:
  // Binds and starts serving. The scheduler, tokenizer and everything the
  // options point to must outlive the server. INVALID_ARGUMENT for a
  // malformed address, UNAVAILABLE when it cannot listen.
  static absl::StatusOr<std::unique_ptr<OpenAiHttpServer>> Start(OpenAiHttpOptions options,
                                                                 Scheduler* scheduler,
                                                                 const Tokenizer* tokenizer,
                                                                 const ModelConfig& config);
  // Stop().
  ~OpenAiHttpServer();

  // "HOST:PORT" clients dial (an all-interfaces host reported as 127.0.0.1).
  const std::string& address() const { return address_; }

  // Cancels the requests in flight (they end with 503 or an SSE error
  // event), stops accepting and joins the server's threads. Idempotent.
  void Stop();

 private:
  struct Handlers;
  OpenAiHttpServer() = default;

  std::unique_ptr<httplib::Server> server_;
  std::unique_ptr<Handlers> handlers_;
  std::thread thread_;
  std::string address_;
  std::atomic<bool> stopped_{false};
};

}  // namespace switchyard

#endif  // SWITCHYARD_GATEWAY_OPENAI_HTTP_H_
