#include "rpc/frame_socket.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <poll.h>
#include <sched.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "core/host_port.h"

namespace switchyard::rpc {
namespace {

constexpr char kMagic[4] = {'S', 'Y', 'F', '1'};
constexpr char kMagicWithTail[4] = {'S', 'Y', 'F', '2'};
// A version 2 payload starts with its message's length.
constexpr size_t kMessageLengthBytes = 4;
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

// Waits for `events` on `fd`, polling without blocking for up to `spin`
// first (PollSpinning); DEADLINE_EXCEEDED after `deadline`.
absl::Status WaitFor(int fd, short events, absl::Time deadline, const char* what,
                     absl::Duration spin = absl::ZeroDuration()) {
  for (;;) {
    pollfd p{.fd = fd, .events = events, .revents = 0};
    const int n = PollSpinning(absl::MakeSpan(&p, 1), PollTimeoutMs(deadline), spin);
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

// A frame of `payload_bytes` with its header written and the payload left
// to fill (header and payload in one buffer, so one send carries a small
// frame); INVALID_ARGUMENT past what the header can say. The payload bytes
// start uninitialised: a frame of 256 rows is MiBs, which a std::string
// would zero only to have them overwritten (issue #10).
struct NewFrameBuffer {
  std::unique_ptr<char[]> bytes;
  size_t size = 0;
  char* payload() { return bytes.get() + kFrameHeaderBytes; }
};

void PutUint32(uint32_t n, char* out) {
  for (int i = 0; i < 4; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
}
uint32_t GetUint32(const char* in) {
  uint32_t n = 0;
  for (int i = 0; i < 4; ++i) n |= uint32_t{static_cast<uint8_t>(in[i])} << (8 * i);
  return n;
}

absl::StatusOr<NewFrameBuffer> NewFrame(size_t payload_bytes, const char (&magic)[4] = kMagic) {
  if (payload_bytes > kMaxFrameBytes) {
    return absl::InvalidArgumentError(absl::StrCat("frame of ", payload_bytes, " bytes"));
  }
  NewFrameBuffer frame;
  frame.size = kFrameHeaderBytes + payload_bytes;
  frame.bytes = std::make_unique_for_overwrite<char[]>(frame.size);
  std::memcpy(frame.bytes.get(), magic, 4);
  PutUint32(static_cast<uint32_t>(payload_bytes), frame.bytes.get() + 4);
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

// OpenSSL's text for the first error queued on this thread (the queue is
// then cleared, so nothing is left for gRPC's TLS code to misread).
std::string OpenSslErrorText() {
  const unsigned long code = ERR_get_error();
  ERR_clear_error();
  if (code == 0) return "no OpenSSL error queued";
  char text[256];
  ERR_error_string_n(code, text, sizeof(text));
  return text;
}

// The BIO under a TLS frame socket: send/recv on its descriptor, with
// MSG_NOSIGNAL (OpenSSL's socket BIO write()s, which raises SIGPIPE on a
// closed peer) and the end of the stream remembered for BIO_CTRL_EOF (so
// a peer closing without close_notify reads as closed).
struct BioState {
  int fd;
  bool eof = false;
  // Set while a frame is encrypted: its records are appended here, to be
  // sent at once, instead of being sent one by one.
  std::string* collect = nullptr;
};

int BioWrite(BIO* bio, const char* data, int length) {
  BIO_clear_retry_flags(bio);
  auto* state = static_cast<BioState*>(BIO_get_data(bio));
  if (state->collect != nullptr) {
    state->collect->append(data, static_cast<size_t>(length));
    return length;
  }
  for (;;) {
    const ssize_t w = send(state->fd, data, static_cast<size_t>(length), MSG_NOSIGNAL);
    if (w >= 0) return static_cast<int>(w);
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) BIO_set_retry_write(bio);
    return -1;
  }
}

int BioRead(BIO* bio, char* data, int length) {
  BIO_clear_retry_flags(bio);
  auto* state = static_cast<BioState*>(BIO_get_data(bio));
  for (;;) {
    const ssize_t r = recv(state->fd, data, static_cast<size_t>(length), 0);
    if (r > 0) return static_cast<int>(r);
    if (r == 0) {
      state->eof = true;
      return 0;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) BIO_set_retry_read(bio);
    return -1;
  }
}

long BioCtrl(BIO* bio, int command, long, void*) {
  switch (command) {
    case BIO_CTRL_FLUSH:
      return 1;
    case BIO_CTRL_EOF:
      return static_cast<BioState*>(BIO_get_data(bio))->eof ? 1 : 0;
    default:
      return 0;
  }
}

int BioDestroy(BIO* bio) {
  delete static_cast<BioState*>(BIO_get_data(bio));
  BIO_set_data(bio, nullptr);
  return 1;
}

const BIO_METHOD* FrameBioMethod() {
  static BIO_METHOD* const method = [] {
    BIO_METHOD* m =
        BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "switchyard frame socket");
    BIO_meth_set_write(m, BioWrite);
    BIO_meth_set_read(m, BioRead);
    BIO_meth_set_ctrl(m, BioCtrl);
    BIO_meth_set_destroy(m, BioDestroy);
    return m;
  }();
  return method;
}

bool IsIpAddress(const std::string& host) {
  in6_addr buffer;
  return inet_pton(AF_INET, host.c_str(), &buffer) == 1 ||
         inet_pton(AF_INET6, host.c_str(), &buffer) == 1;
}

}  // namespace

struct FrameSocket::Tls {
  ~Tls() { SSL_free(ssl); }  // frees the BIO and its BioState too
  SSL* ssl = nullptr;
  // OpenSSL's calls on one session must not run at once: a reader takes it
  // per SSL_read (never while waiting on poll), a writer for a whole frame.
  std::mutex mu;
  std::string records;  // a frame's records being written; guarded by mu
};

FrameTlsContext::~FrameTlsContext() { SSL_CTX_free(ctx_); }

FrameSocket::FrameSocket() = default;
FrameSocket::FrameSocket(int fd) : fd_(fd) {}
FrameSocket::FrameSocket(FrameSocket&& other) noexcept
    : fd_(std::exchange(other.fd_, -1)), tls_(std::move(other.tls_)) {}
FrameSocket::~FrameSocket() { Close(); }

FrameSocket& FrameSocket::operator=(FrameSocket&& other) noexcept {
  if (this != &other) {
    Close();
    fd_ = std::exchange(other.fd_, -1);
    tls_ = std::move(other.tls_);
  }
  return *this;
}

bool FrameSocket::HasBufferedInput() const {
  if (tls_ == nullptr) return false;
  std::lock_guard<std::mutex> lock(tls_->mu);
  // Records read ahead count too: with read-ahead, poll cannot see them.
  return SSL_has_pending(tls_->ssl) == 1;
}

int FrameSocket::release() {
  tls_.reset();
  return std::exchange(fd_, -1);
}

void FrameSocket::Close() {
  // No close_notify: the peer reads the end of the stream as closed
  // either way, and a shut-down socket could not carry it.
  tls_.reset();
  if (fd_ >= 0) close(fd_);
  fd_ = -1;
}

// Reads and writes of a frame socket, plaintext or TLS, in one place.
struct FrameIo {
  // One recv / SSL_read of at most `n` bytes: the bytes read (> 0), 0 when
  // the peer closed, or -1 with `*wait` set to the poll events to wait for
  // before trying again, or -1 with `*error` set.
  static ssize_t ReadSome(FrameSocket& s, char* p, size_t n, short* wait, std::string* error) {
    if (s.tls_ == nullptr) {
      const ssize_t r = recv(s.fd_, p, n, 0);
      if (r >= 0) return r;
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) {
        *wait = errno == EINTR ? 0 : POLLIN;
      } else {
        *error = ErrnoText(errno);
      }
      return -1;
    }
    std::lock_guard<std::mutex> lock(s.tls_->mu);
    ERR_clear_error();
    size_t got = 0;
    if (SSL_read_ex(s.tls_->ssl, p, n, &got) == 1) return static_cast<ssize_t>(got);
    return TlsFailure(s.tls_->ssl, wait, error);
  }

  // What a failed SSL call means: 0 (closed), or -1 with `*wait` or `*error`.
  static ssize_t TlsFailure(SSL* ssl, short* wait, std::string* error) {
    const int code = SSL_get_error(ssl, 0);
    const int saved_errno = errno;
    switch (code) {
      case SSL_ERROR_WANT_READ:
        *wait = POLLIN;
        return -1;
      case SSL_ERROR_WANT_WRITE:
        *wait = POLLOUT;
        return -1;
      case SSL_ERROR_ZERO_RETURN:
        ERR_clear_error();
        return 0;
      case SSL_ERROR_SYSCALL:
        *error = ERR_peek_error() != 0 ? OpenSslErrorText()
                 : saved_errno != 0    ? ErrnoText(saved_errno)
                                       : "the connection broke";
        return -1;
      default:
        *error = absl::StrCat("TLS: ", OpenSslErrorText());
        return -1;
    }
  }

  static absl::Status ReadExactly(FrameSocket& s, char* p, size_t n, absl::Time deadline,
                                  const char* what) {
    while (n > 0) {
      short wait = 0;
      std::string error;
      const ssize_t r = ReadSome(s, p, n, &wait, &error);
      if (r > 0) {
        p += r;
        n -= static_cast<size_t>(r);
        continue;
      }
      if (r == 0)
        return absl::UnavailableError(absl::StrCat("frame socket closed by the peer ", what));
      if (!error.empty()) {
        return absl::UnavailableError(absl::StrCat("frame socket, ", what, ": ", error));
      }
      if (wait == 0) continue;  // interrupted
      if (absl::Status waited = WaitFor(s.fd_, wait, deadline, what); !waited.ok()) return waited;
    }
    return absl::OkStatus();
  }

  // Sends `n` bytes (a plaintext frame, or a frame's TLS records).
  static absl::Status SendAll(int fd, const char* p, size_t n, absl::Time deadline) {
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
      if (absl::Status waited = WaitFor(fd, POLLOUT, deadline, "writing a frame"); !waited.ok()) {
        return waited;
      }
    }
    return absl::OkStatus();
  }

