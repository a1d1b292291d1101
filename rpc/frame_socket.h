// Length-prefixed protobuf frames on a plain socket: the expert data path
// ("frames") that carries ForwardStream's messages between a gateway and an
// expert shard without gRPC's HTTP/2 machinery (issue #10: a hop through
// gRPC 1.51 costs ~500 us under load where a socket round trip costs ~50 us).
// gRPC stays the control plane: GetShardInfo says where a shard's frame
// socket is (ShardInfo.frame_port / frame_unix_path) and which token its
// greeting carries (ShardInfo.frame_token), health and reflection.
//
// TLS: where the shard's gRPC port serves TLS, its frame socket does too,
// with the same certificate and client-certificate rule (a FrameTlsContext
// from rpc/tls.h). The handshake comes first, then the greeting inside it;
// the frames are the same. Both sides set no session tickets or
// renegotiation, so an idle connection carries no bytes (a readable idle
// socket still means the peer closed it).
//
// Wire format: every frame is an 8-byte header, a magic and the payload
// length as a little-endian uint32, then the payload. Version 1 ("SYF1"):
// the payload is the message. Version 2 ("SYF2"): the payload is the
// message's length as a little-endian uint32, the message, then a tail of
// raw bytes that the message's tensors point into (Tensor.frame_tail_offset),
// so rows of hidden states are encoded straight into the frame and decoded
// straight out of it: protobuf copies neither (at 256 rows those copies were
// ~20% of the hop, issue #10). The server speaks first: on accept it sends
// one greeting frame (version 1) whose payload is its token, so a client
// that dialled the wrong port (something else listening there, an older
// shard, a restarted shard on a reused port) finds out at once instead of
// waiting for a reply. After that, the client sends ForwardStreamRequest
// frames and the server answers each with a ForwardStreamResponse frame
// carrying the same id, in the request's version. A client sends version 2
// only to a shard whose ShardInfo.frame_version is 2 or more.
//
// All functions take a deadline and return DEADLINE_EXCEEDED when it
// passes, UNAVAILABLE when the peer closed or the socket failed, and
// DATA_LOSS for a frame that is not ours (bad magic, oversized, unparsable).
// Thread-safety: one socket may be read by one thread while another writes
// it (TLS sessions serialise their OpenSSL calls inside); two readers or two
// writers at once are not allowed.
#ifndef SWITCHYARD_RPC_FRAME_SOCKET_H_
#define SWITCHYARD_RPC_FRAME_SOCKET_H_

#include <google/protobuf/message_lite.h>
#include <poll.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"

struct ssl_ctx_st;  // OpenSSL's SSL_CTX

namespace switchyard::rpc {

inline constexpr size_t kFrameHeaderBytes = 8;
// The newest frame version this build reads and writes.
inline constexpr int kFrameVersion = 2;

// What followed the message in a frame: a version 2 frame's tail, which its
// tensors point into. Owns the frame's bytes. Movable.
struct FrameTail {
  // Whether the frame was version 2 (false: a version 1 frame, no tail).
  bool present = false;
  // The tail's bytes, inside `buffer`.
  std::string_view bytes;
  std::unique_ptr<char[]> buffer;

  // The tail, for DecodeMatrixInto; nullopt where the frame had none.
  std::optional<std::string_view> view() const {
    return present ? std::optional<std::string_view>(bytes) : std::nullopt;
  }
};

// An OpenSSL context for frame sockets: certificate, key, trusted CAs and
// the peer-certificate rule, for one side (server or client). Built from PEM
// files by rpc/tls.h (FrameServerTlsFromFiles, FrameClientTlsFromFiles).
// Thread-safety: immutable once built; shared by every connection.
class FrameTlsContext {
 public:
  // Takes ownership of `ctx`.
  FrameTlsContext(ssl_ctx_st* ctx, bool server) : ctx_(ctx), server_(server) {}
  ~FrameTlsContext();
  FrameTlsContext(const FrameTlsContext&) = delete;
  FrameTlsContext& operator=(const FrameTlsContext&) = delete;

  ssl_ctx_st* get() const { return ctx_; }
  bool server() const { return server_; }

 private:
  ssl_ctx_st* const ctx_;
  const bool server_;
};

// A socket the caller owns, plaintext or (after StartClientTls /
// StartServerTls) TLS; closed by the destructor. Movable.
class FrameSocket {
 public:
  FrameSocket();
  explicit FrameSocket(int fd);
  FrameSocket(FrameSocket&& other) noexcept;
  FrameSocket& operator=(FrameSocket&& other) noexcept;
  FrameSocket(const FrameSocket&) = delete;
  FrameSocket& operator=(const FrameSocket&) = delete;
  ~FrameSocket();

