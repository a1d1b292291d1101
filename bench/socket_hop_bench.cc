// The floor of the gateway -> expert hop without gRPC (issue #10): what a
// data path of our own, where the thread that waits for a reply reads it
// itself and the expert's reading thread computes, would cost under the same
// load as the split cluster at batch 1.
//
// Each iteration is one layer: the "gateway" streams 5 MB of weights with
// OpenMP (its attention), writes a 4 KB request (one token's hidden state)
// to the "expert" process and blocks reading the reply; the expert, blocked
// reading its socket, streams 44 MB with OpenMP (two bench-model experts in
// BF16), then writes the reply with its compute time in it. The manual
// time of an iteration is the round trip minus the expert's compute: the
// hop alone, with caches and cores as the compute left them. Counters: p50,
// p90, p99 of that (us) and the mean compute (us). The expert is this
// binary, spawned with --socket-hop-expert=FD (a fresh process, so OpenMP
// never meets fork).
//
//   OMP_NUM_THREADS=2 OMP_WAIT_POLICY=passive socket_hop_bench [--benchmark_...]
//
// (the gateway's OpenMP as `switchyard up` starts it; the expert always gets
// OpenMP's default wait policy, as up's experts do).
//
// Compare with `switchyard bench --metrics` on a split cluster (network +
// queue per expert call) in the same session: README, "Split layouts on one
// host".
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <omp.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "benchmark/benchmark.h"

extern char** environ;

namespace {

constexpr size_t kMessageBytes = 4096 + 8;     // a [1, 1024] FP32 row + the compute time
constexpr size_t kExpertFloats = 11 << 20;     // 44 MB: two bench-model experts in BF16
constexpr size_t kGatewayFloats = 1300 << 10;  // ~5 MB: one layer's attention weights

int64_t NowNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

bool ReadAll(int fd, char* p, size_t n) {
  while (n > 0) {
    const ssize_t r = read(fd, p, n);
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

bool WriteAll(int fd, const char* p, size_t n) {
  while (n > 0) {
    const ssize_t r = write(fd, p, n);
    if (r <= 0) return false;
    p += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

// Reads every cache line of `w` once, split over the OpenMP team: a
// memory-bound stand-in for a layer's weight-streaming products.
float StreamWeights(const std::vector<float>& w) {
  float total = 0;
#pragma omp parallel for reduction(+ : total)
  for (size_t i = 0; i < w.size(); i += 16) total += w[i];
  return total;
}

// The expert process: until EOF, read a request, stream the weights, reply
// with the compute time (ns) in the first 8 bytes.
int RunExpert(int fd) {
  std::vector<float> weights(kExpertFloats, 1.0f);
  std::vector<char> message(kMessageBytes);
  while (ReadAll(fd, message.data(), message.size())) {
    const int64_t start = NowNanos();
    benchmark::DoNotOptimize(StreamWeights(weights));
    const int64_t compute = NowNanos() - start;
    std::memcpy(message.data(), &compute, sizeof(compute));
    if (!WriteAll(fd, message.data(), message.size())) break;
  }
  return 0;
}

// The gateway's end of a connection to a freshly spawned expert: a unix
// socketpair (tcp = false) or TCP over loopback. -1 on failure.
int ConnectExpert(bool tcp, pid_t* expert) {
  int ours = -1, theirs = -1;
  if (!tcp) {
    int fds[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0) return -1;
    ours = fds[0];
    theirs = fds[1];
  } else {
    const int listener = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    if (bind(listener, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
        listen(listener, 1) != 0 ||
        getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      close(listener);
      return -1;
    }
    theirs = socket(AF_INET, SOCK_STREAM, 0);
    if (connect(theirs, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      close(listener);
      close(theirs);
      return -1;
    }
    ours = accept(listener, nullptr, nullptr);
    close(listener);
    const int one = 1;
    setsockopt(ours, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    setsockopt(theirs, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  }
  // Only `theirs` goes to the expert: it must see EOF when we close ours.
  fcntl(ours, F_SETFD, FD_CLOEXEC);
  const std::string flag = "--socket-hop-expert=" + std::to_string(theirs);
  char* argv[] = {const_cast<char*>("/proc/self/exe"), const_cast<char*>(flag.c_str()), nullptr};
  // The expert gets OpenMP's default wait policy, as `switchyard up` leaves
  // its experts, whatever this process (the gateway: run it passive) has.
  std::vector<char*> env;
  for (char** e = environ; *e != nullptr; ++e) {
    if (std::strncmp(*e, "OMP_WAIT_POLICY=", 16) != 0) env.push_back(*e);
  }
  env.push_back(nullptr);
  const int spawned = posix_spawn(expert, "/proc/self/exe", nullptr, nullptr, argv, env.data());
  close(theirs);
  if (spawned != 0) {
    close(ours);
    return -1;
  }
  return ours;
}

void BM_SocketHop(benchmark::State& state) {
  const bool tcp = state.range(0) == 1;
  pid_t expert = -1;
  const int fd = ConnectExpert(tcp, &expert);
  if (fd < 0) {
    state.SkipWithError("could not start the expert process");
    return;
  }
  std::vector<float> attention(kGatewayFloats, 1.0f);
  std::vector<char> message(kMessageBytes);
  std::vector<double> hop_us;
  double compute_us = 0;
  for (auto _ : state) {
    benchmark::DoNotOptimize(StreamWeights(attention));
    const int64_t start = NowNanos();
    if (!WriteAll(fd, message.data(), message.size()) ||
        !ReadAll(fd, message.data(), message.size())) {
      state.SkipWithError("the expert process went away");
      break;
    }
    const int64_t round_trip = NowNanos() - start;
    int64_t compute = 0;
    std::memcpy(&compute, message.data(), sizeof(compute));
    const double hop = static_cast<double>(round_trip - compute) / 1e3;
    hop_us.push_back(hop);
    compute_us += static_cast<double>(compute) / 1e3;
    state.SetIterationTime(hop / 1e6);
  }
  close(fd);
  waitpid(expert, nullptr, 0);
  if (hop_us.empty()) return;
  std::sort(hop_us.begin(), hop_us.end());
  auto at = [&](double q) { return hop_us[static_cast<size_t>(q * (hop_us.size() - 1))]; };
  state.counters["p50_us"] = at(0.5);
  state.counters["p90_us"] = at(0.9);
  state.counters["p99_us"] = at(0.99);
  state.counters["compute_us"] = compute_us / static_cast<double>(hop_us.size());
}
BENCHMARK(BM_SocketHop)->ArgName("tcp")->Arg(0)->Arg(1)->UseManualTime()->Iterations(2000);

}  // namespace

int main(int argc, char** argv) {
  constexpr char kExpertFlag[] = "--socket-hop-expert=";
  if (argc == 2 && std::strncmp(argv[1], kExpertFlag, sizeof(kExpertFlag) - 1) == 0) {
    return RunExpert(std::atoi(argv[1] + sizeof(kExpertFlag) - 1));
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