  // With TLS the whole frame is encrypted first (the BIO collects its
  // records) and then sent at once, as a plaintext frame is: sent record
  // by record, a large frame woke the reader once per 16 KiB record (3x the
  // context switches at 16 tokens of a Mixtral layer). The session stays
  // locked until its records are sent, so no record another thread's
  // SSL_read might send can get between them.
  static absl::Status WriteExactly(FrameSocket& s, const char* p, size_t n, absl::Time deadline) {
    if (s.tls_ == nullptr) return SendAll(s.fd_, p, n, deadline);
    FrameSocket::Tls& tls = *s.tls_;
    std::lock_guard<std::mutex> lock(tls.mu);
    auto* bio = static_cast<BioState*>(BIO_get_data(SSL_get_wbio(tls.ssl)));
    tls.records.clear();
    bio->collect = &tls.records;
    ERR_clear_error();
    std::string error;
    for (size_t done = 0; done < n && error.empty();) {
      size_t put = 0;
      if (SSL_write_ex(tls.ssl, p + done, n - done, &put) == 1) {
        done += put;
        continue;
      }
      short wait = 0;
      if (TlsFailure(tls.ssl, &wait, &error) == 0 || error.empty()) {
        error = "the TLS session cannot send";
      }
    }
    bio->collect = nullptr;
    absl::Status sent = error.empty()
                            ? SendAll(s.fd_, tls.records.data(), tls.records.size(), deadline)
                            : absl::UnavailableError(absl::StrCat("frame socket write: ", error));
    // A large frame's buffer is not kept for the next one.
    if (tls.records.capacity() > (size_t{4} << 20)) std::string().swap(tls.records);
    return sent;
  }