  int fd() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  // Whether frames on it are TLS records.
  bool tls() const { return tls_ != nullptr; }
  // Whether bytes have arrived that a poll on fd() no longer shows: TLS
  // records already decrypted and not yet read. Always false in plaintext.
  bool HasBufferedInput() const;
  // Gives up the descriptor without closing it (plaintext sockets only: a
  // TLS session cannot go with it).
  int release();
  void Close();

  // The TLS session (frame_socket.cc).
  struct Tls;

 private:
  friend struct FrameIo;
  int fd_ = -1;
  std::unique_ptr<Tls> tls_;
};

// Listens on "HOST:PORT" (TCP; port 0 picks a free one) or "unix:PATH"
// (an old socket file there is replaced). `*bound_port` gets the TCP port
// (0 for unix sockets).
absl::StatusOr<FrameSocket> ListenFrames(const std::string& address, int* bound_port);

// Accepts one connection from a ListenFrames socket (blocks until one comes
// or the listener is shut down: UNAVAILABLE). The socket is non-blocking
// and TCP_NODELAY, as the frame functions expect.
absl::StatusOr<FrameSocket> AcceptFrames(int listen_fd);

// Connects to "HOST:PORT" or "unix:PATH" by `deadline` (TCP_NODELAY on).
absl::StatusOr<FrameSocket> DialFrames(const std::string& address, absl::Time deadline);

// The TLS handshake on a connected plaintext socket, as the client: the
// server's certificate must chain to `tls`'s CAs and name `verify_host` (a
// DNS name, or an IP address matched against the certificate's IP
// entries), which is also sent as SNI. UNAVAILABLE with OpenSSL's reason
// (the verification error where there is one) when it fails,
// DEADLINE_EXCEEDED at `deadline`. `tls` must be a client context.
absl::Status StartClientTls(FrameSocket& socket, const FrameTlsContext& tls,
                            const std::string& verify_host, absl::Time deadline);
// The same as the server, on an accepted socket; a client certificate is
// checked as `tls` says. `tls` must be a server context.
absl::Status StartServerTls(FrameSocket& socket, const FrameTlsContext& tls, absl::Time deadline);

// Writes one frame with `payload` (one send for header and payload).
absl::Status WriteFrame(FrameSocket& socket, std::string_view payload, absl::Time deadline);
// Serializes `message` and writes it as one frame (version 1).
absl::Status WriteMessageFrame(FrameSocket& socket, const google::protobuf::MessageLite& message,
                               absl::Time deadline);
// Writes `message` and a tail of `tail_bytes` as one version 2 frame:
// `fill_tail` is called once with the tail's first byte, and must write all
// of them, before the frame is sent.
absl::Status WriteMessageFrameWithTail(FrameSocket& socket,
                                       const google::protobuf::MessageLite& message,
                                       size_t tail_bytes, absl::FunctionRef<void(char*)> fill_tail,
                                       absl::Time deadline);

// Reads one version 1 frame's payload into `*payload`; DATA_LOSS if its
// length is over `max_bytes` (nothing more is read: the socket is then
// useless) or it is a version 2 frame.
absl::Status ReadFrame(FrameSocket& socket, size_t max_bytes, absl::Time deadline,
                       std::string* payload);
// Reads one frame and parses its message into `message`. With `tail`, a
// version 2 frame's tail goes there (for a version 1 frame, one that is not
// present); without, a version 2 frame is DATA_LOSS.
absl::Status ReadMessageFrame(FrameSocket& socket, size_t max_bytes, absl::Time deadline,
                              google::protobuf::MessageLite* message, FrameTail* tail = nullptr);

// Blocks until `socket` has something to read or `deadline`; true when it
// has (or is closed: the next read says so). With `spin` > 0 it first polls
// without blocking for up to that long (see PollSpinning).
bool WaitReadable(FrameSocket& socket, absl::Time deadline,
                  absl::Duration spin = absl::ZeroDuration());

// poll(2) on `fds` with `timeout_ms` (-1: none), but first without blocking,
// again and again, for up to `spin` (at most the timeout): an answer that
// comes within the spin is seen without the thread sleeping and being woken,
// which costs 20-80 us a time on a shared virtual CPU. Between rounds it
// yields the core to any thread waiting for it, so on a crowded host it
// slows others less, but it keeps a core busy: it pays where the spinning
// thread has a core of its own (bench/dispatch_bench path:3). Returns what
// poll returned last (> 0: ready).
int PollSpinning(absl::Span<pollfd> fds, int timeout_ms, absl::Duration spin);
// The longest spin the gateway's and the expert's options accept, in us.
inline constexpr int kMaxSpinUs = 100000;

}  // namespace switchyard::rpc

#endif  // SWITCHYARD_RPC_FRAME_SOCKET_H_
