// TLS on frame sockets (rpc/frame_socket.h, rpc/tls.h): frames inside
// mutual TLS over real TCP with a reader and a writer at once, every way a
// handshake fails and what it says, and the errors for bad files. The
// sanitizer runs (scripts/sanitize.sh) include it. A gateway's expert calls
// on TLS frames: tests/security/frames_over_tls_test.cc.
#include <sys/socket.h>

#include <cstdio>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "rpc/frame_socket.h"
#include "rpc/tls.h"
#include "tests/security/test_pki.h"
#include "tests/test_util.h"

namespace switchyard {
namespace {

using testing::ClientFiles;
using testing::ClientTls;
using ::testing::HasSubstr;
using testing::Pki;
using testing::ServerFiles;
using testing::ServerTls;

absl::Time In(absl::Duration d) { return absl::Now() + d; }

// What a server's status says until its connection ran.
absl::Status NotRun() { return absl::UnknownError("the server's side never ran"); }

// A TCP frame listener whose first accepted connection runs `serve` on a
// thread of its own.
class OneConnectionServer {
 public:
  explicit OneConnectionServer(std::function<void(rpc::FrameSocket&)> serve) {
    int port = 0;
    absl::StatusOr<rpc::FrameSocket> listener = rpc::ListenFrames("127.0.0.1:0", &port);
    EXPECT_TRUE(listener.ok()) << listener.status();
    if (!listener.ok()) return;
    listener_ = std::move(*listener);
    address_ = absl::StrCat("127.0.0.1:", port);
    thread_ = std::thread([this, serve = std::move(serve)] {
      absl::StatusOr<rpc::FrameSocket> accepted = rpc::AcceptFrames(listener_.fd());
      if (accepted.ok()) serve(*accepted);
    });
  }
  ~OneConnectionServer() {
    // Wakes an accept no client came to (a test that failed early).
    if (listener_.valid() && thread_.joinable()) shutdown(listener_.fd(), SHUT_RDWR);
    if (thread_.joinable()) thread_.join();
  }
  // Waits until `serve` has run (a client must have dialled).
  void Join() { thread_.join(); }
  const std::string& address() const { return address_; }