  static absl::Status Handshake(FrameSocket& s, const FrameTlsContext& tls,
                                const std::string& verify_host, absl::Time deadline) {
    if (!s.valid()) return absl::FailedPreconditionError("TLS on a closed frame socket");
    if (s.tls_ != nullptr) return absl::FailedPreconditionError("the frame socket has TLS already");
    ERR_clear_error();
    auto session = std::make_unique<FrameSocket::Tls>();
    session->ssl = SSL_new(tls.get());
    BIO* bio = session->ssl == nullptr ? nullptr : BIO_new(FrameBioMethod());
    if (bio == nullptr) {
      return absl::InternalError(absl::StrCat("frame socket TLS: ", OpenSslErrorText()));
    }
    BIO_set_data(bio, new BioState{.fd = s.fd_});
    BIO_set_init(bio, 1);
    SSL_set_bio(session->ssl, bio, bio);  // the session owns it now
    if (tls.server()) {
      SSL_set_accept_state(session->ssl);
    } else {
      SSL_set_connect_state(session->ssl);
      const bool ip = IsIpAddress(verify_host);
      const bool named =
          ip ? X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(session->ssl), verify_host.c_str()) == 1
             : SSL_set1_host(session->ssl, verify_host.c_str()) == 1 &&
                   SSL_set_tlsext_host_name(session->ssl, verify_host.c_str()) == 1;
      if (verify_host.empty() || !named) {
        ERR_clear_error();
        return absl::InvalidArgumentError(
            absl::StrCat("frame socket TLS: cannot verify the peer as '", verify_host, "'"));
      }
    }
    s.tls_ = std::move(session);
    for (;;) {
      short wait = 0;
      std::string error;
      {
        std::lock_guard<std::mutex> lock(s.tls_->mu);
        ERR_clear_error();
        if (SSL_do_handshake(s.tls_->ssl) == 1) return absl::OkStatus();
        const long verified = SSL_get_verify_result(s.tls_->ssl);
        if (TlsFailure(s.tls_->ssl, &wait, &error) == 0) error = "the peer closed the connection";
        if (!error.empty() && verified != X509_V_OK) {
          error =
              absl::StrCat("certificate verify failed: ", X509_verify_cert_error_string(verified));
        }
      }
      if (!error.empty()) {
        s.tls_.reset();
        return absl::UnavailableError(absl::StrCat("frame socket TLS handshake failed: ", error));
      }
      if (wait != 0) {
        absl::Status waited = WaitFor(s.fd_, wait, deadline, "in the TLS handshake");
        if (!waited.ok()) {
          s.tls_.reset();
          return waited;
        }
      }
    }
  }
};

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

