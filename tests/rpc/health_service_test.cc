// rpc::HealthService through a real in-process server: Check, Watch, status
// changes, and the end of every Watch at shutdown.
#include "rpc/health_service.h"

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <optional>
#include <thread>
#include <vector>

#include "gtest/gtest.h"
#include "rpc/server.h"

namespace switchyard::rpc {
namespace {

using grpc::health::v1::Health;
using grpc::health::v1::HealthCheckRequest;
using grpc::health::v1::HealthCheckResponse;

constexpr char kService[] = "switchyard.v1.ExpertService";

HealthCheckRequest Request(const std::string& service) {
  HealthCheckRequest r;
  r.set_service(service);
  return r;
}

// A Watch call read one message at a time.
class Watch {
 public:
  Watch(Health::Stub* stub, const std::string& service) {
    ctx_.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    reader_ = stub->Watch(&ctx_, Request(service));
  }
  std::optional<HealthCheckResponse::ServingStatus> Next() {
    HealthCheckResponse r;
    if (!reader_->Read(&r)) return std::nullopt;
    return r.status();
  }
  grpc::Status Finish() { return reader_->Finish(); }
  void Cancel() { ctx_.TryCancel(); }

 private:
  grpc::ClientContext ctx_;
  std::unique_ptr<grpc::ClientReader<HealthCheckResponse>> reader_;
};

class HealthServiceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ServerOptions options;
    options.listen_address = "127.0.0.1:0";
    options.health_service_names = {kService};
    auto server = RunningServer::Start(options, {});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = *std::move(server);
    stub_ = Health::NewStub(
        grpc::CreateChannel(server_->address(), grpc::InsecureChannelCredentials()));
  }

  grpc::Status Check(const std::string& service, HealthCheckResponse* response) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    return stub_->Check(&ctx, Request(service), response);
  }

  std::unique_ptr<RunningServer> server_;
  std::unique_ptr<Health::Stub> stub_;
};

TEST_F(HealthServiceTest, CheckReportsEachNameAndRefusesUnknownOnes) {
  HealthCheckResponse r;
  ASSERT_TRUE(Check("", &r).ok());
  EXPECT_EQ(r.status(), HealthCheckResponse::SERVING);
  ASSERT_TRUE(Check(kService, &r).ok());
  EXPECT_EQ(r.status(), HealthCheckResponse::SERVING);
  server_->SetServing(false);
  ASSERT_TRUE(Check(kService, &r).ok());
  EXPECT_EQ(r.status(), HealthCheckResponse::NOT_SERVING);
  const grpc::Status unknown = Check("no.such.Service", &r);
  EXPECT_EQ(unknown.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_NE(unknown.error_message().find("no.such.Service"), std::string::npos);
}

TEST_F(HealthServiceTest, WatchSeesEveryChangeAndEndsAtShutdown) {
  Watch all(stub_.get(), "");
  Watch unknown(stub_.get(), "no.such.Service");
  EXPECT_EQ(all.Next(), HealthCheckResponse::SERVING);
  EXPECT_EQ(unknown.Next(), HealthCheckResponse::SERVICE_UNKNOWN);
  server_->SetServing(false);
  EXPECT_EQ(all.Next(), HealthCheckResponse::NOT_SERVING);
  server_->SetServing(false);  // no change, no message
  server_->SetServing(true);
  EXPECT_EQ(all.Next(), HealthCheckResponse::SERVING);

  const auto start = std::chrono::steady_clock::now();
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(20));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  // Without the watches' end it would take the whole 20 s deadline; gRPC may
  // take ~5 s of it to drain the idle connection.
  EXPECT_LT(seconds, 10.0) << "open watches held the shutdown";
  EXPECT_EQ(all.Next(), HealthCheckResponse::NOT_SERVING);
  EXPECT_EQ(all.Next(), std::nullopt);
  EXPECT_EQ(all.Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_EQ(unknown.Next(), std::nullopt);
  EXPECT_EQ(unknown.Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
}

TEST_F(HealthServiceTest, ManyWatchersChangesAndCancelsRaceSafely) {
  // Watchers that come and go while the status flips; then shutdown ends
  // the rest. Run under ASan by scripts/sanitize.sh.
  std::atomic<bool> stop{false};
  std::thread flipper([&] {
    for (int i = 0; !stop.load(); ++i) {
      server_->SetServing(i % 2 == 0);
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  });
  std::vector<std::thread> clients;
  for (int t = 0; t < 4; ++t) {
    clients.emplace_back([&] {
      for (int i = 0; i < 20; ++i) {
        Watch w(stub_.get(), i % 3 == 0 ? "" : kService);
        EXPECT_TRUE(w.Next().has_value());
        w.Cancel();
        while (w.Next().has_value()) {
        }
        const grpc::StatusCode code = w.Finish().error_code();
        EXPECT_TRUE(code == grpc::StatusCode::CANCELLED || code == grpc::StatusCode::UNAVAILABLE)
            << code;
      }
    });
  }
  for (auto& c : clients) c.join();
  std::vector<std::unique_ptr<Watch>> open;
  for (int i = 0; i < 8; ++i) {
    open.push_back(std::make_unique<Watch>(stub_.get(), ""));
    EXPECT_TRUE(open.back()->Next().has_value());
  }
  stop = true;
  flipper.join();
  server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(20));
  for (auto& w : open) {
    while (w->Next().has_value()) {
    }
    EXPECT_EQ(w->Finish().error_code(), grpc::StatusCode::UNAVAILABLE);
  }
}

TEST_F(HealthServiceTest, CancelsThatCrossAWriteInFlightEndEachWatchOnce) {
  // Cancels land at any point of a write, including between Pump claiming a
  // write and starting it: the watch must end exactly once (CANCELLED), never
  // writing after its Finish. The status flips as fast as it can so a write
  // is nearly always in flight. Meant for the TSan/ASan builds
  // (scripts/sanitize.sh), where a write after Finish is a reported error.
  std::atomic<bool> stop{false};
  std::thread flipper([&] {
    for (int i = 0; !stop.load(); ++i) server_->SetServing(i % 2 == 0);
  });
  std::vector<std::thread> clients;
  for (int t = 0; t < 4; ++t) {
    clients.emplace_back([&, t] {
      for (int i = 0; i < 40; ++i) {
        Watch w(stub_.get(), kService);
        // Cancel after 0, 1 or 2 messages read: before, during and between writes.
        for (int read = 0; read < (i + t) % 3; ++read) {
          if (!w.Next().has_value()) break;
        }
        w.Cancel();
        while (w.Next().has_value()) {
        }
        EXPECT_EQ(w.Finish().error_code(), grpc::StatusCode::CANCELLED);
      }
    });
  }
  for (auto& c : clients) c.join();
  stop = true;
  flipper.join();
  // Every cancelled watcher was forgotten: shutdown does not wait for any.
  HealthCheckResponse r;
  EXPECT_TRUE(Check("", &r).ok());
}

}  // namespace
}  // namespace switchyard::rpc
