// The metrics module: semantics, the text format, thread-safety, and the
// HTTP endpoint.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "metrics/http_exporter.h"
#include "metrics/metrics.h"

namespace switchyard::metrics {
namespace {

TEST(MetricsTest, CountersGaugesHistograms) {
  Registry r;
  Counter& c = r.AddCounter("switchyard_test_total", "A counter.", {"kind"}).Add({"a"});
  c.Increment();
  c.Increment(2.5);
  c.Increment(-7);  // ignored: counters never go down
  EXPECT_DOUBLE_EQ(c.Value(), 3.5);
  Gauge& g = r.AddGauge("switchyard_test_gauge", "A gauge.").Add({});
  g.Set(10);
  g.Decrement(3);
  EXPECT_DOUBLE_EQ(g.Value(), 7);
  Histogram& h = r.AddHistogram("switchyard_test_seconds", "A histogram.", {0.1, 1.0}).Add({});
  for (double v : {0.05, 0.1, 0.5, 2.0}) h.Observe(v);
  EXPECT_EQ(h.CumulativeCounts(), (std::vector<uint64_t>{2, 3, 4}));
  EXPECT_DOUBLE_EQ(h.Sum(), 2.65);
  EXPECT_EQ(h.Count(), 4u);
}

TEST(MetricsTest, TextFormatIsExact) {
  Registry r;
  r.AddCounter("switchyard_requests_total", "Requests\nby outcome.", {"outcome"})
      .Add({"o\"k\\"})
      .Increment(3);
  r.AddHistogram("switchyard_latency_seconds", "Latency.", {0.5}).Add({}).Observe(0.25);
  EXPECT_EQ(r.Serialize(),
            "# HELP switchyard_requests_total Requests\\nby outcome.\n"
            "# TYPE switchyard_requests_total counter\n"
            "switchyard_requests_total{outcome=\"o\\\"k\\\\\"} 3\n"
            "# HELP switchyard_latency_seconds Latency.\n"
            "# TYPE switchyard_latency_seconds histogram\n"
            "switchyard_latency_seconds_bucket{le=\"0.5\"} 1\n"
            "switchyard_latency_seconds_bucket{le=\"+Inf\"} 1\n"
            "switchyard_latency_seconds_sum 0.25\n"
            "switchyard_latency_seconds_count 1\n");
}

TEST(MetricsTest, ConcurrentUpdatesAreNotLost) {
  Registry r;
  auto& family = r.AddCounter("switchyard_c_total", "c", {"t"});
  Histogram& h = r.AddHistogram("switchyard_h_seconds", "h", LatencyBuckets()).Add({});
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      Counter& mine = family.Add({std::to_string(t % 2)});
      for (int i = 0; i < 10000; ++i) {
        mine.Increment();
        h.Observe(0.001);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_DOUBLE_EQ(family.Add({"0"}).Value() + family.Add({"1"}).Value(), 80000);
  EXPECT_EQ(h.Count(), 80000u);
  EXPECT_NEAR(h.Sum(), 80.0, 1e-6);
}

std::string HttpGet(int port, const std::string& path) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) return "";
  const std::string req = "GET " + path + " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
  (void)!write(fd, req.data(), req.size());
  std::string resp;
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) resp.append(buf, n);
  close(fd);
  return resp;
}

TEST(HttpExporterTest, ServesMetricsOnAFreePort) {
  Registry r;
  r.AddGauge("switchyard_up", "Up.").Add({}).Set(1);
  auto exporter = HttpExporter::Start("127.0.0.1:0", &r);
  ASSERT_TRUE(exporter.ok()) << exporter.status();
  ASSERT_GT((*exporter)->port(), 0);
  const std::string resp = HttpGet((*exporter)->port(), "/metrics");
  EXPECT_NE(resp.find("200 OK"), std::string::npos) << resp;
  EXPECT_NE(resp.find("text/plain; version=0.0.4"), std::string::npos);
  EXPECT_NE(resp.find("switchyard_up 1\n"), std::string::npos) << resp;
  // A second exporter on the same port is refused with a clear error.
  auto clash = HttpExporter::Start("127.0.0.1:" + std::to_string((*exporter)->port()), &r);
  EXPECT_FALSE(clash.ok());
  auto bad = HttpExporter::Start("nonsense", &r);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace switchyard::metrics
