#include "rpc/frame_socket.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <limits>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/host_port.h"

namespace switchyard::rpc {
namespace {

constexpr char kMagic[4] = {'S', 'Y', 'F', '1'};
constexpr size_t kMaxFrameBytes = std::numeric_limits<uint32_t>::max();

std::string ErrnoText(int err) { return std::strerror(err); }

// poll()'s timeout for `deadline`: -1 for none, else ms rounded up.
int PollTimeoutMs(absl::Time deadline) {
  if (deadline == absl::InfiniteFuture()) return -1;
  const absl::Duration left = deadline - absl::Now();
  if (left <= absl::ZeroDuration()) return 0;
  return static_cast<int>(
      std::min<int64_t>(absl::ToInt64Milliseconds(absl::Ceil(left, absl::Milliseconds(1))),
                        std::numeric_limits<int>::max()));
}

// Waits for `events` on `fd`; DEADLINE_EXCEEDED after `deadline`.
absl::Status WaitFor(int fd, short events, absl::Time deadline, const char* what) {
  for (;;) {
    pollfd p{.fd = fd, .events = events, .revents = 0};
    const int n = poll(&p, 1, PollTimeoutMs(deadline));
    if (n > 0) return absl::OkStatus();
    if (n < 0 && errno != EINTR) {
      return absl::UnavailableError(absl::StrCat("frame socket poll: ", ErrnoText(errno)));
    }
    if (n == 0 && absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat("frame socket: deadline passed ", what));
    }
  }
}

bool SetNonBlocking(int fd) {
  const int flags = fcntl(fd, F_GETFL, 0);
  return flags >= 0 && fcntl(fd, F_SETFL, flags | O_NONBLOCK) == 0;
}

// Reads exactly `n` bytes.
absl::Status ReadExactly(int fd, char* p, size_t n, absl::Time deadline, const char* what) {
  while (n > 0) {
    const ssize_t r = recv(fd, p, n, 0);
    if (r > 0) {
      p += r;
      n -= static_cast<size_t>(r);
      continue;
    }
    if (r == 0)
      return absl::UnavailableError(absl::StrCat("frame socket closed by the peer ", what));
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) {
      return absl::UnavailableError(
          absl::StrCat("frame socket read ", what, ": ", ErrnoText(errno)));
    }
    if (absl::Status s = WaitFor(fd, POLLIN, deadline, what); !s.ok()) return s;
  }
  return absl::OkStatus();
}

absl::Status WriteExactly(int fd, const char* p, size_t n, absl::Time deadline) {
  while (n > 0) {
    const ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
    if (w > 0) {
      p += w;
      n -= static_cast<size_t>(w);
      continue;
    }
    if (w < 0 && errno == EINTR) continue;
    if (w < 0 && errno != EAGAIN && errno != EWOULDBLOCK) {
      return absl::UnavailableError(absl::StrCat("frame socket write: ", ErrnoText(errno)));
    }
    if (absl::Status s = WaitFor(fd, POLLOUT, deadline, "writing a frame"); !s.ok()) return s;
  }
  return absl::OkStatus();
}

// A frame of `payload_bytes` with its header written and the payload left
// to fill (header and payload in one buffer, so one send carries a small
// frame); INVALID_ARGUMENT past what the header can say.
absl::StatusOr<std::string> NewFrame(size_t payload_bytes) {
  if (payload_bytes > kMaxFrameBytes) {
    return absl::InvalidArgumentError(absl::StrCat("frame of ", payload_bytes, " bytes"));
  }
  std::string frame(kFrameHeaderBytes + payload_bytes, '\0');
  std::memcpy(frame.data(), kMagic, 4);
  const uint32_t n = static_cast<uint32_t>(payload_bytes);
  for (int i = 0; i < 4; ++i) frame[4 + i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return frame;
}

// HOST:PORT of a frame address, with the address named in any error.
absl::StatusOr<HostPort> SplitFrameAddress(const std::string& address) {
  absl::StatusOr<HostPort> hp = SplitHostPort(address);
  if (!hp.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("frame address '", address, "' ",
                                                   hp.status().message(),
                                                   " (expected HOST:PORT or unix:PATH)"));
  }
  return hp;
}

absl::StatusOr<sockaddr_un> UnixAddress(const std::string& path) {
  sockaddr_un sa{};
  sa.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(sa.sun_path)) {
    return absl::InvalidArgumentError(
        absl::StrCat("frame socket path '", path, "' is empty or too long"));
  }
  std::memcpy(sa.sun_path, path.data(), path.size());
  return sa;
}

}  // namespace

FrameSocket& FrameSocket::operator=(FrameSocket&& other) noexcept {
  if (this != &other) {
    Close();
    fd_ = other.release();
  }
  return *this;
}

int FrameSocket::release() {
  const int fd = fd_;
  fd_ = -1;
  return fd;
}

void FrameSocket::Close() {
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
}

