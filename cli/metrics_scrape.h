// A minimal Prometheus scrape: GET http://HOST:PORT/metrics over a plain
// socket, for `switchyard bench --metrics` and `switchyard up --autoscale`.
//
// Thread-safety: thread-safe (no shared state).
#ifndef SWITCHYARD_CLI_METRICS_SCRAPE_H_
#define SWITCHYARD_CLI_METRICS_SCRAPE_H_

#include <string>

#include "absl/status/statusor.h"

namespace switchyard::cli {

// GET http://HOST:PORT/metrics with a 10 s socket timeout; the body, or
// UNAVAILABLE naming `what` (e.g. "--metrics "), the address and what failed.
absl::StatusOr<std::string> ScrapeMetrics(const std::string& host_port,
                                          const std::string& what = "");

}  // namespace switchyard::cli

#endif  // SWITCHYARD_CLI_METRICS_SCRAPE_H_
