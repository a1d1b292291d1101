// rpc/frame_socket.h: frames over socket pairs and real TCP and unix
// listeners; every way a read can fail says which way.
#include "rpc/frame_socket.h"

#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <string>
#include <thread>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "switchyard/v1/expert.pb.h"

namespace switchyard::rpc {
namespace {

using ::testing::HasSubstr;

absl::Time In(absl::Duration d) { return absl::Now() + d; }

// A connected non-blocking pair, as AcceptFrames and DialFrames make them.
std::pair<FrameSocket, FrameSocket> Pair() {
  int fds[2];
  EXPECT_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, fds), 0);
  return {FrameSocket(fds[0]), FrameSocket(fds[1])};
}

TEST(FrameSocketTest, AMessageRoundTripsWhole) {
  auto [a, b] = Pair();
  v1::ForwardStreamRequest sent;
  sent.set_id(7);
  sent.set_timeout_micros(1234);
  v1::ForwardRequest* batch = sent.add_batches();
  batch->set_layer(3);
  batch->mutable_hidden_states()->set_data(std::string(100000, 'x'));  // several sends
  // The writer runs beside the reader: the frame is larger than the pair's buffer.
  std::thread writer([&] { EXPECT_TRUE(WriteMessageFrame(a, sent, In(absl::Seconds(10))).ok()); });
  v1::ForwardStreamRequest got;
  const absl::Status s = ReadMessageFrame(b, 1 << 20, In(absl::Seconds(10)), &got);
  writer.join();
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(got.SerializeAsString(), sent.SerializeAsString());
  // Raw frames too, an empty one included.
  ASSERT_TRUE(WriteFrame(a, "", In(absl::Seconds(1))).ok());
  ASSERT_TRUE(WriteFrame(a, "token", In(absl::Seconds(1))).ok());
  std::string payload = "stale";
  ASSERT_TRUE(ReadFrame(b, 16, In(absl::Seconds(1)), &payload).ok());
  EXPECT_EQ(payload, "");
  ASSERT_TRUE(ReadFrame(b, 16, In(absl::Seconds(1)), &payload).ok());
  EXPECT_EQ(payload, "token");
}

// Version 2: the message, then a tail the writer fills in place; the reader
// gets both, the tail as a view into the frame it owns. A version 1 frame
// read the same way has no tail; a reader that takes no tail, or a raw
// reader, refuses a version 2 frame; a message length past the payload is
// refused by name.
TEST(FrameSocketTest, AMessageAndItsTailRoundTrip) {
  auto [a, b] = Pair();
  v1::ForwardStreamRequest sent;
  sent.set_id(8);
  sent.add_batches()->set_layer(2);
  std::string tail_sent(300000, '\0');  // several sends
  for (size_t i = 0; i < tail_sent.size(); ++i) tail_sent[i] = static_cast<char>(i * 7);
  std::thread writer([&, &a = a] {
    EXPECT_TRUE(WriteMessageFrameWithTail(
                    a, sent, tail_sent.size(),
                    [&](char* tail) { std::memcpy(tail, tail_sent.data(), tail_sent.size()); },
                    In(absl::Seconds(10)))
                    .ok());
    EXPECT_TRUE(WriteMessageFrameWithTail(
                    a, sent, 0, [](char*) {}, In(absl::Seconds(1)))
                    .ok());
    EXPECT_TRUE(WriteMessageFrame(a, sent, In(absl::Seconds(1))).ok());
    EXPECT_TRUE(WriteMessageFrameWithTail(
                    a, sent, 1, [](char* t) { *t = 'z'; }, In(absl::Seconds(1)))
                    .ok());
    EXPECT_TRUE(WriteMessageFrameWithTail(
                    a, sent, 1, [](char* t) { *t = 'z'; }, In(absl::Seconds(1)))
                    .ok());
  });
  v1::ForwardStreamRequest got;
  FrameTail tail;
  absl::Status s = ReadMessageFrame(b, 1 << 20, In(absl::Seconds(10)), &got, &tail);
  ASSERT_TRUE(s.ok()) << s;
  EXPECT_EQ(got.SerializeAsString(), sent.SerializeAsString());
  EXPECT_TRUE(tail.present);
  EXPECT_EQ(tail.bytes, tail_sent);
  ASSERT_TRUE(tail.view().has_value());
  // An empty tail is still a version 2 frame.
  ASSERT_TRUE(ReadMessageFrame(b, 1 << 20, In(absl::Seconds(1)), &got, &tail).ok());
  EXPECT_TRUE(tail.present);
  EXPECT_EQ(tail.bytes.size(), 0u);
  // Version 1: no tail.
  ASSERT_TRUE(ReadMessageFrame(b, 1 << 20, In(absl::Seconds(1)), &got, &tail).ok());
  EXPECT_FALSE(tail.present);
  EXPECT_FALSE(tail.view().has_value());
  EXPECT_EQ(got.id(), 8u);
  // A reader that takes no tail, and a raw reader, refuse version 2.
  s = ReadMessageFrame(b, 1 << 20, In(absl::Seconds(1)), &got);
  EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("a version 2 frame"));
  writer.join();
  std::string payload;
  {
    auto [c, d] = Pair();
    ASSERT_TRUE(WriteMessageFrameWithTail(
                    c, sent, 1, [](char* t) { *t = 'z'; }, In(absl::Seconds(1)))
                    .ok());
    s = ReadFrame(d, 1 << 20, In(absl::Seconds(1)), &payload);
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("a version 2 frame where a plain one"));
  }
  {  // a message length past the payload; a payload too short for one
    auto [c, d] = Pair();
    ASSERT_EQ(send(c.fd(), "SYF2\x06\0\0\0\x09\0\0\0ab", 14, MSG_NOSIGNAL), 14);
    ASSERT_EQ(send(c.fd(), "SYF2\x02\0\0\0ab", 10, MSG_NOSIGNAL), 10);
    s = ReadMessageFrame(d, 64, In(absl::Seconds(1)), &got, &tail);
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("its message length says 9"));
    s = ReadMessageFrame(d, 64, In(absl::Seconds(1)), &got, &tail);
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("shorter than its message length"));
  }
}

