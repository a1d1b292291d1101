// switchyard-delay-proxy: a TCP forwarder that delays every byte by a fixed
// time, to emulate a network link between hosts where `tc netem` is not
// available (issue #10; scripts/bench-netem.sh puts one in front of each
// expert).
//
//   switchyard-delay-proxy --target HOST:PORT [--listen HOST:PORT] [--delay-us US]
//
// Each accepted connection gets its own connection to --target. Every chunk
// of bytes read from one side is written to the other side --delay-us after
// it was read (the one-way delay; a round trip through the proxy takes at
// least 2 x --delay-us), in order, as it was read: no batching beyond the
// chunks the kernel hands over. A half-close (FIN) is delayed like data. A
// reset or error on either side closes both. At most --max-buffer-bytes wait
// per direction; beyond that the proxy stops reading from the sender (TCP
// flow control does the rest).
//
// One thread, epoll and a timerfd: it sleeps until a socket is ready or the
// next chunk is due, never polls. SIGTERM/SIGINT close every connection and
// exit 0. Prints one line to stdout once listening:
//   switchyard-delay-proxy listening on ADDR -> TARGET delay-us=N
// Bad flags or addresses: one line on stderr, exit 2; cannot listen: one line
// on stderr, exit 1. A target that refuses a connection closes that client's
// connection (and says so on stderr); the proxy keeps serving.
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <memory>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "core/flags.h"
#include "core/host_port.h"
#include "core/status_macros.h"
#include "core/stop_signals.h"

namespace switchyard {
namespace {

using Clock = std::chrono::steady_clock;  // CLOCK_MONOTONIC, as the timerfd

constexpr char kName[] = "switchyard-delay-proxy";
constexpr size_t kReadChunk = 64 * 1024;

const CommandSpec& Spec() {
  static const auto* spec = new CommandSpec{
      kName,
      "switchyard-delay-proxy --target HOST:PORT [--listen HOST:PORT] [--delay-us US]",
      {
          {"target", true, "required", "where each accepted connection is forwarded, HOST:PORT"},
          {"listen", true, "127.0.0.1:0", "the address to accept on (port 0 picks one)"},
          {"delay-us", true, "0",
           "one-way delay in microseconds, each direction (0..10000000); a round trip is at "
           "least twice this"},
          {"max-buffer-bytes", true, "16777216",
           "bytes waiting per direction before the proxy stops reading the sender "
           "(65536..1073741824)"},
      },
      "Every chunk read from one side is written to the other side --delay-us later, in order.\n"
      "SIGTERM/SIGINT close every connection and exit 0.\n"};
  return *spec;
}

struct Options {
  std::string listen = "127.0.0.1:0";
  std::string target;
  int64_t delay_us = 0;
  int64_t max_buffer_bytes = 16 << 20;
};

absl::StatusOr<Options> OptionsFromFlags(const Flags& flags) {
  Options o;
  SY_ASSIGN_OR_RETURN(o.target, flags.Required("target"));
  o.listen = flags.GetOr("listen", o.listen);
  SY_ASSIGN_OR_RETURN(o.delay_us, flags.IntInRange("delay-us", 0, 0, 10'000'000));
  SY_ASSIGN_OR_RETURN(o.max_buffer_bytes, flags.IntInRange("max-buffer-bytes", o.max_buffer_bytes,
                                                           65536, int64_t{1} << 30));
  return o;
}

std::string ErrnoText(int err) { return std::strerror(err); }

// HOST:PORT or [V6HOST]:PORT of --`flag` (a host is required).
absl::StatusOr<HostPort> SplitFlagAddress(const std::string& flag, const std::string& address) {
  absl::StatusOr<HostPort> split = SplitHostPort(address);
  if (!split.ok() || split->host.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--", flag, " must be HOST:PORT, got '", address, "'",
        split.ok() ? " (no host)" : absl::StrCat(" (", split.status().message(), ")")));
  }
  return split;
}

// --target resolved to socket addresses (numeric or names).
absl::StatusOr<std::vector<TcpAddress>> ResolveTarget(const std::string& address) {
  SY_ASSIGN_OR_RETURN(HostPort split, SplitFlagAddress("target", address));
  absl::StatusOr<std::vector<TcpAddress>> resolved = ResolveTcp(split.host, split.port);
  if (!resolved.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--target '", address, "': ", resolved.status().message()));
  }
  return resolved;
}

