// Serves a Registry as Prometheus text (prometheus-cpp's TextSerializer) at
// GET /metrics over HTTP/1.1.
//
// A small server of its own (POSIX sockets, one accept thread, a thread per
// connection, at most kMaxConnections at once, each closed after one reply)
// rather than prometheus-cpp's pull exposer, because scrapes are rare and tiny
// and because its threads must have ordinary stacks: the static thread-local
// storage of OpenBLAS and the CUDA runtime does not fit the fixed 100 KB
// worker stacks of the civetweb library that exposer runs on.
//
// Thread-safety: thread-safe; requests are served on the exporter's threads,
// which read the Registry (itself thread-safe). The destructor stops them.
#ifndef SWITCHYARD_METRICS_HTTP_EXPORTER_H_
#define SWITCHYARD_METRICS_HTTP_EXPORTER_H_

#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "metrics/metrics.h"

namespace switchyard::metrics {

class HttpExporter {
 public:
  // Connections served at once; more are answered 503 and closed.
  static constexpr int kMaxConnections = 16;
  // A client that sends no complete request head within this time is dropped.
  static constexpr int kRequestTimeoutMs = 5000;

  // listen: "HOST:PORT" (HOST an IPv4 or IPv6 address, a name, or empty for
  // every interface; "[::1]:PORT" for IPv6); port 0 picks a free one. The
  // registry must outlive the exporter. INVALID_ARGUMENT for a malformed
  // address, UNAVAILABLE when it cannot listen (port in use).
  static absl::StatusOr<std::unique_ptr<HttpExporter>> Start(const std::string& listen,
                                                             const Registry* registry);
  // Stops accepting, ends open connections and joins every thread.
  ~HttpExporter();

  int port() const { return port_; }
  // "HOST:PORT" to scrape (an all-interfaces host reported as 127.0.0.1).
  const std::string& address() const { return address_; }

 private:
  struct Connection;

  HttpExporter() = default;
  // Accepts until wake_fd_ is written, then ends and joins every connection.
  void AcceptLoop();
  // Reads one request head from fd and writes the reply (on its own thread).
  void Serve(int fd) const;
  // The reply to one request head: status line, headers and body.
  std::string Respond(const std::string& head) const;

  const Registry* registry_ = nullptr;
  int listen_fd_ = -1;
  int wake_fd_ = -1;  // eventfd: written once to stop the accept loop
  int port_ = 0;
  std::string address_;
  std::thread acceptor_;
};

}  // namespace switchyard::metrics

#endif  // SWITCHYARD_METRICS_HTTP_EXPORTER_H_