 private:
  rpc::FrameSocket listener_;
  std::string address_;
  std::thread thread_;
};

// Frame i of the round-trip test: over four TLS records (16 KiB each).
std::string Payload(int i) { return std::string(70000 + i, static_cast<char>('a' + i % 26)); }

TEST(FrameTlsTest, FramesCrossMutualTlsWithAReaderAndAWriterAtOnce) {
  const auto server_tls = ServerTls(ServerFiles(), /*require_client_cert=*/true);
  const auto client_tls = ClientTls(ClientFiles());
  ASSERT_NE(server_tls, nullptr);
  ASSERT_NE(client_tls, nullptr);
  constexpr int kFrames = 24;
  // The certificate names both; an IP is checked against its IP entries.
  for (const std::string host : {"localhost", "127.0.0.1"}) {
    SCOPED_TRACE(host);
    absl::Status server_handshake = NotRun();
    int server_matched = 0;
    int matched = 0;
    {
      OneConnectionServer server([&](rpc::FrameSocket& s) {
        server_handshake = rpc::StartServerTls(s, *server_tls, In(absl::Seconds(10)));
        if (!server_handshake.ok()) return;
        // Replies written by another thread while this one reads: how the
        // expert's frame server uses a connection under load.
        std::thread writer([&] {
          for (int i = 0; i < kFrames; ++i) {
            ASSERT_TRUE(rpc::WriteFrame(s, Payload(i), In(absl::Seconds(10))).ok());
          }
        });
        for (int i = 0; i < kFrames; ++i) {
          std::string got;
          if (!rpc::ReadFrame(s, 1 << 20, In(absl::Seconds(10)), &got).ok()) break;
          server_matched += got == Payload(i);
        }
        writer.join();
      });
      absl::StatusOr<rpc::FrameSocket> socket =
          rpc::DialFrames(server.address(), In(absl::Seconds(5)));
      ASSERT_TRUE(socket.ok()) << socket.status();
      EXPECT_FALSE(socket->tls());
      const absl::Status handshake =
          rpc::StartClientTls(*socket, *client_tls, host, In(absl::Seconds(10)));
      ASSERT_TRUE(handshake.ok()) << handshake;
      EXPECT_TRUE(socket->tls());
      std::thread writer([&] {
        for (int i = 0; i < kFrames; ++i) {
          ASSERT_TRUE(rpc::WriteFrame(*socket, Payload(i), In(absl::Seconds(10))).ok());
        }
      });
      for (int i = 0; i < kFrames; ++i) {
        ASSERT_TRUE(rpc::WaitReadable(*socket, In(absl::Seconds(10))));
        std::string got;
        const absl::Status read = rpc::ReadFrame(*socket, 1 << 20, In(absl::Seconds(10)), &got);
        EXPECT_TRUE(read.ok()) << read;
        if (!read.ok()) break;
        matched += got == Payload(i);
      }
      writer.join();
      // A frame read whole leaves nothing decrypted behind.
      EXPECT_FALSE(socket->HasBufferedInput());
      server.Join();
    }
    EXPECT_TRUE(server_handshake.ok()) << server_handshake;
    EXPECT_EQ(matched, kFrames);
    EXPECT_EQ(server_matched, kFrames);
  }
}

// What each end of a failed handshake says.
struct HandshakeOutcome {
  absl::Status client;  // StartClientTls, then reading the greeting
  absl::Status server;  // StartServerTls
};

// A server with `server_tls` (a greeting after its handshake) and a client
// with `client_tls` verifying `host`.
HandshakeOutcome Handshake(const rpc::FrameTlsContext& server_tls,
                           const rpc::FrameTlsContext& client_tls, const std::string& host) {
  HandshakeOutcome out{.client = NotRun(), .server = NotRun()};
  OneConnectionServer server([&](rpc::FrameSocket& s) {
    out.server = rpc::StartServerTls(s, server_tls, In(absl::Seconds(5)));
    if (out.server.ok()) out.server = rpc::WriteFrame(s, "hello", In(absl::Seconds(5)));
  });
  absl::StatusOr<rpc::FrameSocket> socket = rpc::DialFrames(server.address(), In(absl::Seconds(5)));
  if (!socket.ok()) {
    out.client = socket.status();
    return out;
  }
  out.client = rpc::StartClientTls(*socket, client_tls, host, In(absl::Seconds(5)));
  std::string greeting;
  if (out.client.ok()) out.client = rpc::ReadFrame(*socket, 64, In(absl::Seconds(5)), &greeting);
  if (out.client.ok() && greeting != "hello") out.client = absl::DataLossError(greeting);
  socket->Close();
  server.Join();
  return out;
}

TEST(FrameTlsTest, FailedHandshakesSayWhy) {
  const auto mutual = ServerTls(ServerFiles(), /*require_client_cert=*/true);
  const auto client = ClientTls(ClientFiles());
  ASSERT_NE(mutual, nullptr);
  ASSERT_NE(client, nullptr);
  {  // the server's certificate from a CA the client does not trust
    const auto trusts_other_ca = ClientTls({.cert_file = Pki("client.pem"),
                                            .key_file = Pki("client.key"),
                                            .ca_file = Pki("wrong-ca.pem")});
    const HandshakeOutcome o = Handshake(*mutual, *trusts_other_ca, "localhost");
    std::printf("[ other CA ] client: %s\n", o.client.ToString().c_str());
    EXPECT_EQ(o.client.code(), absl::StatusCode::kUnavailable);
    EXPECT_THAT(o.client.message(), HasSubstr("certificate verify failed"));
    EXPECT_FALSE(o.server.ok());
  }
  {  // a certificate that does not name the host dialled
    const HandshakeOutcome o =
        Handshake(*mutual, *client, "switchyard-expert-0.switchyard.svc.cluster.local");
    std::printf("[ other name ] client: %s\n", o.client.ToString().c_str());
    EXPECT_EQ(o.client.code(), absl::StatusCode::kUnavailable);
    EXPECT_THAT(o.client.message(), HasSubstr("hostname mismatch"));
    const HandshakeOutcome ip = Handshake(*mutual, *client, "10.0.0.1");
    EXPECT_THAT(ip.client.message(), HasSubstr("IP address mismatch"));
  }
  {  // mutual TLS: a client without a certificate, and one from another CA
    const auto anonymous = ClientTls({.ca_file = Pki("ca.pem")});
    const HandshakeOutcome o = Handshake(*mutual, *anonymous, "localhost");
    std::printf("[ no client cert ] server: %s; client: %s\n", o.server.ToString().c_str(),
                o.client.ToString().c_str());
    EXPECT_EQ(o.server.code(), absl::StatusCode::kUnavailable);
    EXPECT_THAT(o.server.message(), HasSubstr("certificate"));
    EXPECT_FALSE(o.client.ok());  // TLS 1.3: refused after the client finished
    const auto foreign = ClientTls({.cert_file = Pki("wrong-client.pem"),
                                    .key_file = Pki("wrong-client.key"),
                                    .ca_file = Pki("ca.pem")});
    const HandshakeOutcome f = Handshake(*mutual, *foreign, "localhost");
    EXPECT_THAT(f.server.message(), HasSubstr("certificate verify failed"));
    EXPECT_FALSE(f.client.ok());
    // Without mutual TLS the anonymous client is welcome.
    const auto one_way = ServerTls({.cert_file = Pki("server.pem"), .key_file = Pki("server.key")},
                                   /*require_client_cert=*/false);
    const HandshakeOutcome w = Handshake(*one_way, *anonymous, "localhost");
    EXPECT_TRUE(w.client.ok()) << w.client;
    EXPECT_TRUE(w.server.ok()) << w.server;
  }
}

TEST(FrameTlsTest, PlaintextAndTlsDoNotMixAndContextsKeepTheirSide) {
  const auto server_tls = ServerTls(ServerFiles(), /*require_client_cert=*/true);
  const auto client_tls = ClientTls(ClientFiles());
  ASSERT_NE(server_tls, nullptr);
  ASSERT_NE(client_tls, nullptr);
  {  // a TLS client at a plaintext frame socket (which greets at once)
    OneConnectionServer server(
        [](rpc::FrameSocket& s) { (void)rpc::WriteFrame(s, "token", In(absl::Seconds(5))); });
    auto socket = rpc::DialFrames(server.address(), In(absl::Seconds(5)));
    ASSERT_TRUE(socket.ok()) << socket.status();
    const absl::Status s =
        rpc::StartClientTls(*socket, *client_tls, "localhost", In(absl::Seconds(5)));
    std::printf("[ TLS client, plaintext server ] %s\n", s.ToString().c_str());
    EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
    EXPECT_THAT(s.message(), HasSubstr("TLS handshake failed"));
    EXPECT_FALSE(socket->tls());
  }
  {  // a plaintext client at a TLS frame socket
    absl::Status handshake = NotRun();
    {
      OneConnectionServer server([&](rpc::FrameSocket& s) {
        handshake = rpc::StartServerTls(s, *server_tls, In(absl::Seconds(5)));
      });
      auto socket = rpc::DialFrames(server.address(), In(absl::Seconds(5)));
      ASSERT_TRUE(socket.ok()) << socket.status();
      ASSERT_TRUE(rpc::WriteFrame(*socket, "a request", In(absl::Seconds(5))).ok());
      server.Join();
    }
    std::printf("[ plaintext client, TLS server ] %s\n", handshake.ToString().c_str());
    EXPECT_EQ(handshake.code(), absl::StatusCode::kUnavailable);
  }
  {  // a peer that never speaks: the handshake's deadline
    absl::Status handshake = NotRun();
    {
      OneConnectionServer server([&](rpc::FrameSocket& s) {
        handshake = rpc::StartServerTls(s, *server_tls, In(absl::Milliseconds(100)));
      });
      auto socket = rpc::DialFrames(server.address(), In(absl::Seconds(5)));
      ASSERT_TRUE(socket.ok()) << socket.status();
      server.Join();  // the socket stays open and silent meanwhile
    }
    EXPECT_EQ(handshake.code(), absl::StatusCode::kDeadlineExceeded) << handshake;
  }
  {  // after the handshake, the peer closing reads as closed, and writes fail without SIGPIPE
    absl::Status handshake = NotRun();
    OneConnectionServer server([&](rpc::FrameSocket& s) {
      handshake = rpc::StartServerTls(s, *server_tls, In(absl::Seconds(5)));
      s.Close();
    });
    auto socket = rpc::DialFrames(server.address(), In(absl::Seconds(5)));
    ASSERT_TRUE(socket.ok()) << socket.status();
    ASSERT_TRUE(rpc::StartClientTls(*socket, *client_tls, "localhost", In(absl::Seconds(5))).ok());
    std::string payload;
    const absl::Status read = rpc::ReadFrame(*socket, 64, In(absl::Seconds(5)), &payload);
    EXPECT_EQ(read.code(), absl::StatusCode::kUnavailable) << read;
    EXPECT_THAT(read.message(), HasSubstr("closed by the peer"));
    absl::Status write;
    for (int i = 0; i < 100 && write.ok(); ++i) {
      write = rpc::WriteFrame(*socket, std::string(4096, 'x'), In(absl::Seconds(5)));
    }
    EXPECT_EQ(write.code(), absl::StatusCode::kUnavailable) << write;
    server.Join();
    EXPECT_TRUE(handshake.ok()) << handshake;
  }
  rpc::FrameSocket unused;
  EXPECT_EQ(rpc::StartClientTls(unused, *server_tls, "localhost", In(absl::Seconds(1))).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(rpc::StartServerTls(unused, *client_tls, In(absl::Seconds(1))).code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(FrameTlsFilesTest, BadFilesAreNamedAsForGrpc) {
  const auto missing_key = rpc::FrameServerTlsFromFiles(
      {.cert_file = Pki("server.pem"), .key_file = Pki("missing.key")}, false);
  EXPECT_EQ(missing_key.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(missing_key.status().message(), HasSubstr(Pki("missing.key")));
  const auto other_key = rpc::FrameServerTlsFromFiles(
      {.cert_file = Pki("server.pem"), .key_file = Pki("client.key")}, false);
  EXPECT_THAT(other_key.status().message(), HasSubstr("does not match the certificate"));
  EXPECT_EQ(rpc::FrameServerTlsFromFiles(
                {.cert_file = Pki("server.pem"), .key_file = Pki("server.key")}, true)
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);  // client certificates without a CA
  EXPECT_EQ(rpc::FrameClientTlsFromFiles({.cert_file = Pki("client.pem"), .ca_file = Pki("ca.pem")})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);  // a certificate without its key
  const auto not_a_ca = rpc::FrameClientTlsFromFiles({.ca_file = Pki("server.key")});
  EXPECT_EQ(not_a_ca.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(not_a_ca.status().message(), HasSubstr("TLS CA file"));
}

}  // namespace
}  // namespace switchyard
