#include "metrics/http_exporter.h"

#include <poll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <list>

#include "absl/strings/str_cat.h"
#include "core/host_port.h"

namespace switchyard::metrics {

struct HttpExporter::Connection {
  int fd = -1;
  std::thread thread;
  std::atomic<bool> done{false};
};

namespace {

constexpr size_t kMaxHeadBytes = 8192;

std::string Reply(const std::string& status, const std::string& extra_headers,
                  const std::string& content_type, const std::string& body, bool head_only) {
  std::string out = absl::StrCat("HTTP/1.1 ", status, "\r\nContent-Type: ", content_type,
                                 "\r\nContent-Length: ", body.size(), "\r\n", extra_headers,
                                 "Connection: close\r\n\r\n");
  if (!head_only) out += body;
  return out;
}

void WriteAll(int fd, const std::string& data) {
  size_t sent = 0;
  while (sent < data.size()) {
    const ssize_t n = send(fd, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // the client went away or timed out (SO_SNDTIMEO)
    sent += static_cast<size_t>(n);
  }
}

}  // namespace

absl::StatusOr<std::unique_ptr<HttpExporter>> HttpExporter::Start(const std::string& listen,
                                                                  const Registry* registry) {
  absl::StatusOr<HostPort> hp = SplitHostPort(listen);
  if (!hp.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("metrics address '", listen, "' ",
                                                   hp.status().message(), " (expected HOST:PORT)"));
  }
  const std::string& host = hp->host;
  const bool all_interfaces = host.empty() || host == "*" || host == "0.0.0.0" || host == "::";
  absl::StatusOr<TcpListener> listener = ListenTcp(host, hp->port);
  if (!listener.ok()) {
    return absl::Status(listener.status().code(), absl::StrCat("cannot serve metrics on ", listen,
                                                               ": ", listener.status().message()));
  }
  const int fd = listener->fd;
  const int wake = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (wake < 0) {
    close(fd);
    return absl::UnavailableError(
        absl::StrCat("metrics: cannot create an eventfd: ", std::strerror(errno)));
  }

  auto exporter = std::unique_ptr<HttpExporter>(new HttpExporter());
  exporter->registry_ = registry;
  exporter->listen_fd_ = fd;
  exporter->wake_fd_ = wake;
  exporter->port_ = listener->port;
  const std::string shown = all_interfaces                        ? "127.0.0.1"
                            : host.find(':') != std::string::npos ? absl::StrCat("[", host, "]")
                                                                  : host;
  exporter->address_ = absl::StrCat(shown, ":", exporter->port_);
  exporter->acceptor_ = std::thread([e = exporter.get()] { e->AcceptLoop(); });
  return exporter;
}

HttpExporter::~HttpExporter() {
  if (wake_fd_ >= 0) {
    const uint64_t one = 1;
    [[maybe_unused]] ssize_t n = write(wake_fd_, &one, sizeof(one));
  }
  if (acceptor_.joinable()) acceptor_.join();
  if (listen_fd_ >= 0) close(listen_fd_);
  if (wake_fd_ >= 0) close(wake_fd_);
}

void HttpExporter::AcceptLoop() {
  std::list<Connection> connections;
  // Joins finished connections and closes their sockets; all of them when
  // `all` (after their sockets are shut down so they finish promptly).
  const auto reap = [&connections](bool all) {
    for (auto it = connections.begin(); it != connections.end();) {
      if (all || it->done.load()) {
        it->thread.join();
        close(it->fd);
        it = connections.erase(it);
      } else {
        ++it;
      }
    }
  };
  for (;;) {
    pollfd fds[2] = {{listen_fd_, POLLIN, 0}, {wake_fd_, POLLIN, 0}};
    const int ready = poll(fds, 2, /*timeout_ms=*/1000);
    reap(/*all=*/false);
    if (ready < 0 && errno != EINTR) break;
    if (fds[1].revents != 0) break;
    if (ready <= 0 || (fds[0].revents & POLLIN) == 0) continue;
    const int fd = accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;  // the client gave up, or out of descriptors for now
    const timeval timeout{kRequestTimeoutMs / 1000, (kRequestTimeoutMs % 1000) * 1000};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &timeout, sizeof(timeout));
    if (connections.size() >= static_cast<size_t>(kMaxConnections)) {
      WriteAll(fd, Reply("503 Service Unavailable", "Retry-After: 1\r\n", "text/plain",
                         "too many concurrent metrics connections\n", false));
      close(fd);
      continue;
    }
    Connection& c = connections.emplace_back();
    c.fd = fd;
    c.thread = std::thread([this, &c] {
      Serve(c.fd);
      c.done.store(true);
    });
  }
  for (Connection& c : connections) shutdown(c.fd, SHUT_RDWR);
  reap(/*all=*/true);
}

void HttpExporter::Serve(int fd) const {
  const auto deadline =
      std::chrono::steady_clock::now() + std::chrono::milliseconds(kRequestTimeoutMs);
  std::string head;
  char buffer[2048];
  for (;;) {
    if (head.find("\r\n\r\n") != std::string::npos) break;
    if (head.size() > kMaxHeadBytes) {
      WriteAll(fd, Reply("431 Request Header Fields Too Large", "", "text/plain",
                         "request head over 8 KiB\n", false));
      shutdown(fd, SHUT_RDWR);
      return;
    }
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
                          deadline - std::chrono::steady_clock::now())
                          .count();
    pollfd p{fd, POLLIN, 0};
    if (left <= 0 || poll(&p, 1, static_cast<int>(left)) <= 0) {
      shutdown(fd, SHUT_RDWR);  // too slow (or interrupted): drop it
      return;
    }
    const ssize_t n = recv(fd, buffer, sizeof(buffer), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      shutdown(fd, SHUT_RDWR);
      return;
    }
    head.append(buffer, static_cast<size_t>(n));
  }
  WriteAll(fd, Respond(head));
  shutdown(fd, SHUT_RDWR);
}

std::string HttpExporter::Respond(const std::string& head) const {
  // Request line: METHOD SP TARGET SP HTTP/x.y
  const std::string line = head.substr(0, head.find("\r\n"));
  const size_t sp1 = line.find(' ');
  const size_t sp2 = sp1 == std::string::npos ? sp1 : line.find(' ', sp1 + 1);
  if (sp2 == std::string::npos || line.compare(sp2 + 1, 5, "HTTP/") != 0) {
    return Reply("400 Bad Request", "", "text/plain", "malformed request line\n", false);
  }
  const std::string method = line.substr(0, sp1);
  std::string path = line.substr(sp1 + 1, sp2 - sp1 - 1);
  path = path.substr(0, path.find('?'));
  if (path != "/metrics") {
    return Reply("404 Not Found", "", "text/plain", "not found: metrics are at /metrics\n",
                 method == "HEAD");
  }
  if (method != "GET" && method != "HEAD") {
    return Reply("405 Method Not Allowed", "Allow: GET, HEAD\r\n", "text/plain",
                 absl::StrCat("method ", method, " not allowed on /metrics\n"), false);
  }
  return Reply("200 OK", "", "text/plain; version=0.0.4; charset=utf-8", Serialize(*registry_),
               method == "HEAD");
}

}  // namespace switchyard::metrics
