// The metrics module: semantics, the text format, thread-safety, and the
// HTTP endpoint.
#include "metrics/metrics.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "metrics/http_exporter.h"

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

// A connected TCP socket to 127.0.0.1:port, or -1.
int Connect(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// Reads until the server closes the connection.
std::string ReadAll(int fd) {
  std::string resp;
  char buf[4096];
  ssize_t n;
  while ((n = read(fd, buf, sizeof(buf))) > 0) resp.append(buf, n);
  return resp;
}

// Sends `request` as is and returns the whole reply.
std::string RawRequest(int port, const std::string& request) {
  const int fd = Connect(port);
  if (fd < 0) return "";
  (void)!write(fd, request.data(), request.size());
  std::string resp = ReadAll(fd);
  close(fd);
  return resp;
}

std::string HttpGet(int port, const std::string& path) {
  return RawRequest(port, "GET " + path + " HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
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

TEST(HttpExporterTest, AnswersOtherPathsMethodsAndMalformedRequestsClearly) {
  Registry r;
  r.AddGauge("switchyard_up", "Up.").Add({}).Set(1);
  auto exporter = HttpExporter::Start("127.0.0.1:0", &r);
  ASSERT_TRUE(exporter.ok()) << exporter.status();
  const int port = (*exporter)->port();
  EXPECT_NE(HttpGet(port, "/metrics?name[]=x").find("switchyard_up 1\n"), std::string::npos);
  const std::string missing = HttpGet(port, "/");
  EXPECT_EQ(missing.rfind("HTTP/1.1 404 Not Found\r\n", 0), 0u) << missing;
  EXPECT_NE(missing.find("metrics are at /metrics"), std::string::npos) << missing;
  const std::string post = RawRequest(port, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
  EXPECT_EQ(post.rfind("HTTP/1.1 405 Method Not Allowed\r\n", 0), 0u) << post;
  EXPECT_NE(post.find("Allow: GET, HEAD\r\n"), std::string::npos) << post;
  const std::string head = RawRequest(port, "HEAD /metrics HTTP/1.1\r\n\r\n");
  EXPECT_EQ(head.rfind("HTTP/1.1 200 OK\r\n", 0), 0u) << head;
  EXPECT_EQ(head.find("switchyard_up"), std::string::npos) << "HEAD has no body: " << head;
  EXPECT_NE(head.find("Content-Length: "), std::string::npos) << head;
  const std::string garbage = RawRequest(port, "hello\r\n\r\n");
  EXPECT_EQ(garbage.rfind("HTTP/1.1 400 Bad Request\r\n", 0), 0u) << garbage;
  const std::string huge =
      RawRequest(port, "GET /metrics HTTP/1.1\r\nX-Big: " + std::string(20000, 'a') + "\r\n\r\n");
  EXPECT_EQ(huge.rfind("HTTP/1.1 431 ", 0), 0u) << huge.substr(0, 80);
  // Still serving after all of that.
  EXPECT_NE(HttpGet(port, "/metrics").find("200 OK"), std::string::npos);
}

TEST(HttpExporterTest, SilentClientsNeitherBlockScrapesNorTheShutdown) {
  Registry r;
  r.AddGauge("switchyard_up", "Up.").Add({}).Set(1);
  auto exporter = HttpExporter::Start("127.0.0.1:0", &r);
  ASSERT_TRUE(exporter.ok()) << exporter.status();
  const int port = (*exporter)->port();
  // More silent connections than the exporter serves at once: the extra ones
  // are told 503, and a scrape still gets through once a slot frees up.
  std::vector<int> silent;
  for (int i = 0; i < HttpExporter::kMaxConnections; ++i) {
    silent.push_back(Connect(port));
    ASSERT_GE(silent.back(), 0);
  }
  std::string over_limit;
  for (int attempt = 0; attempt < 50; ++attempt) {  // until the acceptor saw all of them
    over_limit = HttpGet(port, "/metrics");
    if (over_limit.rfind("HTTP/1.1 503 ", 0) == 0) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(over_limit.rfind("HTTP/1.1 503 Service Unavailable\r\n", 0), 0u) << over_limit;
  // The exporter drops silent clients after kRequestTimeoutMs.
  const std::string dropped = ReadAll(silent[0]);
  EXPECT_EQ(dropped, "") << "a client that sent nothing gets no reply";
  std::string scrape;
  for (int attempt = 0; attempt < 100 && scrape.find("200 OK") == std::string::npos; ++attempt) {
    scrape = HttpGet(port, "/metrics");
    if (scrape.find("200 OK") == std::string::npos) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  EXPECT_NE(scrape.find("switchyard_up 1\n"), std::string::npos) << scrape;
  // Stopping with connections open ends them; it does not wait for them.
  for (int& fd : silent) {
    close(fd);
    fd = Connect(port);
  }
  exporter->reset();
  for (int fd : silent) {
    if (fd >= 0) close(fd);
  }
  EXPECT_EQ(Connect(port), -1) << "the port is closed after the exporter stops";
}

TEST(HttpExporterTest, ListensOnEveryInterfaceAndOnIpv6) {
  Registry r;
  r.AddGauge("switchyard_up", "Up.").Add({}).Set(1);
  auto any = HttpExporter::Start(":0", &r);
  ASSERT_TRUE(any.ok()) << any.status();
  EXPECT_EQ((*any)->address(), "127.0.0.1:" + std::to_string((*any)->port()));
  EXPECT_NE(HttpGet((*any)->port(), "/metrics").find("switchyard_up 1"), std::string::npos);
  auto v6 = HttpExporter::Start("[::1]:0", &r);
  if (v6.ok()) {
    EXPECT_EQ((*v6)->address(), "[::1]:" + std::to_string((*v6)->port()));
  } else {
    std::printf("no IPv6 loopback here: %s\n", std::string(v6.status().message()).c_str());
  }
  for (const char* bad : {"127.0.0.1:http", "127.0.0.1:70000", "127.0.0.1:", "[::1:0"}) {
    auto s = HttpExporter::Start(bad, &r);
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument) << bad;
    EXPECT_NE(std::string(s.status().message()).find(bad), std::string::npos) << s.status();
  }
}

}  // namespace
}  // namespace switchyard::metrics
