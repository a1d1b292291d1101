// Graceful shutdown of the real server binaries on SIGTERM:
//  - switchyard-expert with Forward calls queued and computing: health turns
//    NOT_SERVING, new calls are refused with UNAVAILABLE, every call in flight
//    completes with the right output, then the process exits 0 within its
//    grace period;
//  - switchyard-gateway (--experts local) with streams in flight: health
//    turns NOT_SERVING, new requests are refused with UNAVAILABLE while it
//    drains, every stream finishes with all its tokens, then it exits 0
//    within its grace period.
#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "core/model_config.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "rpc/tensor_codec.h"
#include "switchyard/v1/expert.grpc.pb.h"
#include "switchyard/v1/generation.grpc.pb.h"
#include "tests/faults/fault_util.h"
#include "tests/http_util.h"

namespace switchyard {
namespace {

using faults::Clock;
using faults::ServerProcess;
using grpc::health::v1::Health;
using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

constexpr int kGraceMs = 30000;

// Health of the whole server ("") by Check; nullopt if the call failed.
std::optional<HealthCheckResponse::ServingStatus> CheckHealth(
    const std::shared_ptr<grpc::Channel>& channel) {
  auto stub = Health::NewStub(channel);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  HealthCheckResponse response;
  if (!stub->Check(&ctx, HealthCheckRequest(), &response).ok()) return std::nullopt;
  return response.status();
}

// A health Watch of the whole server, opened before the signal: it sees the
// switch to NOT_SERVING even when the server stops taking new calls right after.
//
// The server ends the watch when it shuts down (UNAVAILABLE); Close() ends
// it from this side (see AnOpenHealthWatchDoesNotHoldTheShutdown below).
class HealthWatch {
 public:
  explicit HealthWatch(const std::shared_ptr<grpc::Channel>& channel)
      : stub_(Health::NewStub(channel)) {
    ctx_.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    reader_ = stub_->Watch(&ctx_, HealthCheckRequest());
  }
  ~HealthWatch() { Close(); }
  // Cancels the call unless the server ended it, and returns its status.
  grpc::Status Close() {
    if (closed_) return status_;
    closed_ = true;
    if (!ended_) ctx_.TryCancel();
    HealthCheckResponse ignored;
    while (reader_->Read(&ignored)) {
    }
    status_ = reader_->Finish();
    return status_;
  }
  // The next status reported; nullopt when the stream ended.
  std::optional<HealthCheckResponse::ServingStatus> Next() {
    HealthCheckResponse response;
    if (!reader_->Read(&response)) {
      ended_ = true;
      return std::nullopt;
    }
    return response.status();
  }

 private:
  std::unique_ptr<Health::Stub> stub_;
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReader<HealthCheckResponse>> reader_;
  bool closed_ = false;
  bool ended_ = false;  // Next() saw the end of the stream
  grpc::Status status_;
};

// True while something accepts TCP connections on HOST:PORT.
bool Accepting(const std::string& address) {
  const size_t colon = address.rfind(':');
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(std::stoi(address.substr(colon + 1))));
  inet_pton(AF_INET, address.substr(0, colon).c_str(), &addr.sin_addr);
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  const bool ok = connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  close(fd);
  return ok;
}

// The number in the first line "NAME VALUE" of Prometheus text, or -1.
double Scalar(const std::string& text, const std::string& name) {
  const size_t at = text.find("\n" + name + " ");
  if (at == std::string::npos) return -1;
  return std::stod(text.substr(at + name.size() + 2));
}

TEST(ShutdownTest, ExpertFinishesCallsInFlightOnSigtermRefusesNewOnesAndExitsZero) {
  ServerProcess expert;
  auto address =
      expert.Start(faults::ExpertArgv("0", "127.0.0.1:0",
                                      {"--workers", "1", "--grace-ms", std::to_string(kGraceMs),
                                       "--metrics-listen", "127.0.0.1:0"}));
  ASSERT_TRUE(address.ok()) << address.status();
  const std::string metrics = expert.Field("metrics");
  ASSERT_FALSE(metrics.empty());
  auto config = LoadModelConfig(testing::TinyMixtralDir());
  ASSERT_TRUE(config.ok()) << config.status();
  const int64_t d = config->hidden_size;

  // One big batch; its output computed once up front is the reference.
  constexpr int64_t kTokens = 16384;
  std::vector<float> x(kTokens * d);
  for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37 * i) * 0.5f;
  v1::ForwardRequest request;
  request.set_layer(0);
  request.set_expert(0);
  request.set_config_fingerprint(config->Fingerprint());
  rpc::EncodeMatrix(x.data(), kTokens, d, v1::DTYPE_F32, request.mutable_hidden_states());
  auto call_channel = faults::Dial(*address);
  auto stub = v1::ExpertService::NewStub(call_channel);
  v1::ForwardResponse reference;
  const auto t0 = Clock::now();
  {
    grpc::ClientContext ctx;
    const grpc::Status s = stub->Forward(&ctx, request, &reference);
    ASSERT_TRUE(s.ok()) << faults::Describe(s);
  }
  const double one_call = faults::SecondsSince(t0);
  // Enough calls that the single worker is busy for about 2 s after the signal.
  const int calls = std::clamp(static_cast<int>(std::ceil(2.0 / one_call)), 4, 48);
  std::printf("[ expert   ] one call of %lld tokens: %.3f s; %d calls in flight at SIGTERM\n",
              static_cast<long long>(kTokens), one_call, calls);

