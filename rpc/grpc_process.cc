#include "rpc/grpc_process.h"

#include <grpc/grpc.h>

#include "absl/base/internal/sysinfo.h"

namespace switchyard::rpc {

GrpcProcess::GrpcProcess() {
  // absl's once-per-process CPU frequency probe (see the header): run it
  // now, before any connect() whose errno it could clobber.
  (void)absl::base_internal::NominalCPUFrequency();
  grpc_init();
}

// Blocking: never hands the clean-up to a detached thread, even when this
// is not main's thread after all.
GrpcProcess::~GrpcProcess() { grpc_shutdown_blocking(); }

}  // namespace switchyard::rpc