TEST(FrameSocketTest, ReadsFailNamingWhy) {
  std::string payload;
  {  // nothing comes: the deadline
    auto [a, b] = Pair();
    const auto start = std::chrono::steady_clock::now();
    const absl::Status s = ReadFrame(b, 16, In(absl::Milliseconds(50)), &payload);
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
    std::printf("[ deadline ] 50 ms deadline, returned after %.1f ms\n", ms);
    EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
    EXPECT_GE(ms, 45.0);
    EXPECT_LT(ms, 2000.0);
    EXPECT_FALSE(WaitReadable(b, In(absl::Milliseconds(10))));
  }
  {  // the peer closes, also in the middle of a frame
    auto [a, b] = Pair();
    ASSERT_EQ(send(a.fd(), "SYF1\x10\0\0\0abc", 11, MSG_NOSIGNAL), 11);
    a.Close();
    const absl::Status s = ReadFrame(b, 64, In(absl::Seconds(1)), &payload);
    EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("closed by the peer"));
  }
  {  // not our protocol
    auto [a, b] = Pair();
    ASSERT_EQ(send(a.fd(), "HTTP/1.1 200 OK\r\n", 17, MSG_NOSIGNAL), 17);
    const absl::Status s = ReadFrame(b, 64, In(absl::Seconds(1)), &payload);
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("bad magic"));
  }
  {  // over the limit: refused before it is read
    auto [a, b] = Pair();
    ASSERT_TRUE(WriteFrame(a, std::string(100, 'x'), In(absl::Seconds(1))).ok());
    const absl::Status s = ReadFrame(b, 99, In(absl::Seconds(1)), &payload);
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("100 bytes is over the limit of 99"));
  }
  {  // a frame that is not the message expected
    auto [a, b] = Pair();
    ASSERT_TRUE(WriteFrame(a, "\xff\xff\xff", In(absl::Seconds(1))).ok());
    v1::ForwardStreamResponse response;
    const absl::Status s = ReadMessageFrame(b, 64, In(absl::Seconds(1)), &response);
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("ForwardStreamResponse"));
  }
  {  // a message frame over protobuf's 2 GiB, within the byte limit: refused
     // from its header, without waiting for (or allocating) its payload
    auto [a, b] = Pair();
    ASSERT_EQ(send(a.fd(), "SYF1\x00\x00\x00\x90", 8, MSG_NOSIGNAL), 8);  // 0x90000000 bytes
    v1::ForwardStreamRequest request;
    const absl::Status s =
        ReadMessageFrame(b, std::numeric_limits<uint32_t>::max(), In(absl::Seconds(5)), &request);
    EXPECT_EQ(s.code(), absl::StatusCode::kDataLoss) << s;
    EXPECT_THAT(std::string(s.message()), HasSubstr("2415919104 bytes is not a"));
  }
  {  // writing to a closed peer: an error, not SIGPIPE
    auto [a, b] = Pair();
    b.Close();
    const absl::Status s = WriteFrame(a, "x", In(absl::Seconds(1)));
    EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  }
}

