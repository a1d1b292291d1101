// Length-prefixed protobuf frames on a plain socket: the expert data path
// ("frames") that carries ForwardStream's messages between a gateway and an
// expert shard without gRPC's HTTP/2 machinery (issue #10: a hop through
// gRPC 1.51 costs ~500 us under load where a socket round trip costs ~50 us).
// gRPC stays the control plane: GetShardInfo says where a shard's frame
// socket is (ShardInfo.frame_port / frame_unix_path) and which token its
// greeting carries (ShardInfo.frame_token), health, reflection and TLS.
//
// Wire format: every frame is an 8-byte header, the magic "SYF1" and the
// payload length as a little-endian uint32, then the payload. The server
// speaks first: on accept it sends one greeting frame whose payload is its
// token, so a client that dialled the wrong port (something else listening
// there, an older shard, a restarted shard on a reused port) finds out at
// once instead of waiting for a reply. After that, the client sends
// ForwardStreamRequest frames and the server answers each with a
// ForwardStreamResponse frame carrying the same id.
//
// All functions take a deadline and return DEADLINE_EXCEEDED when it
// passes, UNAVAILABLE when the peer closed or the socket failed, and
// DATA_LOSS for a frame that is not ours (bad magic, oversized, unparsable).
// Thread-safety: functions only; one fd must not be read (or written) by
// two threads at once.
#ifndef SWITCHYARD_RPC_FRAME_SOCKET_H_
#define SWITCHYARD_RPC_FRAME_SOCKET_H_

#include <google/protobuf/message_lite.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace switchyard::rpc {

inline constexpr size_t kFrameHeaderBytes = 8;

// A socket the caller owns; closed by the destructor. Movable.
class FrameSocket {
 public:
  FrameSocket() = default;
  explicit FrameSocket(int fd) : fd_(fd) {}
  FrameSocket(FrameSocket&& other) noexcept : fd_(other.release()) {}
  FrameSocket& operator=(FrameSocket&& other) noexcept;
  FrameSocket(const FrameSocket&) = delete;
  FrameSocket& operator=(const FrameSocket&) = delete;
  ~FrameSocket() { Close(); }

  int fd() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  int release();
  void Close();

 private:
  int fd_ = -1;
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

// Writes one frame with `payload` (one send for header and payload).
absl::Status WriteFrame(int fd, std::string_view payload, absl::Time deadline);
// Serializes `message` and writes it as one frame.
absl::Status WriteMessageFrame(int fd, const google::protobuf::MessageLite& message,
                               absl::Time deadline);

// Reads one frame's payload into `*payload`; DATA_LOSS if its length is over
// `max_bytes` (nothing more is read: the socket is then useless).
absl::Status ReadFrame(int fd, size_t max_bytes, absl::Time deadline, std::string* payload);
// Reads one frame and parses it into `message`.
absl::Status ReadMessageFrame(int fd, size_t max_bytes, absl::Time deadline,
                              google::protobuf::MessageLite* message);

// Blocks until `fd` is readable or `deadline`; true when readable (or
// closed: the next read says so).
bool WaitReadable(int fd, absl::Time deadline);

}  // namespace switchyard::rpc

#endif  // SWITCHYARD_RPC_FRAME_SOCKET_H_