absl::Status StartClientTls(FrameSocket& socket, const FrameTlsContext& tls,
                            const std::string& verify_host, absl::Time deadline) {
  if (tls.server()) return absl::InvalidArgumentError("a server TLS context on a client socket");
  return FrameIo::Handshake(socket, tls, verify_host, deadline);
}

absl::Status StartServerTls(FrameSocket& socket, const FrameTlsContext& tls, absl::Time deadline) {
  if (!tls.server()) return absl::InvalidArgumentError("a client TLS context on a server socket");
  return FrameIo::Handshake(socket, tls, "", deadline);
}

absl::Status WriteFrame(FrameSocket& socket, std::string_view payload, absl::Time deadline) {
  absl::StatusOr<NewFrameBuffer> frame = NewFrame(payload.size());
  if (!frame.ok()) return frame.status();
  std::memcpy(frame->payload(), payload.data(), payload.size());
  return FrameIo::WriteExactly(socket, frame->bytes.get(), frame->size, deadline);
}

absl::Status WriteMessageFrame(FrameSocket& socket, const google::protobuf::MessageLite& message,
                               absl::Time deadline) {
  absl::StatusOr<NewFrameBuffer> frame = NewFrame(message.ByteSizeLong());
  if (!frame.ok()) return frame.status();
  message.SerializeWithCachedSizesToArray(reinterpret_cast<uint8_t*>(frame->payload()));
  return FrameIo::WriteExactly(socket, frame->bytes.get(), frame->size, deadline);
}

absl::Status WriteMessageFrameWithTail(FrameSocket& socket,
                                       const google::protobuf::MessageLite& message,
                                       size_t tail_bytes, absl::FunctionRef<void(char*)> fill_tail,
                                       absl::Time deadline) {
  const size_t message_bytes = message.ByteSizeLong();
  absl::StatusOr<NewFrameBuffer> frame =
      NewFrame(kMessageLengthBytes + message_bytes + tail_bytes, kMagicWithTail);
  if (!frame.ok()) return frame.status();
  char* payload = frame->payload();
  PutUint32(static_cast<uint32_t>(message_bytes), payload);
  message.SerializeWithCachedSizesToArray(
      reinterpret_cast<uint8_t*>(payload + kMessageLengthBytes));
  fill_tail(payload + kMessageLengthBytes + message_bytes);
  return FrameIo::WriteExactly(socket, frame->bytes.get(), frame->size, deadline);
}

namespace {

struct FrameHeader {
  size_t payload_bytes = 0;
  bool with_tail = false;  // version 2
};

// Reads a frame header; its payload length is at most `max_bytes`.
absl::StatusOr<FrameHeader> ReadFrameHeader(FrameSocket& socket, size_t max_bytes,
                                            absl::Time deadline) {
  char header[kFrameHeaderBytes];
  if (absl::Status s =
          FrameIo::ReadExactly(socket, header, sizeof(header), deadline, "reading a frame header");
      !s.ok()) {
    return s;
  }
  FrameHeader frame;
  frame.with_tail = std::memcmp(header, kMagicWithTail, 4) == 0;
  if (!frame.with_tail && std::memcmp(header, kMagic, 4) != 0) {
    return absl::DataLossError(
        "frame socket: the peer does not speak Switchyard frames (bad magic)");
  }
  frame.payload_bytes = GetUint32(header + 4);
  if (frame.payload_bytes > max_bytes) {
    return absl::DataLossError(absl::StrCat("frame socket: frame of ", frame.payload_bytes,
                                            " bytes is over the limit of ", max_bytes));
  }
  return frame;
}

}  // namespace

