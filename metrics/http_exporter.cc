#include "metrics/http_exporter.h"

#include <civetweb.h>

#include <mutex>

#include "absl/strings/str_cat.h"

namespace switchyard::metrics {
namespace {

std::once_flag init_once;

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
  // civetweb wants "PORT" (all interfaces) or "IP:PORT".
  const std::string ports = (host.empty() || host == "0.0.0.0") ? port : listen;
  const char* options[] = {"listening_ports", ports.c_str(), "num_threads", "2", nullptr};
  mg_callbacks callbacks{};
  exporter->context_ = mg_start(&callbacks, nullptr, options);
  if (exporter->context_ == nullptr) {
    return absl::UnavailableError(absl::StrCat("cannot serve metrics on ", listen,
                                               " (address in use or invalid)"));
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
