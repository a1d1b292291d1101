#include "core/host_port.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace switchyard {

absl::StatusOr<HostPort> SplitHostPort(const std::string& address) {
  const size_t colon = address.rfind(':');
  if (colon == std::string::npos) return absl::InvalidArgumentError("has no port");
  HostPort out;
  out.host = address.substr(0, colon);
  const std::string port = address.substr(colon + 1);
  if (!out.host.empty() && out.host.front() == '[') {
    if (out.host.size() < 2 || out.host.back() != ']') {
      return absl::InvalidArgumentError("has an unclosed '['");
    }
    out.host = out.host.substr(1, out.host.size() - 2);
  }
  // SimpleAtoi alone would take "+80" or " 80".
  if (port.empty() || port.find_first_not_of("0123456789") != std::string::npos ||
      !absl::SimpleAtoi(port, &out.port) || out.port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("has port '", port, "', not a number in [0, 65535]"));
  }
  return out;
}

std::string TcpAddress::ToString() const {
  char host[INET6_ADDRSTRLEN] = "?";
  if (address.ss_family == AF_INET6) {
    const auto* a = reinterpret_cast<const sockaddr_in6*>(&address);
    inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof(host));
    return absl::StrCat("[", host, "]:", ntohs(a->sin6_port));
  }
  const auto* a = reinterpret_cast<const sockaddr_in*>(&address);
  inet_ntop(AF_INET, &a->sin_addr, host, sizeof(host));
  return absl::StrCat(host, ":", ntohs(a->sin_port));
}

absl::StatusOr<std::vector<TcpAddress>> ResolveTcp(const std::string& host, int port) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* found = nullptr;
  if (const int rc = getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found);
      rc != 0) {
    return absl::UnavailableError(absl::StrCat("cannot resolve '", host, "': ", gai_strerror(rc)));
  }
  std::vector<TcpAddress> out;
  for (addrinfo* a = found; a != nullptr; a = a->ai_next) {
    if (a->ai_addrlen > sizeof(sockaddr_storage)) continue;
    TcpAddress t;
    std::memcpy(&t.address, a->ai_addr, a->ai_addrlen);
    t.length = a->ai_addrlen;
    const bool seen = std::any_of(out.begin(), out.end(), [&t](const TcpAddress& o) {
      return o.length == t.length && std::memcmp(&o.address, &t.address, t.length) == 0;
    });
    if (!seen) out.push_back(t);
  }
  freeaddrinfo(found);
  if (out.empty()) {
    return absl::UnavailableError(absl::StrCat("cannot resolve '", host, "': no TCP address"));
  }
  return out;
}

absl::StatusOr<TcpListener> ListenTcp(const std::string& host, int port, int backlog) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const bool any = host.empty() || host == "*";
  if (const int rc =
          getaddrinfo(any ? nullptr : host.c_str(), std::to_string(port).c_str(), &hints, &found);
      rc != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("host '", host, "' does not resolve: ", gai_strerror(rc)));
  }
  std::string last_error = "no address to bind";
  TcpListener out;
  for (addrinfo* a = found; a != nullptr && out.fd < 0; a = a->ai_next) {
    const int fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) {
      last_error = std::strerror(errno);
      continue;
    }
    const int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (bind(fd, a->ai_addr, a->ai_addrlen) != 0 || listen(fd, backlog) != 0) {
      last_error = std::strerror(errno);
      close(fd);
      continue;
    }
    out.fd = fd;
  }
  freeaddrinfo(found);
  if (out.fd < 0) return absl::UnavailableError(last_error);
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  if (getsockname(out.fd, reinterpret_cast<sockaddr*>(&bound), &len) == 0) {
    if (bound.ss_family == AF_INET) {
      out.port = ntohs(reinterpret_cast<sockaddr_in*>(&bound)->sin_port);
    } else if (bound.ss_family == AF_INET6) {
      out.port = ntohs(reinterpret_cast<sockaddr_in6*>(&bound)->sin6_port);
    }
  }
  return out;
}

}  // namespace switchyard
