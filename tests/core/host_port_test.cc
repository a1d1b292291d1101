// HOST:PORT splitting and the TCP listener every plain-socket server shares.
#include "core/host_port.h"

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <string>

#include "gtest/gtest.h"

namespace switchyard {
namespace {

TEST(HostPortTest, SplitsNamesV4V6AndAnEmptyHost) {
  struct Case {
    std::string address, host;
    int port;
  };
  for (const Case& c :
       {Case{"localhost:80", "localhost", 80}, Case{"127.0.0.1:0", "127.0.0.1", 0},
        Case{"[::1]:65535", "::1", 65535}, Case{":9090", "", 9090}, Case{"[]:1", "", 1}}) {
    absl::StatusOr<HostPort> hp = SplitHostPort(c.address);
    ASSERT_TRUE(hp.ok()) << c.address << ": " << hp.status();
    EXPECT_EQ(hp->host, c.host) << c.address;
    EXPECT_EQ(hp->port, c.port) << c.address;
  }
}

TEST(HostPortTest, RefusalsSayWhatIsWrong) {
  struct Case {
    std::string address, says;
  };
  for (const Case& c : {Case{"localhost", "has no port"}, Case{"h:", "has port ''"},
                        Case{"h:65536", "has port '65536'"}, Case{"h:-1", "has port '-1'"},
                        Case{"h:+80", "has port '+80'"}, Case{"h: 80", "has port ' 80'"},
                        Case{"[::1:80", "unclosed '['"}, Case{"h:99999999999", "not a number"}}) {
    absl::StatusOr<HostPort> hp = SplitHostPort(c.address);
    ASSERT_FALSE(hp.ok()) << c.address << " was accepted";
    EXPECT_EQ(hp.status().code(), absl::StatusCode::kInvalidArgument) << c.address;
    EXPECT_NE(std::string(hp.status().message()).find(c.says), std::string::npos)
        << c.address << ": " << hp.status();
  }
}

TEST(HostPortTest, ListensOnAFreePortAndReportsIt) {
  absl::StatusOr<TcpListener> a = ListenTcp("127.0.0.1", 0);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_GT(a->port, 0);
  // A client reaches it on the reported port.
  const int client = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in to{};
  to.sin_family = AF_INET;
  to.sin_port = htons(static_cast<uint16_t>(a->port));
  to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(connect(client, reinterpret_cast<sockaddr*>(&to), sizeof(to)), 0);
  close(client);

  // The same port again is taken: UNAVAILABLE, saying why.
  absl::StatusOr<TcpListener> b = ListenTcp("127.0.0.1", a->port);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(std::string(b.status().message()).find("in use"), std::string::npos) << b.status();
  close(a->fd);

  // Every interface, by "" and by "*".
  for (const std::string host : {"", "*"}) {
    absl::StatusOr<TcpListener> any = ListenTcp(host, 0);
    ASSERT_TRUE(any.ok()) << "'" << host << "': " << any.status();
    EXPECT_GT(any->port, 0);
    close(any->fd);
  }
}

TEST(HostPortTest, AHostThatDoesNotResolveIsInvalid) {
  absl::StatusOr<TcpListener> l = ListenTcp("nohost.invalid", 0);
  ASSERT_FALSE(l.ok());
  EXPECT_EQ(l.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(std::string(l.status().message()).find("nohost.invalid"), std::string::npos)
      << l.status();
}

}  // namespace
}  // namespace switchyard