absl::StatusOr<FrameSocket> ListenFrames(const std::string& address, int* bound_port) {
  *bound_port = 0;
  if (absl::StartsWith(address, "unix:")) {
    const std::string path = address.substr(5);
    absl::StatusOr<sockaddr_un> sa = UnixAddress(path);
    if (!sa.ok()) return sa.status();
    FrameSocket s(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (!s.valid()) return absl::InternalError(absl::StrCat("socket: ", ErrnoText(errno)));
    unlink(path.c_str());
    if (bind(s.fd(), reinterpret_cast<const sockaddr*>(&*sa), sizeof(*sa)) != 0 ||
        listen(s.fd(), 64) != 0) {
      return absl::UnavailableError(
          absl::StrCat("frame socket: cannot listen on ", address, ": ", ErrnoText(errno)));
    }
    return s;
  }
  absl::StatusOr<HostPort> hp = SplitFrameAddress(address);
  if (!hp.ok()) return hp.status();
  absl::StatusOr<TcpListener> listener = ListenTcp(hp->host, hp->port);
  if (!listener.ok()) {
    return absl::Status(listener.status().code(),
                        absl::StrCat("frame socket: cannot listen on ", address, ": ",
                                     listener.status().message()));
  }
  *bound_port = listener->port;
  return FrameSocket(listener->fd);
}

absl::StatusOr<FrameSocket> AcceptFrames(int listen_fd) {
  for (;;) {
    const int fd = accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd >= 0) {
      const int one = 1;
      setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));  // fails harmlessly on unix
      return FrameSocket(fd);
    }
    if (errno == EINTR || errno == ECONNABORTED) continue;
    return absl::UnavailableError(absl::StrCat("frame socket accept: ", ErrnoText(errno)));
  }
}

absl::StatusOr<FrameSocket> DialFrames(const std::string& address, absl::Time deadline) {
  FrameSocket s;
  sockaddr_storage sa{};
  socklen_t sa_len = 0;
  if (absl::StartsWith(address, "unix:")) {
    absl::StatusOr<sockaddr_un> un = UnixAddress(address.substr(5));
    if (!un.ok()) return un.status();
    std::memcpy(&sa, &*un, sizeof(*un));
    sa_len = sizeof(*un);
    s = FrameSocket(socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  } else {
    absl::StatusOr<HostPort> hp = SplitFrameAddress(address);
    if (!hp.ok()) return hp.status();
    absl::StatusOr<std::vector<TcpAddress>> found = ResolveTcp(hp->host, hp->port);
    if (!found.ok()) {
      return absl::UnavailableError(
          absl::StrCat("frame socket ", address, ": ", found.status().message()));
    }
    const TcpAddress& first = found->front();
    std::memcpy(&sa, &first.address, first.length);
    sa_len = first.length;
    s = FrameSocket(socket(first.address.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0));
    if (s.valid()) {
      const int one = 1;
      setsockopt(s.fd(), IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    }
  }
  if (!s.valid() || !SetNonBlocking(s.fd())) {
    return absl::InternalError(absl::StrCat("frame socket: ", ErrnoText(errno)));
  }
  if (connect(s.fd(), reinterpret_cast<const sockaddr*>(&sa), sa_len) != 0) {
    if (errno != EINPROGRESS && errno != EAGAIN) {
      return absl::UnavailableError(
          absl::StrCat("frame socket: cannot connect to ", address, ": ", ErrnoText(errno)));
    }
    if (absl::Status w = WaitFor(s.fd(), POLLOUT, deadline, "connecting"); !w.ok()) return w;
    int err = 0;
    socklen_t len = sizeof(err);
    getsockopt(s.fd(), SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) {
      return absl::UnavailableError(
          absl::StrCat("frame socket: cannot connect to ", address, ": ", ErrnoText(err)));
    }
  }
  return s;
}

absl::Status WriteFrame(int fd, std::string_view payload, absl::Time deadline) {
  absl::StatusOr<std::string> frame = NewFrame(payload.size());
  if (!frame.ok()) return frame.status();
  std::memcpy(frame->data() + kFrameHeaderBytes, payload.data(), payload.size());
  return WriteExactly(fd, frame->data(), frame->size(), deadline);
}

absl::Status WriteMessageFrame(int fd, const google::protobuf::MessageLite& message,
                               absl::Time deadline) {
  absl::StatusOr<std::string> frame = NewFrame(message.ByteSizeLong());
  if (!frame.ok()) return frame.status();
  message.SerializeWithCachedSizesToArray(reinterpret_cast<uint8_t*>(frame->data()) +
                                          kFrameHeaderBytes);
  return WriteExactly(fd, frame->data(), frame->size(), deadline);
}

absl::Status ReadFrame(int fd, size_t max_bytes, absl::Time deadline, std::string* payload) {
  char header[kFrameHeaderBytes];
  if (absl::Status s = ReadExactly(fd, header, sizeof(header), deadline, "reading a frame header");
      !s.ok()) {
    return s;
  }
  if (std::memcmp(header, kMagic, 4) != 0) {
    return absl::DataLossError(
        "frame socket: the peer does not speak Switchyard frames (bad magic)");
  }
  uint32_t n = 0;
  for (int i = 0; i < 4; ++i) n |= uint32_t{static_cast<uint8_t>(header[4 + i])} << (8 * i);
  if (n > max_bytes) {
    return absl::DataLossError(
        absl::StrCat("frame socket: frame of ", n, " bytes is over the limit of ", max_bytes));
  }
  payload->resize(n);
  return ReadExactly(fd, payload->data(), n, deadline, "reading a frame");
}

absl::Status ReadMessageFrame(int fd, size_t max_bytes, absl::Time deadline,
                              google::protobuf::MessageLite* message) {
  std::string payload;
  if (absl::Status s = ReadFrame(fd, max_bytes, deadline, &payload); !s.ok()) return s;
  if (!message->ParseFromString(payload)) {
    return absl::DataLossError(absl::StrCat("frame socket: a frame of ", payload.size(),
                                            " bytes is not a ", message->GetTypeName()));
  }
  return absl::OkStatus();
}

bool WaitReadable(int fd, absl::Time deadline) { return WaitFor(fd, POLLIN, deadline, "").ok(); }

}  // namespace switchyard::rpc
