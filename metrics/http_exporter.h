// Serves a Registry as Prometheus text at GET /metrics over HTTP, with
// Debian's civetweb.
//
// Thread-safety: thread-safe; civetweb serves requests on its own threads.
#ifndef SWITCHYARD_METRICS_HTTP_EXPORTER_H_
#define SWITCHYARD_METRICS_HTTP_EXPORTER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "metrics/metrics.h"

struct mg_context;
struct mg_connection;

namespace switchyard::metrics {

class HttpExporter {
 public:
  // listen: "HOST:PORT"; port 0 picks a free one. The registry must outlive
  // the exporter.
  static absl::StatusOr<std::unique_ptr<HttpExporter>> Start(const std::string& listen,
                                                             const Registry* registry);
  ~HttpExporter();

  int port() const { return port_; }
  // "HOST:PORT" to scrape (0.0.0.0 reported as 127.0.0.1).
  const std::string& address() const { return address_; }

 private:
  HttpExporter() = default;
  static int HandleMetrics(::mg_connection* conn, void* self);

  mg_context* context_ = nullptr;
  const Registry* registry_ = nullptr;
  int port_ = 0;
  std::string address_;
};

}  // namespace switchyard::metrics

#endif  // SWITCHYARD_METRICS_HTTP_EXPORTER_H_
