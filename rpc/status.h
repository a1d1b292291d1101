// The one place where absl::Status and grpc::Status meet. Code and message
// carry over unchanged in both directions.
#ifndef SWITCHYARD_RPC_STATUS_H_
#define SWITCHYARD_RPC_STATUS_H_

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace switchyard::rpc {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);
// "UNAVAILABLE", "INVALID_ARGUMENT", ...
const char* GrpcCodeName(grpc::StatusCode code);

}  // namespace switchyard::rpc

#endif  // SWITCHYARD_RPC_STATUS_H_
