#include "cli/metrics_scrape.h"

#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/host_port.h"

namespace switchyard::cli {

absl::StatusOr<std::string> ScrapeMetrics(const std::string& host_port, const std::string& what) {
  absl::StatusOr<HostPort> split = SplitHostPort(host_port);
  if (!split.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat(what, host_port, ": ", split.status().message()));
  }
  std::string host = split->host;
  if (host.empty() || host == "0.0.0.0") host = "127.0.0.1";
  absl::StatusOr<std::vector<TcpAddress>> addresses = ResolveTcp(host, split->port);
  if (!addresses.ok()) {
    return absl::UnavailableError(
        absl::StrCat(what, host_port, ": ", addresses.status().message()));
  }
  int fd = -1;
  for (const TcpAddress& a : *addresses) {
    fd = socket(a.address.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) continue;
    timeval timeout{10, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
    if (connect(fd, reinterpret_cast<const sockaddr*>(&a.address), a.length) == 0) break;
    close(fd);
    fd = -1;
  }
  if (fd < 0) {
    return absl::UnavailableError(absl::StrCat(what, host_port, ": cannot connect"));
  }
  const std::string request =
      "GET /metrics HTTP/1.1\r\nHost: " + host_port + "\r\nConnection: close\r\n\r\n";
  bool sent = write(fd, request.data(), request.size()) == static_cast<ssize_t>(request.size());
  std::string response;
  char buf[16384];
  ssize_t n;
  while (sent && (n = read(fd, buf, sizeof(buf))) > 0) response.append(buf, n);
  close(fd);
  const size_t body = response.find("\r\n\r\n");
  if (!sent || body == std::string::npos || response.compare(0, 12, "HTTP/1.1 200") != 0) {
    return absl::UnavailableError(absl::StrCat(what, host_port,
                                               ": no HTTP 200 answer to GET /metrics (",
                                               response.substr(0, response.find('\r')), ")"));
  }
  return response.substr(body + 4);
}

}  // namespace switchyard::cli