  auto health_channel = faults::Dial(*address);
  HealthWatch watch(health_channel);
  ASSERT_EQ(watch.Next(), HealthCheckResponse::SERVING);

  struct Call {
    grpc::ClientContext ctx;
    v1::ForwardResponse response;
    grpc::Status status;
    std::atomic<bool> done{false};
  };
  std::vector<std::unique_ptr<Call>> in_flight;
  std::atomic<int> completed{0};
  // However the test ends, no callback may outlive the calls.
  struct CancelOnExit {
    std::vector<std::unique_ptr<Call>>& calls;
    ~CancelOnExit() {
      for (auto& c : calls) c->ctx.TryCancel();
      for (auto& c : calls) {
        while (!c->done) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    }
  } cancel_on_exit{in_flight};
  for (int i = 0; i < calls; ++i) {
    in_flight.push_back(std::make_unique<Call>());
    Call* c = in_flight.back().get();
    c->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(120));
    stub->async()->Forward(&c->ctx, &request, &c->response, [c, &completed](grpc::Status s) {
      c->status = std::move(s);
      c->done = true;
      ++completed;
    });
  }
  // Signal only once the expert holds every call (queued or computing).
  const auto wait_start = Clock::now();
  double held = 0;
  while (faults::SecondsSince(wait_start) < 30) {
    held = Scalar(testing::HttpGetBody(metrics, "/metrics"), "switchyard_expert_calls_in_flight");
    if (held + completed >= calls) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  ASSERT_GE(held + completed, calls) << "the expert never held all calls";
  ASSERT_LT(completed.load(), calls) << "every call finished before the signal";

  const auto sigterm = Clock::now();
  expert.Signal(SIGTERM);
  EXPECT_EQ(watch.Next(), HealthCheckResponse::NOT_SERVING);
  watch.Close();
  const double not_serving_after = faults::SecondsSince(sigterm);

  // New calls are refused while the accepted ones drain: once the listener is
  // closed, a new connection is refused ...
  while (Accepting(*address) && faults::SecondsSince(sigterm) < 10) {
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  EXPECT_FALSE(Accepting(*address));
  {
    auto fresh = v1::ExpertService::NewStub(faults::Dial(*address));
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::ForwardResponse response;
    const grpc::Status s = fresh->Forward(&ctx, request, &response);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAVAILABLE) << faults::Describe(s);
  }
  // ... and so is a new call on the connection that carries the calls in
  // flight. gRPC's own shutdown may refuse that stream before our handler
  // sees it, which the client reports as CANCELLED rather than UNAVAILABLE;
  // either way nothing is computed.
  {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::ForwardResponse response;
    const grpc::Status s = stub->Forward(&ctx, request, &response);
    EXPECT_TRUE(s.error_code() == grpc::StatusCode::UNAVAILABLE ||
                s.error_code() == grpc::StatusCode::CANCELLED)
        << faults::Describe(s);
    EXPECT_FALSE(response.has_output());
  }
  const int completed_at_refusal = completed;
  EXPECT_LT(completed_at_refusal, calls) << "the refusals were not checked during the drain";

  const std::optional<int> status = expert.WaitExit(std::chrono::milliseconds(kGraceMs + 10000));
  const double exited_after = faults::SecondsSince(sigterm);
  ASSERT_TRUE(status.has_value()) << "the expert did not exit";
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << "wait status " << *status;
  EXPECT_LT(exited_after, kGraceMs / 1000.0) << "it only exited when the grace period ran out";
  for (int i = 0; i < calls; ++i) {
    const Call& c = *in_flight[i];
    // The process is gone, so every callback has run or is about to.
    while (!c.done) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    ASSERT_TRUE(c.status.ok()) << "call " << i << ": " << faults::Describe(c.status);
    EXPECT_EQ(c.response.output().data(), reference.output().data()) << "call " << i;
  }
  std::printf(
      "[ expert   ] NOT_SERVING %.3f s after SIGTERM; %d of %d calls done when new ones "
      "were refused; all done and exit 0 after %.2f s (grace %d ms)\n",
      not_serving_after, completed_at_refusal, calls, exited_after, kGraceMs);
}

TEST(ShutdownTest, GatewayFinishesStreamsInFlightOnSigtermRefusesNewOnesAndExitsZero) {
  ServerProcess gateway;
  auto address =
      gateway.Start({faults::GatewayBinary(), "--model", testing::TinyMixtralDir(), "--listen",
                     "127.0.0.1:0", "--experts", "local", "--grace-ms", std::to_string(kGraceMs)});
  ASSERT_TRUE(address.ok()) << address.status();
  auto channel = faults::Dial(*address);
  ASSERT_EQ(CheckHealth(channel), HealthCheckResponse::SERVING);

  // Streams long enough to be in flight for a few seconds: sized from the speed
  // of the same number of short concurrent streams.
  const std::vector<std::string> prompts = faults::ReferencePrompts();
  constexpr int kStreams = 8;
  constexpr int kWarmTokens = 32;
  std::vector<v1::GenerateRequest> requests;
  for (int i = 0; i < kStreams; ++i) {
    requests.push_back(faults::GreedyRequest(prompts[i % prompts.size()], kWarmTokens));
  }
  const auto warm_start = Clock::now();
  {
    faults::ConcurrentStreams warm(channel, requests, /*min_tokens=*/1);
    warm.Join();
    for (const auto& o : warm.outcomes()) ASSERT_TRUE(o.status.ok()) << faults::Describe(o.status);
  }
  const double step_seconds = faults::SecondsSince(warm_start) / kWarmTokens;
  const int new_tokens =
      std::clamp(static_cast<int>(1.5 / std::max(step_seconds, 1e-4)), 100, 3000);
  for (auto& r : requests) r.mutable_stopping()->set_max_new_tokens(new_tokens);

  HealthWatch watch(faults::Dial(*address));
  ASSERT_EQ(watch.Next(), HealthCheckResponse::SERVING);
  faults::ConcurrentStreams streams(channel, requests, /*min_tokens=*/3);
  ASSERT_TRUE(streams.WaitAllStarted(std::chrono::seconds(60)));
  ASSERT_EQ(streams.finished(), 0);

  const auto sigterm = Clock::now();
  gateway.Signal(SIGTERM);
  EXPECT_EQ(watch.Next(), HealthCheckResponse::NOT_SERVING);
  watch.Close();
  // Polled health says so too while it drains.
  std::optional<HealthCheckResponse::ServingStatus> polled;
  while (faults::SecondsSince(sigterm) < 10) {
    polled = CheckHealth(channel);
    if (polled != HealthCheckResponse::SERVING) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_EQ(polled, HealthCheckResponse::NOT_SERVING);
  const double not_serving_after = faults::SecondsSince(sigterm);

  // New requests, unary and streaming, are refused with UNAVAILABLE.
  faults::UnaryOutcome refused = faults::Generate(channel, requests[0], std::chrono::seconds(10));
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::UNAVAILABLE)
      << faults::Describe(refused.status);
  faults::StreamOutcome refused_stream =
      faults::Stream(channel, requests[0], nullptr, std::chrono::seconds(10));
  EXPECT_EQ(refused_stream.status.error_code(), grpc::StatusCode::UNAVAILABLE)
      << faults::Describe(refused_stream.status);
  EXPECT_TRUE(refused_stream.tokens.empty());
  const int finished_at_refusal = streams.finished();
  EXPECT_LT(finished_at_refusal, kStreams) << "the refusals were not checked during the drain";

  streams.Join();
  for (int i = 0; i < kStreams; ++i) {
    const faults::StreamOutcome& o = streams.outcomes()[i];
    ASSERT_TRUE(o.status.ok()) << "stream " << i << ": " << faults::Describe(o.status);
    EXPECT_EQ(o.tokens.size(), static_cast<size_t>(new_tokens)) << i;
    EXPECT_EQ(o.finish_reason, v1::FINISH_REASON_LENGTH) << i;
    EXPECT_EQ(o.completion_tokens, static_cast<uint32_t>(new_tokens)) << i;
  }
  const std::optional<int> status = gateway.WaitExit(std::chrono::milliseconds(kGraceMs + 10000));
  const double exited_after = faults::SecondsSince(sigterm);
  ASSERT_TRUE(status.has_value()) << "the gateway did not exit";
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << "wait status " << *status;
  EXPECT_LT(exited_after, kGraceMs / 1000.0) << "it only exited when the grace period ran out";
  std::printf(
      "[ gateway  ] %d streams of %d tokens; NOT_SERVING %.3f s after SIGTERM; %d streams "
      "done when new requests were refused (%s); all done and exit 0 after %.2f s "
      "(grace %d ms)\n",
      kStreams, new_tokens, not_serving_after, finished_at_refusal,
      faults::Describe(refused.status).c_str(), exited_after, kGraceMs);
}

// A client watching health (gRPC client-side health checking, A17) sees
// NOT_SERVING and then the end of its stream, and does not hold the shutdown:
// gRPC's built-in health service (1.51) never ended a Watch, so the process
// waited out its whole grace period; rpc/health_service.h replaced it.
TEST(ShutdownTest, AnOpenHealthWatchDoesNotHoldTheShutdown) {
  constexpr int kLongGraceMs = 20000;
  ServerProcess expert;
  auto address = expert.Start(
      faults::ExpertArgv("0", "127.0.0.1:0", {"--grace-ms", std::to_string(kLongGraceMs)}));
  ASSERT_TRUE(address.ok()) << address.status();
  HealthWatch watch(faults::Dial(*address));
  ASSERT_EQ(watch.Next(), HealthCheckResponse::SERVING);
  const auto sigterm = Clock::now();
  expert.Signal(SIGTERM);
  EXPECT_EQ(watch.Next(), HealthCheckResponse::NOT_SERVING);
  std::printf("[ timing   ] NOT_SERVING after %.3f s\n", faults::SecondsSince(sigterm));
  EXPECT_EQ(watch.Next(), std::nullopt) << "the server ends the watch";
  std::printf("[ timing   ] end of watch after %.3f s\n", faults::SecondsSince(sigterm));
  EXPECT_EQ(watch.Close().error_code(), grpc::StatusCode::UNAVAILABLE);
  // Nothing is in flight but the watch: the expert should exit at once.
  const std::optional<int> status =
      expert.WaitExit(std::chrono::milliseconds(kLongGraceMs + 10000));
  ASSERT_TRUE(status.has_value());
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << "wait status " << *status;
  // gRPC 1.51 itself takes about 5 s to drain an idle client connection at
  // shutdown (measured here with a client that only made one Check call);
  // the open watch used to hold the process for the whole 20 s grace.
  EXPECT_LT(faults::SecondsSince(sigterm), 10.0) << "the open watch held the shutdown";
}

}  // namespace
}  // namespace switchyard
