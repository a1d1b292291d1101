// Bearer-token authentication for gRPC APIs: `authorization: Bearer <token>`
// request metadata checked against tokens read from a file.
//
// Server side: a BearerTokenAuthenticator holds the accepted tokens (as
// SHA-256 digests, compared in constant time) and checks a call's metadata.
// gRPC C++ server interceptors cannot refuse a call (they cannot stop the
// method from running), and AuthMetadataProcessor works only on TLS ports, so
// a service that wants token auth checks in each of its methods and answers
// with the Finished*Reactor helpers below; services that do not (health
// checking, reflection) stay reachable without a token, as Kubernetes probes
// need. The gateway's Generation API does this (gateway/gateway_server.cc).
//
// Client side: ReadBearerTokenFile, then AddBearerToken on each ClientContext
// (works on plaintext and TLS channels) or BearerTokenCredentials (TLS only:
// gRPC refuses to send call credentials over a plaintext channel).
//
// Tokens never appear in errors or logs.
//
// Thread-safety: BearerTokenAuthenticator is immutable after creation and
// thread-safe; the functions are thread-safe.
#ifndef SWITCHYARD_RPC_AUTH_H_
#define SWITCHYARD_RPC_AUTH_H_

#include <grpcpp/grpcpp.h>

#include <array>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "rpc/status.h"

namespace switchyard::rpc {

// The message of every UNAUTHENTICATED answer. It never echoes the token.
inline constexpr char kInvalidBearerTokenMessage[] = "missing or invalid bearer token";

// Reads a token file: one token per line; leading and trailing whitespace and
// empty lines are ignored. A token is 1 to 4096 visible ASCII characters
// (0x21-0x7e), so it fits an HTTP/2 header value. Errors name the file and
// line (never the token): missing, unreadable, no token, bad characters.
absl::StatusOr<std::vector<std::string>> ReadBearerTokens(const std::string& path);

// The first token of a token file (what a client sends).
absl::StatusOr<std::string> ReadBearerTokenFile(const std::string& path);

class BearerTokenAuthenticator {
 public:
  // Accepts every token in the file (ReadBearerTokens).
  static absl::StatusOr<std::unique_ptr<BearerTokenAuthenticator>> FromFile(
      const std::string& path);
  // Accepts `tokens` (at least one; each as ReadBearerTokens requires).
  static absl::StatusOr<std::unique_ptr<BearerTokenAuthenticator>> FromTokens(
      const std::vector<std::string>& tokens);

  // OK if some "authorization" value is "Bearer <token>" (scheme
  // case-insensitive) with an accepted token; UNAUTHENTICATED
  // kInvalidBearerTokenMessage otherwise. The time taken does not depend on
  // how much of a token matches.
  absl::Status Check(
      const std::multimap<grpc::string_ref, grpc::string_ref>& client_metadata) const;
  // The same for one header value.
  bool AcceptsAuthorizationValue(std::string_view value) const;

  size_t token_count() const { return digests_.size(); }

 private:
  using Digest = std::array<unsigned char, 32>;
  explicit BearerTokenAuthenticator(std::vector<Digest> digests) : digests_(std::move(digests)) {}
  std::vector<Digest> digests_;  // SHA-256 of each accepted token
};

// A unary reactor for a callback-API method that has already failed:
// answers `status` (must not be OK).
grpc::ServerUnaryReactor* FinishedUnaryReactor(grpc::CallbackServerContext* context,
                                               const absl::Status& status);

// The same for a server-streaming method: sends no message, then `status`.
template <typename Response>
grpc::ServerWriteReactor<Response>* FinishedWriteReactor(const absl::Status& status) {
  class Reactor final : public grpc::ServerWriteReactor<Response> {
   public:
    explicit Reactor(const grpc::Status& status) { this->Finish(status); }
    void OnDone() override { delete this; }
  };
  return new Reactor(ToGrpcStatus(status));
}

// Client side: adds "authorization: Bearer <token>" to `context`. Call before
// starting the call. Works on any channel.
void AddBearerToken(grpc::ClientContext* context, std::string_view token);

// Client side: call credentials that add the same header to every call, for
// grpc::CompositeChannelCredentials(tls_credentials, ...) or
// ClientContext::set_credentials. gRPC sends them only over TLS channels (a
// plaintext call carrying them fails); use AddBearerToken for plaintext.
std::shared_ptr<grpc::CallCredentials> BearerTokenCredentials(const std::string& token);

}  // namespace switchyard::rpc

#endif  // SWITCHYARD_RPC_AUTH_H_
