// The gRPC runtime for the life of a binary's main(): one GrpcProcess,
// constructed before any channel, server or thread exists and destroyed after
// every one is gone, does two things for Debian 12's gRPC 1.51.
//
// 1. Synchronous final shutdown. gRPC is reference counted (grpc_init /
//    grpc_shutdown, one reference per Channel, Server, CompletionQueue). When
//    the last reference goes on a gRPC thread, 1.51 runs the clean-up on a
//    detached thread, and when it goes on some other thread it runs there; in
//    both cases that clean-up can race the static destructors of a process
//    that is exiting. Holding a reference here makes main's release the last
//    one, so the clean-up runs on main's thread before main returns.
//
// 2. A spurious connect failure. 1.51's posix TCP client reads errno after
//    calls that may change it when a non-blocking connect() is in progress
//    (grpc_tcp_client_create_from_prepared_fd calls grpc_fd_create between
//    connect() and its errno check). The first contended absl::Mutex of a
//    process probes the CPU frequency from /sys files that are absent on many
//    VMs and containers, leaving errno = ENOENT. When that first contention
//    falls inside a connect, gRPC reports "ipv4:HOST:PORT: No such file or
//    directory" and the channel waits out its reconnect backoff (1 s and up),
//    failing every call made meanwhile without wait_for_ready. The probe runs
//    once per process, so running it here, first, removes the trigger.
//
// Thread-safety: construct and destroy on main's thread only.
#ifndef SWITCHYARD_RPC_GRPC_PROCESS_H_
#define SWITCHYARD_RPC_GRPC_PROCESS_H_

namespace switchyard::rpc {

class GrpcProcess {
 public:
  GrpcProcess();
  // The final grpc_shutdown when no channel or server is left; otherwise
  // only drops this reference.
  ~GrpcProcess();
  GrpcProcess(const GrpcProcess&) = delete;
  GrpcProcess& operator=(const GrpcProcess&) = delete;
};

}  // namespace switchyard::rpc

#endif  // SWITCHYARD_RPC_GRPC_PROCESS_H_
