// Client-side gRPC plumbing shared by the subcommands that talk to running
// servers (`generate --server`, `tokenize --server`, `bench`, `up`): channel
// creation, finish-reason names, and grpc.health.v1 checks.
//
// Thread-safety: every function is thread-safe; channels may be shared.
#ifndef SWITCHYARD_CLI_GRPC_CLIENT_H_
#define SWITCHYARD_CLI_GRPC_CLIENT_H_

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <set>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/flags.h"
#include "switchyard/v1/generation.pb.h"

namespace switchyard::cli {

// The client's transport security, from --tls-ca, --tls-cert, --tls-key and
// --auth-token-file. Set once at the start of a command (before any channel
// is made); plaintext without a token by default.
inline const std::set<std::string> kSecurityFlags = {"tls-ca", "tls-cert", "tls-key",
                                                     "auth-token-file"};
absl::Status ConfigureClientSecurity(const Flags& flags);

// A channel to `target` ("HOST:PORT", "dns:///...", "unix:/path") with 256 MiB
// message limits, over TLS when configured. With `own_connection`, the
// channel does not share its TCP connection with other channels of this
// process.
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target, bool own_connection = false);

// Adds the configured bearer token (if any) to a call.
void PrepareContext(grpc::ClientContext& context);

// "length", "eos", "stop", "cancelled" (the local `generate --json` names), or
// "unspecified".
const char* ProtoFinishReasonName(v1::FinishReason reason);

// Converts a failed RPC to an absl::Status with the same code and message.
absl::Status RpcError(const grpc::Status& status);

// Formats `status` as "CODE_NAME: message" (e.g. "UNAVAILABLE: failed to
// connect"), the form every remote subcommand prints.
std::string StatusLine(const absl::Status& status);

// Asks `channel`'s server for the grpc.health.v1 status of `service` ("" is
// the whole server). OK(true) when SERVING, OK(false) for any other status;
// an error when the call fails (e.g. UNAVAILABLE while the server starts).
absl::StatusOr<bool> IsServing(const std::shared_ptr<grpc::Channel>& channel,
                               const std::string& service, std::chrono::milliseconds timeout);

}  // namespace switchyard::cli

#endif  // SWITCHYARD_CLI_GRPC_CLIENT_H_
