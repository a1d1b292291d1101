// gRPC server reflection version 1 (grpc.reflection.v1.ServerReflection),
// served by every Switchyard server next to gRPC's own v1alpha service
// (Debian 12's gRPC 1.51 has only v1alpha; current grpcurl, grpc_cli and
// Postman ask for v1 first).
//
// Answers from protobuf's generated descriptor pool, i.e. every .proto
// compiled into the binary: file_by_filename, file_containing_symbol and
// file_containing_extension (the file first, then every file it imports),
// all_extension_numbers_of_type, and list_services (the services registered
// on the server, learnt through a ServerBuilder plugin; see
// AddReflectionV1). Questions that cannot be answered get an ErrorResponse
// (NOT_FOUND, or UNIMPLEMENTED for an empty request) and the stream goes on.
//
// Thread-safety: thread-safe. Destroy after the grpc::Server it serves.
#ifndef SWITCHYARD_RPC_REFLECTION_SERVICE_H_
#define SWITCHYARD_RPC_REFLECTION_SERVICE_H_

#include <grpcpp/grpcpp.h>

#include <mutex>
#include <string>
#include <vector>

#include "grpc/reflection/v1/reflection.grpc.pb.h"

namespace switchyard::rpc {

class ReflectionV1Service final : public grpc::reflection::v1::ServerReflection::CallbackService {
 public:
  grpc::ServerBidiReactor<grpc::reflection::v1::ServerReflectionRequest,
                          grpc::reflection::v1::ServerReflectionResponse>*
  ServerReflectionInfo(grpc::CallbackServerContext* context) override;

  // The fully qualified names list_services answers with (set once the
  // server is built). Until then list_services answers NOT_FOUND.
  void SetServiceNames(std::vector<std::string> names);

  // The answer to one request (what ServerReflectionInfo writes for it).
  grpc::reflection::v1::ServerReflectionResponse Answer(
      const grpc::reflection::v1::ServerReflectionRequest& request) const;

 private:
  mutable std::mutex mu_;
  bool have_names_ = false;
  std::vector<std::string> names_;
};

// Registers `service` on `builder` and arranges that it learns the names of
// every service the built server has. `service` must outlive the server.
void AddReflectionV1(grpc::ServerBuilder& builder, ReflectionV1Service* service);

}  // namespace switchyard::rpc

#endif  // SWITCHYARD_RPC_REFLECTION_SERVICE_H_
