// switchyard-delay-proxy (bench/delay_proxy.cc) as a process, between this
// test and an in-process TCP echo server: large random payloads cross it
// intact and in order both ways over several connections at once, half-closes
// pass through, a round trip takes at least twice the one-way delay (a lower
// bound only; speed is for benchmarks), bad flags get a clear error, and
// SIGTERM exits 0 with connections open.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "tests/process_util.h"

namespace switchyard {
namespace {

using Clock = std::chrono::steady_clock;

std::string ProxyBinary() { return testing::BinaryDir() + "/switchyard-delay-proxy"; }

int Port(int fd) {
  sockaddr_in a{};
  socklen_t length = sizeof(a);
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &length);
  return ntohs(a.sin_port);
}

int Connect(const std::string& address) {
  const size_t colon = address.rfind(':');
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(std::stoi(address.substr(colon + 1))));
  inet_pton(AF_INET, address.substr(0, colon).c_str(), &a.sin_addr);
  const int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    close(fd);
    return -1;
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  return fd;
}

bool SendAll(int fd, const char* data, size_t size) {
  while (size > 0) {
    const ssize_t n = send(fd, data, size, MSG_NOSIGNAL);
    if (n <= 0) return false;
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

// Reads until EOF (or an error); everything read.
std::string ReadToEof(int fd) {
  std::string out;
  char buffer[1 << 16];
  while (true) {
    const ssize_t n = recv(fd, buffer, sizeof(buffer), 0);
    if (n <= 0) return out;
    out.append(buffer, static_cast<size_t>(n));
  }
}

// A TCP echo server on 127.0.0.1: one thread per connection sends back what
// it reads and keeps a copy; on the client's FIN it closes its side too.
class EchoServer {
 public:
  EchoServer() {
    listener_ = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    bind(listener_, reinterpret_cast<sockaddr*>(&a), sizeof(a));
    listen(listener_, 64);
    address_ = absl::StrCat("127.0.0.1:", Port(listener_));
    acceptor_ = std::thread([this] {
      while (true) {
        const int fd = accept(listener_, nullptr, nullptr);
        if (fd < 0) return;  // shutdown() in the destructor
        std::lock_guard<std::mutex> lock(mu_);
        received_.push_back(std::make_unique<std::string>());
        std::string* copy = received_.back().get();
        handlers_.emplace_back([fd, copy] {
          char buffer[1 << 16];
          while (true) {
            const ssize_t n = recv(fd, buffer, sizeof(buffer), 0);
            if (n <= 0) break;
            copy->append(buffer, static_cast<size_t>(n));
            if (!SendAll(fd, buffer, static_cast<size_t>(n))) break;
          }
          shutdown(fd, SHUT_WR);
          close(fd);
        });
      }
    });
  }

  ~EchoServer() {
    shutdown(listener_, SHUT_RDWR);
    acceptor_.join();
    for (std::thread& t : handlers_) t.join();
    close(listener_);
  }

  const std::string& address() const { return address_; }
  // What each connection received, in accept order; read after its FIN.
  std::vector<std::string> Received() {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<std::string> out;
    for (const auto& r : received_) out.push_back(*r);
    return out;
  }

 private:
  int listener_ = -1;
  std::string address_;
  std::thread acceptor_;
  std::mutex mu_;
  std::vector<std::thread> handlers_;
  std::vector<std::unique_ptr<std::string>> received_;
};

// Runs `command` with sh; its exit code and (stdout + stderr) in *output.
int Sh(const std::string& command, std::string* output) {
  FILE* p = popen((command + " 2>&1").c_str(), "r");
  if (p == nullptr) return -1;
  std::string text;
  char buffer[4096];
  size_t n;
  while ((n = fread(buffer, 1, sizeof(buffer), p)) > 0) text.append(buffer, n);
  const int status = pclose(p);
  *output = text;
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

std::string RandomBytes(size_t size, uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::string out(size, '\0');
  for (size_t i = 0; i < size; i += 8) {
    const uint64_t v = rng();
    std::memcpy(out.data() + i, &v, std::min<size_t>(8, size - i));
  }
  return out;
}

TEST(DelayProxyTest, LargeRandomPayloadsCrossIntactAndInOrderOnSeveralConnectionsAtOnce) {
  EchoServer echo;
  testing::ChildProcess proxy;
  auto address = proxy.Start({ProxyBinary(), "--target", echo.address(), "--delay-us", "300"});
  ASSERT_TRUE(address.ok()) << address.status();

  constexpr int kConnections = 4;
  constexpr size_t kBytes = 8 << 20;  // well over the sockets' buffers: flow control too
  std::vector<std::string> sent(kConnections);
  std::vector<std::string> echoed(kConnections);
  std::vector<std::thread> clients;
  for (int i = 0; i < kConnections; ++i) {
    sent[i] = RandomBytes(kBytes + 1000 * i, 17 + i);  // unequal sizes
    clients.emplace_back([&, i] {
      const int fd = Connect(*address);
      if (fd < 0) return;
      // Read while writing: the echo comes back while the payload goes out.
      std::thread reader([&, fd] { echoed[i] = ReadToEof(fd); });
      // Many writes of odd sizes, so the proxy sees chunks of every size.
      size_t at = 0;
      std::mt19937 rng(i);
      while (at < sent[i].size()) {
        const size_t n = std::min<size_t>(1 + rng() % 200000, sent[i].size() - at);
        if (!SendAll(fd, sent[i].data() + at, n)) break;
        at += n;
      }
      shutdown(fd, SHUT_WR);  // the FIN crosses the proxy; the echo server then closes
      reader.join();
      close(fd);
    });
  }
  for (std::thread& t : clients) t.join();

  std::vector<std::string> received = echo.Received();
  ASSERT_EQ(received.size(), static_cast<size_t>(kConnections));
  for (int i = 0; i < kConnections; ++i) {
    // Client -> server: the server got exactly one client's bytes.
    bool matched = false;
    for (const std::string& r : received) matched = matched || r == sent[i];
    EXPECT_TRUE(matched) << "connection " << i << ": the server did not receive its "
                         << sent[i].size() << " bytes intact";
    // Server -> client: the echo came back whole and in order.
    ASSERT_EQ(echoed[i].size(), sent[i].size()) << "connection " << i;
    EXPECT_TRUE(echoed[i] == sent[i]) << "connection " << i << ": echoed bytes differ";
  }
  // The proxy is still serving after those connections closed.
  const int fd = Connect(*address);
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(SendAll(fd, "ping", 4));
  shutdown(fd, SHUT_WR);
  EXPECT_EQ(ReadToEof(fd), "ping");
  close(fd);
  ASSERT_EQ(proxy.Kill(SIGTERM), 0) << "SIGTERM should exit 0";
}

TEST(DelayProxyTest, ARoundTripTakesAtLeastTwiceTheOneWayDelay) {
  EchoServer echo;
  for (int delay_us : {0, 2000}) {
    testing::ChildProcess proxy;
    auto address = proxy.Start(
        {ProxyBinary(), "--target", echo.address(), "--delay-us", std::to_string(delay_us)});
    ASSERT_TRUE(address.ok()) << address.status();
    EXPECT_EQ(proxy.Field("delay-us"), std::to_string(delay_us));
    const int fd = Connect(*address);
    ASSERT_GE(fd, 0);
    double min_ms = 1e9;
    for (int i = 0; i < 20; ++i) {
      const auto start = Clock::now();
      const char c = static_cast<char>('a' + i);
      ASSERT_TRUE(SendAll(fd, &c, 1));
      char back = 0;
      ASSERT_EQ(recv(fd, &back, 1, MSG_WAITALL), 1);
      EXPECT_EQ(back, c);
      min_ms =
          std::min(min_ms, std::chrono::duration<double, std::milli>(Clock::now() - start).count());
    }
    std::printf("[ rtt      ] --delay-us %d: fastest of 20 round trips %.3f ms\n", delay_us,
                min_ms);
    // Lower bound only: the clocks of this process and the proxy's timer are
    // the same monotonic clock, so no tolerance is needed.
    EXPECT_GE(min_ms, 2 * delay_us / 1000.0);
    close(fd);
    EXPECT_EQ(proxy.Kill(SIGTERM), 0);
  }
}

TEST(DelayProxyTest, SigtermWithConnectionsOpenExitsZero) {
  EchoServer echo;
  testing::ChildProcess proxy;
  auto address = proxy.Start({ProxyBinary(), "--target", echo.address(), "--delay-us", "100"});
  ASSERT_TRUE(address.ok()) << address.status();
  const int fd = Connect(*address);
  ASSERT_GE(fd, 0);
  ASSERT_TRUE(SendAll(fd, "hello", 5));
  char back[5];
  ASSERT_EQ(recv(fd, back, 5, MSG_WAITALL), 5);
  proxy.Signal(SIGTERM);
  const std::optional<int> status = proxy.WaitExit(std::chrono::seconds(10));
  ASSERT_TRUE(status.has_value()) << "still running 10 s after SIGTERM";
  EXPECT_TRUE(WIFEXITED(*status) && WEXITSTATUS(*status) == 0) << "wait status " << *status;
  // Its connections were closed: the client reads EOF (or a reset), not a hang.
  char c;
  EXPECT_LE(recv(fd, &c, 1, 0), 0);
  close(fd);
}

TEST(DelayProxyTest, ARefusingTargetClosesThatClientAndTheProxyKeepsServing) {
  // A port nothing listens on: bind one, note it, close it.
  const int probe = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(probe, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  const std::string dead = absl::StrCat("127.0.0.1:", Port(probe));
  close(probe);
  testing::ChildProcess proxy;
  auto address = proxy.Start({ProxyBinary(), "--target", dead});
  ASSERT_TRUE(address.ok()) << address.status();
  for (int i = 0; i < 3; ++i) {
    const int fd = Connect(*address);
    ASSERT_GE(fd, 0) << "the proxy stopped accepting after a refused target";
    char c;
    EXPECT_LE(recv(fd, &c, 1, 0), 0);  // closed, not left hanging
    close(fd);
  }
  EXPECT_TRUE(proxy.running());
  EXPECT_EQ(proxy.Kill(SIGTERM), 0);
}

TEST(DelayProxyTest, BadFlagsGetAnErrorNamingTheFlag) {
  const std::string bin = ProxyBinary();
  struct Case {
    std::string args;
    int code;
    std::string says;
  };
  const std::vector<Case> cases = {
      {"", 2, "--target"},
      {"--target 127.0.0.1:1 --delay-us -1", 2, "delay-us"},
      {"--target 127.0.0.1:1 --delay-us 1ms", 2, "delay-us"},
      {"--target 127.0.0.1:1 --delay-us 10000001", 2, "delay-us"},
      {"--target 127.0.0.1:1 --max-buffer-bytes 10", 2, "max-buffer-bytes"},
      {"--target localhost", 2, "--target must be HOST:PORT"},
      {"--target 127.0.0.1:70000", 2, "has port '70000', not a number in [0, 65535]"},
      {"--target 127.0.0.1:1 --listen nohost.invalid:0", 2, "--listen"},
      {"--target 127.0.0.1:1 --nope 1", 2, "nope"},
      {"--target 127.0.0.1:1 --listen 192.0.2.1:0", 1, "cannot listen on 192.0.2.1:0"},
  };
  for (const Case& c : cases) {
    std::string output;
    const int code = Sh(bin + " " + c.args, &output);
    EXPECT_EQ(code, c.code) << c.args << ": " << output;
    EXPECT_NE(output.find(c.says), std::string::npos)
        << c.args << ": expected '" << c.says << "' in: " << output;
  }
  std::string help;
  EXPECT_EQ(Sh(bin + " --help", &help), 0);
  for (const char* flag : {"--target", "--listen", "--delay-us", "--max-buffer-bytes"}) {
    EXPECT_NE(help.find(flag), std::string::npos) << flag << " missing from --help: " << help;
  }
}

}  // namespace
}  // namespace switchyard
