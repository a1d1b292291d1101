// HOST:PORT addresses, name resolution and TCP listeners for the plain
// sockets Switchyard opens itself (the expert frame socket, the metrics and
// OpenAI HTTP servers, the delay proxy, the gateway's own resolution of
// dns:/// expert targets). gRPC parses its own targets.
//
// Free functions; thread-safe.
#ifndef SWITCHYARD_CORE_HOST_PORT_H_
#define SWITCHYARD_CORE_HOST_PORT_H_

#include <sys/socket.h>

#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace switchyard {

// A split address: `host` without brackets ("" when the address was ":PORT").
struct HostPort {
  std::string host;
  int port = 0;
};

// Splits "HOST:PORT", "[V6]:PORT" or ":PORT". INVALID_ARGUMENT otherwise,
// with a message that says what is wrong ("has no port", "has port 'x', not a
// number in [0, 65535]", "has an unclosed '['") and leaves naming the address
// to the caller, which knows which flag it came from.
absl::StatusOr<HostPort> SplitHostPort(const std::string& address);

// One socket address of a TCP endpoint (IPv4 or IPv6).
struct TcpAddress {
  sockaddr_storage address{};
  socklen_t length = 0;
  // "1.2.3.4:80" or "[::1]:80": what SplitHostPort and gRPC targets take.
  std::string ToString() const;
};

// The addresses `host` (a name or a numeric address) stands for on `port`,
// in the resolver's order, each once. UNAVAILABLE when the host does not
// resolve (a DNS answer may change: the caller decides whether that is
// final), with gai_strerror's reason; the caller names what it resolved.
absl::StatusOr<std::vector<TcpAddress>> ResolveTcp(const std::string& host, int port);

// A listening TCP socket: blocking, close-on-exec, SO_REUSEADDR. The caller
// owns `fd`; `port` is the one bound (a free one when asked for 0).
struct TcpListener {
  int fd = -1;
  int port = 0;
};

// Listens on `host` ("" or "*": every interface) and `port` (0: any free
// one) with `backlog` pending connections, trying each address the host
// resolves to. INVALID_ARGUMENT when the
// host does not resolve, UNAVAILABLE when no address could be bound; the
// message says why (for example "Address already in use") and the caller
// prefixes what was being listened for.
absl::StatusOr<TcpListener> ListenTcp(const std::string& host, int port, int backlog = 64);

}  // namespace switchyard

#endif  // SWITCHYARD_CORE_HOST_PORT_H_