void SetNoDelay(int fd) {
  // The proxy adds a fixed delay and nothing else: no Nagle on either side.
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

// Bytes in flight in one direction of a connection.
struct Chunk {
  Clock::time_point due;
  std::string bytes;  // empty: the sender's FIN
  size_t written = 0;
};

struct Direction {
  int from = -1;
  int to = -1;
  std::deque<Chunk> queue;
  size_t queued_bytes = 0;
  bool eof_read = false;       // the sender's FIN was read (and queued)
  bool shut_written = false;   // that FIN was passed on (shutdown(to, SHUT_WR))
  bool write_blocked = false;  // `to` returned EAGAIN: wait for EPOLLOUT
};

struct Connection {
  uint64_t id = 0;
  int client = -1;
  int upstream = -1;
  bool upstream_connected = false;
  Direction up;    // client -> upstream
  Direction down;  // upstream -> client
  uint32_t client_events = 0;
  uint32_t upstream_events = 0;
};

// epoll user data: which connection and which of its sockets (or the
// listener, the timer, the signals).
constexpr uint64_t kListenerTag = 1;
constexpr uint64_t kTimerTag = 2;
constexpr uint64_t kSignalTag = 3;
constexpr uint64_t kFirstConnectionId = 8;
uint64_t Tag(uint64_t id, bool upstream) { return (id << 1) | (upstream ? 1 : 0); }
// Connection::*_events of a socket removed from the epoll set.
constexpr uint32_t kUnregistered = ~uint32_t{0};

class DelayProxy {
 public:
  explicit DelayProxy(Options options) : options_(std::move(options)) {
    delay_ = std::chrono::microseconds(options_.delay_us);
  }

  ~DelayProxy() {
    for (auto& [id, c] : connections_) CloseFds(*c);
    for (int fd : {listener_, epoll_, timer_, signals_}) {
      if (fd >= 0) close(fd);
    }
  }

  // Resolves, binds and listens; the address actually bound in *bound.
  absl::Status Start(std::string* bound) {
    SY_ASSIGN_OR_RETURN(HostPort listen, SplitFlagAddress("listen", options_.listen));
    SY_ASSIGN_OR_RETURN(targets_, ResolveTarget(options_.target));
    absl::StatusOr<TcpListener> listener = ListenTcp(listen.host, listen.port, /*backlog=*/512);
    if (!listener.ok()) {
      const absl::Status& s = listener.status();
      return absl::Status(
          s.code(), s.code() == absl::StatusCode::kInvalidArgument
                        ? absl::StrCat("--listen '", options_.listen, "': ", s.message())
                        : absl::StrCat("cannot listen on ", options_.listen, ": ", s.message()));
    }
    listener_ = listener->fd;
    // Accepted from the epoll loop: a client gone before accept must not block it.
    const int flags = fcntl(listener_, F_GETFL, 0);
    if (flags < 0 || fcntl(listener_, F_SETFL, flags | O_NONBLOCK) != 0) {
      return absl::InternalError(absl::StrCat("listening socket: ", ErrnoText(errno)));
    }
    TcpAddress local;
    local.length = sizeof(local.address);
    getsockname(listener_, reinterpret_cast<sockaddr*>(&local.address), &local.length);
    *bound = local.ToString();

    epoll_ = epoll_create1(EPOLL_CLOEXEC);
    timer_ = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    const sigset_t mask = StopSignals();
    signals_ = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);
    if (epoll_ < 0 || timer_ < 0 || signals_ < 0) {
      return absl::InternalError(absl::StrCat("epoll/timerfd/signalfd: ", ErrnoText(errno)));
    }
    for (auto [fd, tag] : {std::pair{listener_, kListenerTag}, std::pair{timer_, kTimerTag},
                           std::pair{signals_, kSignalTag}}) {
      epoll_event e{};
      e.events = EPOLLIN;
      e.data.u64 = tag;
      if (epoll_ctl(epoll_, EPOLL_CTL_ADD, fd, &e) != 0) {
        return absl::InternalError(absl::StrCat("epoll_ctl: ", ErrnoText(errno)));
      }
    }
    return absl::OkStatus();
  }

  // Serves until SIGTERM/SIGINT.
  absl::Status Run() {
    epoll_event events[256];
    while (true) {
      const int n = epoll_wait(epoll_, events, 256, -1);
      if (n < 0) {
        if (errno == EINTR) continue;
        return absl::InternalError(absl::StrCat("epoll_wait: ", ErrnoText(errno)));
      }
      for (int i = 0; i < n; ++i) {
        const uint64_t tag = events[i].data.u64;
        if (tag == kSignalTag) return absl::OkStatus();
        if (tag == kListenerTag) {
          Accept();
        } else if (tag == kTimerTag) {
          uint64_t expirations;
          while (read(timer_, &expirations, sizeof(expirations)) > 0) {
          }
          timer_armed_ = false;
        } else {
          OnSocket(tag >> 1, (tag & 1) != 0, events[i].events);
        }
      }
      ReleaseDue();
      ArmTimer();
    }
  }

 private:
  // A (connection, direction) with a chunk that falls due at `due`. Every
  // chunk gets due = read time + the one fixed delay, so appending them in
  // read order keeps this queue sorted by due time.
  struct Release {
    Clock::time_point due;
    uint64_t id;
    bool up;
  };

  void Accept() {
    while (true) {
      const int client = accept4(listener_, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (client < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
        if (errno == ECONNABORTED) continue;
        std::fprintf(stderr, "%s: accept: %s\n", kName, ErrnoText(errno).c_str());
        // Out of descriptors (EMFILE, ENFILE) and the like: the listener
        // would stay readable and wake the loop at once; leave it out of the
        // epoll set until a connection closes.
        if (!listener_paused_) {
          epoll_ctl(epoll_, EPOLL_CTL_DEL, listener_, nullptr);
          listener_paused_ = true;
        }
        return;
      }
      SetNoDelay(client);
      const TcpAddress& target = targets_[0];
      const int upstream =
          socket(target.address.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      if (upstream < 0) {
        std::fprintf(stderr, "%s: socket: %s\n", kName, ErrnoText(errno).c_str());
        close(client);
        continue;
      }
      SetNoDelay(upstream);
      bool connected = false;
      if (connect(upstream, reinterpret_cast<const sockaddr*>(&target.address), target.length) ==
          0) {
        connected = true;
      } else if (errno != EINPROGRESS) {
        std::fprintf(stderr, "%s: connect to %s: %s\n", kName, options_.target.c_str(),
                     ErrnoText(errno).c_str());
        close(upstream);
        close(client);
        continue;
      }
      auto c = std::make_unique<Connection>();
      c->id = next_id_++;
      c->client = client;
      c->upstream = upstream;
      c->upstream_connected = connected;
      c->up.from = client;
      c->up.to = upstream;
      c->down.from = upstream;
      c->down.to = client;
      Connection& ref = *c;
      connections_[c->id] = std::move(c);
      for (bool is_upstream : {false, true}) {
        epoll_event e{};
        e.events = 0;
        e.data.u64 = Tag(ref.id, is_upstream);
        epoll_ctl(epoll_, EPOLL_CTL_ADD, is_upstream ? upstream : client, &e);
      }
      UpdateInterest(ref);
    }
  }

  void OnSocket(uint64_t id, bool is_upstream, uint32_t events) {
    auto it = connections_.find(id);
    if (it == connections_.end()) return;  // closed earlier in this batch
    Connection& c = *it->second;
    if (is_upstream && !c.upstream_connected) {
      int error = 0;
      socklen_t length = sizeof(error);
      getsockopt(c.upstream, SOL_SOCKET, SO_ERROR, &error, &length);
      if (error != 0 || (events & (EPOLLERR | EPOLLHUP)) != 0) {
        std::fprintf(stderr, "%s: connect to %s: %s\n", kName, options_.target.c_str(),
                     ErrnoText(error != 0 ? error : ECONNREFUSED).c_str());
        CloseConnection(c);
        return;
      }
      if ((events & EPOLLOUT) == 0) return;
      c.upstream_connected = true;
      if (!Flush(c, c.up)) return;
      UpdateInterest(c);
      return;
    }
    Direction& reading = is_upstream ? c.down : c.up;  // this socket is its sender
    Direction& writing = is_upstream ? c.up : c.down;  // this socket is its receiver
    if ((events & EPOLLERR) != 0) {
      CloseConnection(c);  // a reset: the other side gets one too (close)
      return;
    }
    if ((events & (EPOLLIN | EPOLLHUP | EPOLLRDHUP)) != 0 && !reading.eof_read) {
      if (!Read(c, reading, /*drain=*/(events & EPOLLHUP) != 0)) return;
    }
    if ((events & EPOLLOUT) != 0 && writing.write_blocked) {
      writing.write_blocked = false;
      if (!Flush(c, writing)) return;
    }
    if ((events & EPOLLHUP) != 0 && !writing.shut_written) {
      // Hung up before we passed a FIN on: reset; nothing more can reach it.
      CloseConnection(c);
      return;
    }
    if (!MaybeFinish(c)) return;
    UpdateInterest(c);
  }

  // Reads what `d.from` has (up to the buffer limit unless `drain`) into
  // chunks due after the delay. False when the connection was closed.
  bool Read(Connection& c, Direction& d, bool drain) {
    const bool up = &d == &c.up;
    while (!d.eof_read &&
           (drain || d.queued_bytes < static_cast<size_t>(options_.max_buffer_bytes))) {
      const ssize_t n = recv(d.from, read_buffer_, sizeof(read_buffer_), 0);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) break;
        CloseConnection(c);
        return false;
      }
      const Clock::time_point due = Clock::now() + delay_;
      if (n == 0) d.eof_read = true;
      d.queued_bytes += static_cast<size_t>(n);
      d.queue.push_back(Chunk{due, std::string(read_buffer_, static_cast<size_t>(n)), 0});
      releases_.push_back(Release{due, c.id, up});
      if (n > 0 && static_cast<size_t>(n) < kReadChunk) break;  // the socket is empty
    }
    if (delay_.count() == 0) return Flush(c, d);
    return true;
  }

  // Writes the due chunks of `d`, passes a due FIN on. False when the
  // connection was closed.
  bool Flush(Connection& c, Direction& d) {
    if (&d == &c.up && !c.upstream_connected) return true;  // EPOLLOUT will flush
    const Clock::time_point now = Clock::now();
    while (!d.write_blocked && !d.queue.empty() && d.queue.front().due <= now) {
      Chunk& chunk = d.queue.front();
      if (chunk.bytes.empty()) {  // the FIN
        shutdown(d.to, SHUT_WR);
        d.shut_written = true;
        d.queue.pop_front();
        continue;
      }
      const ssize_t n = send(d.to, chunk.bytes.data() + chunk.written,
                             chunk.bytes.size() - chunk.written, MSG_NOSIGNAL);
      if (n < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
          d.write_blocked = true;
          break;
        }
        CloseConnection(c);  // EPIPE, ECONNRESET: the receiver is gone
        return false;
      }
      chunk.written += static_cast<size_t>(n);
      d.queued_bytes -= static_cast<size_t>(n);
      if (chunk.written == chunk.bytes.size()) d.queue.pop_front();
    }
    return MaybeFinish(c);
  }

  // Closes `c` once both FINs were passed on. False when it was closed.
  bool MaybeFinish(Connection& c) {
    if (c.up.shut_written && c.down.shut_written) {
      CloseConnection(c);
      return false;
    }
    return true;
  }

  // Chunks fall due in `releases_` order: flush each one's direction.
  void ReleaseDue() {
    const Clock::time_point now = Clock::now();
    while (!releases_.empty() && releases_.front().due <= now) {
      const Release r = releases_.front();
      releases_.pop_front();
      auto it = connections_.find(r.id);
      if (it == connections_.end()) continue;
      Connection& c = *it->second;
      if (Flush(c, r.up ? c.up : c.down)) UpdateInterest(c);
    }
  }

  // The timer goes off when the earliest waiting chunk is due.
  void ArmTimer() {
    if (releases_.empty()) {
      if (timer_armed_) {
        itimerspec off{};
        timerfd_settime(timer_, 0, &off, nullptr);
        timer_armed_ = false;
      }
      return;
    }
    const Clock::time_point due = releases_.front().due;
    if (timer_armed_ && armed_for_ == due) return;
    const auto ns =
        std::chrono::duration_cast<std::chrono::nanoseconds>(due.time_since_epoch()).count();
    itimerspec when{};
    when.it_value.tv_sec = ns / 1'000'000'000;
    when.it_value.tv_nsec = ns % 1'000'000'000;
    if (when.it_value.tv_sec == 0 && when.it_value.tv_nsec == 0) when.it_value.tv_nsec = 1;
    timerfd_settime(timer_, TFD_TIMER_ABSTIME, &when, nullptr);
    timer_armed_ = true;
    armed_for_ = due;
  }

  // Wants to read a socket while its direction is open and under the buffer
  // limit; to write it while its direction is blocked or it is connecting. A
  // socket done both ways (FIN read, FIN passed on) leaves the epoll set, so
  // its standing EPOLLHUP does not wake the loop while the other socket
  // finishes.
  void UpdateInterest(Connection& c) {
    const auto update = [&](int fd, bool is_upstream, const Direction& reading,
                            const Direction& writing, bool connecting, uint32_t* current) {
      if (*current == kUnregistered) return;
      if (reading.eof_read && writing.shut_written) {
        epoll_ctl(epoll_, EPOLL_CTL_DEL, fd, nullptr);
        *current = kUnregistered;
        return;
      }
      uint32_t wanted = 0;
      if (!reading.eof_read && !connecting &&
          reading.queued_bytes < static_cast<size_t>(options_.max_buffer_bytes)) {
        wanted |= EPOLLIN | EPOLLRDHUP;
      }
      if (writing.write_blocked || connecting) wanted |= EPOLLOUT;
      if (wanted == *current) return;
      epoll_event e{};
      e.events = wanted;
      e.data.u64 = Tag(c.id, is_upstream);
      epoll_ctl(epoll_, EPOLL_CTL_MOD, fd, &e);
      *current = wanted;
    };
    update(c.client, false, c.up, c.down, false, &c.client_events);
    update(c.upstream, true, c.down, c.up, !c.upstream_connected, &c.upstream_events);
  }

  static void CloseFds(Connection& c) {
    for (int fd : {c.client, c.upstream}) {
      if (fd >= 0) close(fd);
    }
    c.client = c.upstream = -1;
  }

  void CloseConnection(Connection& c) {
    CloseFds(c);  // closing removes the fds from the epoll set
    connections_.erase(c.id);
    if (listener_paused_) {  // descriptors are free again: accept again
      epoll_event e{};
      e.events = EPOLLIN;
      e.data.u64 = kListenerTag;
      epoll_ctl(epoll_, EPOLL_CTL_ADD, listener_, &e);
      listener_paused_ = false;
    }
  }

  Options options_;
  Clock::duration delay_{};
  std::vector<TcpAddress> targets_;
  int listener_ = -1;
  int epoll_ = -1;
  int timer_ = -1;
  int signals_ = -1;
  bool timer_armed_ = false;
  bool listener_paused_ = false;  // out of descriptors: not accepting until one closes
  Clock::time_point armed_for_{};
  uint64_t next_id_ = kFirstConnectionId;
  std::unordered_map<uint64_t, std::unique_ptr<Connection>> connections_;
  std::deque<Release> releases_;
  char read_buffer_[kReadChunk];
};