// PollSpinning sees what is there at once, what comes while it spins, and
// what comes after (then it blocks in poll); a timeout shorter than the
// spin ends the spin (a 60 s spin against a 20 ms timeout returns in well
// under 60 s). WaitReadable with a spin answers as without one.
TEST(FrameSocketTest, PollSpinningSeesDataWhileAndAfterItSpins) {
  auto [a, b] = Pair();
  pollfd p{.fd = b.fd(), .events = POLLIN, .revents = 0};
  EXPECT_EQ(PollSpinning(absl::MakeSpan(&p, 1), 0, absl::Milliseconds(1)), 0);

  const auto started = std::chrono::steady_clock::now();
  EXPECT_EQ(PollSpinning(absl::MakeSpan(&p, 1), 20, absl::Seconds(60)), 0);
  EXPECT_LT(std::chrono::steady_clock::now() - started, std::chrono::seconds(30));

  for (const auto& [after_ms, spin] :
       {std::pair{5, absl::Seconds(10)}, std::pair{50, absl::Milliseconds(1)}}) {
    const int write_after_ms = after_ms;
    std::thread writer([&a, write_after_ms] {
      std::this_thread::sleep_for(std::chrono::milliseconds(write_after_ms));
      EXPECT_TRUE(WriteFrame(a, "x", In(absl::Seconds(5))).ok());
    });
    p.revents = 0;
    EXPECT_EQ(PollSpinning(absl::MakeSpan(&p, 1), -1, spin), 1) << write_after_ms;
    EXPECT_NE(p.revents & POLLIN, 0) << write_after_ms;
    writer.join();
    std::string payload;
    ASSERT_TRUE(ReadFrame(b, 16, In(absl::Seconds(1)), &payload).ok());
    EXPECT_EQ(payload, "x");
  }

  EXPECT_FALSE(WaitReadable(b, In(absl::Milliseconds(10)), absl::Milliseconds(2)));
  ASSERT_TRUE(WriteFrame(a, "y", In(absl::Seconds(1))).ok());
  EXPECT_TRUE(WaitReadable(b, In(absl::Seconds(5)), absl::Milliseconds(2)));
  a.Close();  // a closed peer is readable too: the next read says so
  std::string payload;
  ASSERT_TRUE(ReadFrame(b, 16, In(absl::Seconds(1)), &payload).ok());
  EXPECT_TRUE(WaitReadable(b, absl::InfiniteFuture(), absl::Milliseconds(2)));
}

// Listen, dial and accept over TCP (a picked port) and a unix socket.
TEST(FrameSocketTest, ListensDialsAndAccepts) {
  const std::string path =
      (std::filesystem::temp_directory_path() / absl::StrCat("sy-frames-", getpid(), ".sock"))
          .string();
  for (const std::string& listen : {std::string("127.0.0.1:0"), "unix:" + path}) {
    int port = -1;
    absl::StatusOr<FrameSocket> listener = ListenFrames(listen, &port);
    ASSERT_TRUE(listener.ok()) << listener.status();
    const bool tcp = listen.rfind("unix:", 0) != 0;
    EXPECT_EQ(port > 0, tcp) << listen;
    const std::string address = tcp ? absl::StrCat("127.0.0.1:", port) : listen;
    std::thread server([&, fd = listener->fd()] {
      absl::StatusOr<FrameSocket> accepted = AcceptFrames(fd);
      ASSERT_TRUE(accepted.ok()) << accepted.status();
      EXPECT_TRUE(WriteFrame(*accepted, "hello", In(absl::Seconds(5))).ok());
    });
    absl::StatusOr<FrameSocket> dialed = DialFrames(address, In(absl::Seconds(5)));
    ASSERT_TRUE(dialed.ok()) << dialed.status();
    std::string greeting;
    const absl::Status read = ReadFrame(*dialed, 16, In(absl::Seconds(5)), &greeting);
    server.join();
    EXPECT_TRUE(read.ok()) << read;
    EXPECT_EQ(greeting, "hello") << listen;
    // Closed listener: the dial is refused at once.
    listener->Close();
    const absl::StatusOr<FrameSocket> refused = DialFrames(address, In(absl::Seconds(5)));
    EXPECT_EQ(refused.status().code(), absl::StatusCode::kUnavailable) << refused.status();
  }
  std::filesystem::remove(path);
  int port = 0;
  EXPECT_EQ(ListenFrames("no-port", &port).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ListenFrames("127.0.0.1:99999", &port).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(DialFrames("127.0.0.1:x", In(absl::Seconds(1))).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// A shutdown listener wakes a blocked accept (how a frame server stops).
TEST(FrameSocketTest, ShutdownWakesABlockedAccept) {
  int port = 0;
  absl::StatusOr<FrameSocket> listener = ListenFrames("127.0.0.1:0", &port);
  ASSERT_TRUE(listener.ok()) << listener.status();
  absl::Status accepted;
  std::thread server([&, fd = listener->fd()] { accepted = AcceptFrames(fd).status(); });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  shutdown(listener->fd(), SHUT_RDWR);
  server.join();
  EXPECT_EQ(accepted.code(), absl::StatusCode::kUnavailable) << accepted;
}

}  // namespace
}  // namespace switchyard::rpc
