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
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "switchyard/v1/generation.pb.h"

namespace switchyard::cli {

// A plaintext channel to `target` ("HOST:PORT", "dns:///...", "unix:/path")
// with 256 MiB message limits. With `own_connection`, the channel does not
// share its TCP connection with other channels of this process.
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& target, bool own_connection = false);

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