int Run(int argc, char** argv) {
  // Block the shutdown signals: the signalfd in the epoll set receives them.
  BlockStopSignals();
  signal(SIGPIPE, SIG_IGN);
  // Timer wake-ups on time rather than up to 50 us late (the default slack).
  prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);

  const std::vector<std::string> args(argv + 1, argv + argc);
  Flags flags;
  if (std::optional<int> code =
          HandleCommandLine(kName, HelpText(Spec()), Spec().flags, args, &flags)) {
    return *code;
  }
  absl::StatusOr<Options> options = OptionsFromFlags(flags);
  if (!options.ok()) {
    std::fprintf(stderr, "%s: %s\nsee %s --help\n", kName,
                 std::string(options.status().message()).c_str(), kName);
    return 2;
  }
  DelayProxy proxy(*options);
  std::string bound;
  if (absl::Status s = proxy.Start(&bound); !s.ok()) {
    std::fprintf(stderr, "%s: %s\n", kName, std::string(s.message()).c_str());
    return s.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  std::printf("%s listening on %s -> %s delay-us=%lld\n", kName, bound.c_str(),
              options->target.c_str(), static_cast<long long>(options->delay_us));
  std::fflush(stdout);
  if (absl::Status s = proxy.Run(); !s.ok()) {
    std::fprintf(stderr, "%s: %s\n", kName, std::string(s.message()).c_str());
    return 1;
  }
  return 0;
}

}  // namespace
}  // namespace switchyard

int main(int argc, char** argv) { return switchyard::Run(argc, argv); }
