#include "metrics/http_exporter.h"

#include <arpa/inet.h>
#include <civetweb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <mutex>

#include "absl/strings/str_cat.h"

namespace switchyard::metrics {
namespace {

std::once_flag init_once;

// A port that is free on `host` right now (bind to port 0, read it back).
absl::StatusOr<int> FreePort(const std::string& host) {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return absl::UnavailableError("metrics: cannot create a socket");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = 0;
  if (inet_pton(AF_INET, host.c_str(), &addr.sin_addr) != 1) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat("metrics address host '", host,
                                                   "' is not an IPv4 address"));
  }
  socklen_t len = sizeof(addr);
  if (bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
    close(fd);
    return absl::UnavailableError(absl::StrCat("metrics: cannot bind ", host, ":0"));
  }
  const int port = ntohs(addr.sin_port);
  close(fd);
  return port;
}

}  // namespace

absl::StatusOr<std::unique_ptr<HttpExporter>> HttpExporter::Start(const std::string& listen,
                                                                  const Registry* registry) {
  std::call_once(init_once, [] { mg_init_library(0); });
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat("metrics address '", listen,
                                                   "' must be HOST:PORT"));
  }
  std::string host = listen.substr(0, colon);
  const std::string port = listen.substr(colon + 1);
  auto exporter = std::unique_ptr<HttpExporter>(new HttpExporter());
  exporter->registry_ = registry;
  // Port 0 through civetweb fails now and then, so pick the free port here
  // (and try again if another process takes it before civetweb binds).
  const bool any_port = port == "0";
  const bool all_interfaces = host.empty() || host == "0.0.0.0";
  mg_callbacks callbacks{};
  char error_text[256] = "";
  for (int attempt = 0; attempt < 5 && exporter->context_ == nullptr; ++attempt) {
    std::string chosen = port;
    if (any_port) {
      absl::StatusOr<int> free_port = FreePort(all_interfaces ? "0.0.0.0" : host);
      if (!free_port.ok()) return free_port.status();
      chosen = std::to_string(*free_port);
    }
    // civetweb wants "PORT" (all interfaces) or "IP:PORT".
    const std::string ports = all_interfaces ? chosen : absl::StrCat(host, ":", chosen);
    const char* options[] = {"listening_ports", ports.c_str(), "num_threads", "2", nullptr};
    mg_init_data init{&callbacks, nullptr, options};
    unsigned error_code = 0;
    mg_error_data error{&error_code, error_text, sizeof(error_text)};
    exporter->context_ = mg_start2(&init, &error);
    if (!any_port) break;
  }
  if (exporter->context_ == nullptr) {
    return absl::UnavailableError(
        absl::StrCat("cannot serve metrics on ", listen, ": ", error_text));
  }
  mg_set_request_handler(exporter->context_, "/metrics", &HttpExporter::HandleMetrics,
                         exporter.get());
  mg_server_port bound[4];
  const int n = mg_get_server_ports(exporter->context_, 4, bound);
  if (n < 1) return absl::UnavailableError("metrics server reported no listening port");
  exporter->port_ = bound[0].port;
  if (host.empty() || host == "0.0.0.0") host = "127.0.0.1";
  exporter->address_ = absl::StrCat(host, ":", exporter->port_);
  return exporter;
}

HttpExporter::~HttpExporter() {
  if (context_ != nullptr) mg_stop(context_);
}

int HttpExporter::HandleMetrics(mg_connection* conn, void* self) {
  const auto* exporter = static_cast<const HttpExporter*>(self);
  const mg_request_info* info = mg_get_request_info(conn);
  if (std::string(info->request_method) != "GET") {
    mg_printf(conn, "HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n");
    return 405;
  }
  const std::string body = exporter->registry_->Serialize();
  mg_printf(conn,
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
            "Content-Length: %zu\r\nConnection: close\r\n\r\n",
            body.size());
  mg_write(conn, body.data(), body.size());
  return 200;
}

}  // namespace switchyard::metrics
