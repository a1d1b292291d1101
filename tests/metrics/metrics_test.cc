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

// What a histogram holds, read back through prometheus-cpp's Collect().
std::vector<uint64_t> CumulativeCounts(const Histogram& h) {
  std::vector<uint64_t> out;
  for (const auto& bucket : h.Collect().histogram.bucket) out.push_back(bucket.cumulative_count);
  return out;
}
double Sum(const Histogram& h) { return h.Collect().histogram.sample_sum; }
uint64_t Count(const Histogram& h) { return h.Collect().histogram.sample_count; }

TEST(MetricsTest, CountersGaugesHistograms) {
  Registry r;
  Counter& c = AddCounter(r, "switchyard_test_total", "A counter.").Add({{"kind", "a"}});
  c.Increment();
  c.Increment(2.5);
  c.Increment(-7);  // ignored: counters never go down
  EXPECT_DOUBLE_EQ(c.Value(), 3.5);
  Gauge& g = AddGauge(r, "switchyard_test_gauge", "A gauge.").Add({});
  g.Set(10);
  g.Decrement(3);
  EXPECT_DOUBLE_EQ(g.Value(), 7);
  Histogram& h = AddHistogram(r, "switchyard_test_seconds", "A histogram.")
                     .Add({}, Histogram::BucketBoundaries{0.1, 1.0});
  for (double v : {0.05, 0.1, 0.5, 2.0}) h.Observe(v);
  EXPECT_EQ(CumulativeCounts(h), (std::vector<uint64_t>{2, 3, 4}));
  EXPECT_DOUBLE_EQ(Sum(h), 2.65);
  EXPECT_EQ(Count(h), 4u);
}

// prometheus-cpp's TextSerializer writes a histogram's _count and _sum before
// its buckets; HELP is escaped by metrics::AddCounter, label values by the
// serializer.
TEST(MetricsTest, TextFormatIsExact) {
  Registry r;
  AddCounter(r, "switchyard_requests_total", "Requests\nby outcome.")
      .Add({{"outcome", "o\"k\\"}})
      .Increment(3);
  AddHistogram(r, "switchyard_latency_seconds", "Latency.")
      .Add({}, Histogram::BucketBoundaries{0.5})
      .Observe(0.25);
  EXPECT_EQ(Serialize(r),
            "# HELP switchyard_requests_total Requests\\nby outcome.\n"
            "# TYPE switchyard_requests_total counter\n"
            "switchyard_requests_total{outcome=\"o\\\"k\\\\\"} 3\n"
            "# HELP switchyard_latency_seconds Latency.\n"
            "# TYPE switchyard_latency_seconds histogram\n"
            "switchyard_latency_seconds_count 1\n"
            "switchyard_latency_seconds_sum 0.25\n"
            "switchyard_latency_seconds_bucket{le=\"0.5\"} 1\n"
            "switchyard_latency_seconds_bucket{le=\"+Inf\"} 1\n");
}

// The exposition of a registry like the servers' (labelled counters and
// histograms, zero-valued children, escaped labels and HELP) passes
// `promtool check metrics` (Debian's prometheus package).
TEST(MetricsTest, PromtoolAcceptsTheExposition) {
  Registry r;
  auto& requests = AddCounter(r, "switchyard_test_requests_total",
                              "Requests by method and outcome (\"quoted\", back\\slash).");
  requests.Add({{"method", "Generate"}, {"outcome", "ok"}}).Increment(2);
  requests.Add({{"method", "Generate"}, {"outcome", "line\nbreak \"q\" \\"}});
  AddGauge(r, "switchyard_test_build_info", "Always 1.")
      .Add({{"version", "0.1.0"}, {"role", "gateway"}})
      .Set(1);
  AddGauge(r, "switchyard_test_waiting_requests", "Requests waiting.").Add({}).Decrement(0);
  auto& latency = AddHistogram(r, "switchyard_test_call_duration_seconds", "Call latency.");
  for (int e = 0; e < 3; ++e) latency.Add({{"expert", std::to_string(e)}}, LatencyBuckets());
  latency.Add({{"expert", "1"}}, LatencyBuckets()).Observe(0.003);
  AddHistogram(r, "switchyard_test_step_tokens", "Tokens per step.")
      .Add({}, ExponentialBuckets(1, 2, 14))
      .Observe(17);
  AddCounter(r, "switchyard_test_unused_total", "A family without children.");
  const std::string text = Serialize(r);
  const std::string path = ::testing::TempDir() + "/metrics_test_exposition.txt";
  std::FILE* f = std::fopen(path.c_str(), "w");
  ASSERT_NE(f, nullptr);
  std::fwrite(text.data(), 1, text.size(), f);
  std::fclose(f);
  std::FILE* p = popen(("promtool check metrics < " + path + " 2>&1").c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string output;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) output.append(buf, n);
  EXPECT_EQ(pclose(p), 0) << "promtool check metrics:\n" << output << "\non:\n" << text;
  // Every child created up front is exposed, with 0.
  EXPECT_NE(text.find("switchyard_test_call_duration_seconds_count{expert=\"2\"} 0\n"),
            std::string::npos)
      << text;
  EXPECT_NE(
      text.find("switchyard_test_call_duration_seconds_bucket{expert=\"1\",le=\"0.0032\"} 1\n"),
      std::string::npos)
      << text;
  EXPECT_NE(text.find("switchyard_test_step_tokens_bucket{le=\"+Inf\"} 1\n"), std::string::npos)
      << text;
  // A family without children is announced (HELP and TYPE, no samples).
  EXPECT_NE(text.find("# HELP switchyard_test_unused_total A family without children.\n"
                      "# TYPE switchyard_test_unused_total counter\n"),
            std::string::npos)
      << text;
  EXPECT_EQ(text.find("\nswitchyard_test_unused_total"), std::string::npos) << text;
}

TEST(MetricsTest, ConcurrentUpdatesAreNotLost) {
  Registry r;
  auto& family = AddCounter(r, "switchyard_c_total", "c");
  Histogram& h = AddHistogram(r, "switchyard_h_seconds", "h").Add({}, LatencyBuckets());
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] {
      Counter& mine = family.Add({{"t", std::to_string(t % 2)}});
      for (int i = 0; i < 10000; ++i) {
        mine.Increment();
        h.Observe(0.001);
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_DOUBLE_EQ(family.Add({{"t", "0"}}).Value() + family.Add({{"t", "1"}}).Value(), 80000);
  EXPECT_EQ(Count(h), 80000u);
  EXPECT_NEAR(Sum(h), 80.0, 1e-6);
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
  AddGauge(r, "switchyard_up", "Up.").Add({}).Set(1);
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
  AddGauge(r, "switchyard_up", "Up.").Add({}).Set(1);
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
  AddGauge(r, "switchyard_up", "Up.").Add({}).Set(1);
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
  AddGauge(r, "switchyard_up", "Up.").Add({}).Set(1);
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
