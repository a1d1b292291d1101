// libFuzzer target for the expert hop's frames (rpc/frame_socket.h) and the
// tensors in them (rpc/tensor_codec.h): the first byte picks the frame's
// magic (even: version 1 "SYF1", odd: version 2 "SYF2"), the rest is its
// payload. The frame goes through a real socket pair into ReadMessageFrame
// as a switchyard.v1.ForwardStreamRequest, and every batch's hidden states
// are decoded as the expert decodes them (DecodeMatrixInto with the frame's
// tail). A frame it refuses must be DATA_LOSS; a tensor it refuses must be
// INVALID_ARGUMENT; a tensor it accepts must take its bytes from inside the
// tail (or from `data`), and F32 must decode to exactly those bytes. ASan
// checks that no read leaves the frame.
#include <sys/socket.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "fuzz/fuzz_check.h"
#include "rpc/frame_socket.h"
#include "rpc/tensor_codec.h"
#include "switchyard/v1/expert.pb.h"

namespace {

namespace rpc = switchyard::rpc;
namespace v1 = switchyard::v1;

// Decodes `x` as the expert would, for every D its shape could name.
void CheckTensor(const v1::Tensor& x, const rpc::FrameTail& tail) {
  if (x.shape_size() != 2) return;
  const int64_t n = x.shape(0), d = x.shape(1);
  // Only shapes whose output fits a small buffer (the checks before the
  // byte count are the same for any shape).
  if (n < 1 || d < 1 || n > 4096 || d > 4096 || n * d > (1 << 16)) return;
  std::vector<float> out(static_cast<size_t>(n * d));
  const absl::Status s = rpc::DecodeMatrixInto(x, d, n, out.data(), "x", tail.view());
  if (!s.ok()) {
    FUZZ_CHECK(s.code() == absl::StatusCode::kInvalidArgument, "decode failed with %s",
               s.ToString().c_str());
    return;
  }
  const size_t size = x.dtype() == v1::DTYPE_F32 ? 4 : 2;
  const size_t bytes = static_cast<size_t>(n * d) * size;
  const char* from;
  if (x.has_frame_tail_offset()) {
    FUZZ_CHECK(tail.present, "a tail offset decoded without a tail");
    FUZZ_CHECK(x.data().empty(), "a tensor with both data and a tail offset decoded");
    FUZZ_CHECK(x.frame_tail_offset() <= tail.bytes.size() &&
                   bytes <= tail.bytes.size() - x.frame_tail_offset(),
               "%zu bytes at tail offset %llu decoded from a tail of %zu", bytes,
               static_cast<unsigned long long>(x.frame_tail_offset()), tail.bytes.size());
    from = tail.bytes.data() + x.frame_tail_offset();
  } else {
    FUZZ_CHECK(x.data().size() == bytes, "%zu data bytes decoded as %zu", x.data().size(), bytes);
    from = x.data().data();
  }
  if (x.dtype() == v1::DTYPE_F32) {
    FUZZ_CHECK(std::memcmp(out.data(), from, bytes) == 0, "F32 rows not decoded exactly");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const bool version2 = (data[0] & 1) != 0;
  const std::string payload(reinterpret_cast<const char*>(data) + 1, size - 1);
  std::string frame = version2 ? "SYF2" : "SYF1";
  for (int i = 0; i < 4; ++i)
    frame.push_back(static_cast<char>((payload.size() >> (8 * i)) & 0xff));
  frame += payload;
  int fds[2];
  FUZZ_CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds) == 0,
             "socketpair");
  rpc::FrameSocket writer(fds[0]), reader(fds[1]);
  // -max_len=4096: the whole frame fits the pair's buffer, so one thread
  // writes it and then reads it.
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  FUZZ_CHECK(rpc::WriteFrame(writer, "", deadline).ok(), "write");  // a greeting first
  std::string greeting;
  FUZZ_CHECK(rpc::ReadFrame(reader, 16, deadline, &greeting).ok(), "greeting");
  FUZZ_CHECK(send(writer.fd(), frame.data(), frame.size(), MSG_NOSIGNAL) ==
                 static_cast<ssize_t>(frame.size()),
             "send");
  v1::ForwardStreamRequest request;
  rpc::FrameTail tail;
  const absl::Status read = rpc::ReadMessageFrame(reader, 1 << 20, deadline, &request, &tail);
  if (!read.ok()) {
    FUZZ_CHECK(read.code() == absl::StatusCode::kDataLoss, "read failed with %s",
               read.ToString().c_str());
    return 0;
  }
  FUZZ_CHECK(tail.present == version2, "tail present %d for version %d", tail.present,
             version2 ? 2 : 1);
  for (const v1::ForwardRequest& batch : request.batches())
    CheckTensor(batch.hidden_states(), tail);
  return 0;
}