absl::Status ReadFrame(FrameSocket& socket, size_t max_bytes, absl::Time deadline,
                       std::string* payload) {
  absl::StatusOr<FrameHeader> frame = ReadFrameHeader(socket, max_bytes, deadline);
  if (!frame.ok()) return frame.status();
  if (frame->with_tail) {
    return absl::DataLossError("frame socket: a version 2 frame where a plain one was expected");
  }
  payload->resize(frame->payload_bytes);
  return FrameIo::ReadExactly(socket, payload->data(), frame->payload_bytes, deadline,
                              "reading a frame");
}

absl::Status ReadMessageFrame(FrameSocket& socket, size_t max_bytes, absl::Time deadline,
                              google::protobuf::MessageLite* message, FrameTail* tail) {
  absl::StatusOr<FrameHeader> frame = ReadFrameHeader(socket, max_bytes, deadline);
  if (!frame.ok()) return frame.status();
  const size_t n = frame->payload_bytes;
  const auto not_a_message = [&](const std::string& why) {
    return absl::DataLossError(absl::StrCat("frame socket: a frame of ", n, " bytes is not a ",
                                            message->GetTypeName(), why));
  };
  if (frame->with_tail && tail == nullptr) {
    return not_a_message(" (a version 2 frame, which this reader does not take)");
  }
  // Protobuf's messages stop at 2 GiB: a plain frame larger than that cannot
  // be one, and is refused before its payload is read.
  constexpr size_t kMaxMessageBytes = std::numeric_limits<int>::max();
  if (!frame->with_tail && n > kMaxMessageBytes) return not_a_message("");
  // Uninitialised, as NewFrame's: the read fills every byte.
  std::unique_ptr<char[]> payload = std::make_unique_for_overwrite<char[]>(n);
  if (absl::Status s = FrameIo::ReadExactly(socket, payload.get(), n, deadline, "reading a frame");
      !s.ok()) {
    return s;
  }
  size_t message_begin = 0;
  size_t message_bytes = n;
  if (frame->with_tail) {
    if (n < kMessageLengthBytes) return not_a_message(" (shorter than its message length)");
    message_begin = kMessageLengthBytes;
    message_bytes = GetUint32(payload.get());
    if (message_bytes > n - kMessageLengthBytes) {
      return not_a_message(absl::StrCat(" (its message length says ", message_bytes, ")"));
    }
  }
  if (message_bytes > kMaxMessageBytes ||
      !message->ParseFromArray(payload.get() + message_begin, static_cast<int>(message_bytes))) {
    return not_a_message("");
  }
  if (tail != nullptr) {
    *tail = FrameTail();  // a version 1 frame's payload is not kept
    if (frame->with_tail) {
      tail->present = true;
      const size_t tail_begin = message_begin + message_bytes;
      tail->bytes = std::string_view(payload.get() + tail_begin, n - tail_begin);
      tail->buffer = std::move(payload);
    }
  }
  return absl::OkStatus();
}

bool WaitReadable(FrameSocket& socket, absl::Time deadline, absl::Duration spin) {
  return socket.HasBufferedInput() || WaitFor(socket.fd(), POLLIN, deadline, "", spin).ok();
}

int PollSpinning(absl::Span<pollfd> fds, int timeout_ms, absl::Duration spin) {
  if (timeout_ms >= 0) spin = std::min(spin, absl::Milliseconds(timeout_ms));
  if (spin > absl::ZeroDuration()) {
    // steady_clock, not absl::Now(): a cheap vDSO read per round.
    const auto until = std::chrono::steady_clock::now() + absl::ToChronoNanoseconds(spin);
    do {
      const int ready = poll(fds.data(), fds.size(), 0);
      if (ready != 0) return ready;
      sched_yield();  // a thread waiting for this core runs first
    } while (std::chrono::steady_clock::now() < until);
  }
  return poll(fds.data(), fds.size(), timeout_ms);
}

}  // namespace switchyard::rpc
