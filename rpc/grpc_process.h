// The gRPC runtime for the life of a binary's main(): one GrpcProcess,
// constructed before any channel, server or thread exists and destroyed after
// every one is gone, does two things for Debian 12's gRPC 1.51.
//
// 1. One final shutdown, on main's thread. gRPC is reference counted
//    (grpc_init / grpc_shutdown; each Channel, Server and CompletionQueue
//    holds a reference, and a ClientContext holds its Channel). Without a
//    reference of main's own, gRPC shuts down completely whenever the last of
//    those goes (a test tearing down its in-process gateway, then starting it
//    again) and on whichever thread drops it: 1.51 runs the clean-up right
//    there, or on a detached thread when that is a gRPC thread with an
//    ExecCtx, racing what the process does next. A callback reactor's
//    ClientContext can drop the last Channel reference just after the call
//    reported done. Holding a reference here makes main's release the last
//    one in practice (everything else is gone by then), and it is blocking.
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
