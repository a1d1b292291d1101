// The gateway -> expert hop in isolation (issue #10): one layer's dispatch
// through the real RemoteExpertBackend::RunLayer (what the model runner calls
// per layer) to real in-process gRPC expert servers (ExpertServiceImpl), one
// server per expert as in the split deployment (switchyard-expert's default
// options: 2 workers), whose compute is a no-op (copies input to output) or a
// fixed sleep.
//
// Shapes: the Mixtral-8x7B config (hidden D = 4096); no checkpoint is needed
// because the servers are built from the config and a ShardDescription, and
// Connect runs without a checkpoint folder (no weight fingerprint check).
// A case "tokens:N/experts:k" sends the same N rows to each of experts
// 0..k-1 (as top-k routing with k experts per token would), so a layer moves
// k * N * D values each way.
//
// Reported per layer (manual time = the RunLayer call): p50_us, p99_us,
// mean_us, and a breakdown from timestamps taken in the same process
// (steady clock), averaged over iterations:
//   send_us     RunLayer start -> the server's Forward handler entered
//               (client encode, call start, transport), mean over the calls
//   server_us   handler entered -> compute starts (worker queue hop, decode)
//   compute_us  the no-op/sleep itself, mean over the calls
//   reply_us    last compute end -> RunLayer returns (server encode, reply,
//               client decode and copy into the output)
//   switches    context switches of the whole process (every thread: the
//               caller, gRPC's, the servers') per layer (getrusage)
// BM_Encode / BM_Decode time rpc/tensor_codec on an [N, D] matrix alone.
//
// "path:0" is the transport as it was before issue #10's second item (unary
// Forward per batch, every call through the shard's worker queue); "path:1"
// the default now (one ForwardStream per replica, compute on the receiving
// thread while the shard is idle and fast) and "path:2" the frame socket
// (rpc/frame_socket.h: the same stream messages as length-prefixed frames on
// a plain socket, the reply read by the thread in RunLayer; the default
// wherever a shard offers one); there send_us runs to the compute start and
// server_us is 0. "path:3" is path 2 with the gateway's thread and each
// expert connection's thread polling 200 us before they sleep
// (--frame-spin-us 200 on both): no wake-up where each has a core.
// "path:4" is path 2 with the shards announcing frame version 1, as before
// version 2 (the rows inside the message, copied by protobuf both ways).
//
// Servers listen on 127.0.0.1:0 ("unix:0") or unix:/tmp/switchyard-dispatch-
// bench-PID-E.sock ("unix:1"); "bf16:1" sets RemoteExpertOptions::wire_dtype.
// "tls:1" (TCP only) serves mutual TLS on gRPC and frames alike, as
// k8s/components/tls does, from a throwaway CA made with the `openssl`
// command in /tmp/switchyard-dispatch-bench-PID-pki (removed at exit); path
// 0 with tls:1 is how Kubernetes with TLS sent expert calls before frames
// spoke TLS (unary calls).
#include <benchmark/benchmark.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/dtype.h"
#include "core/malloc_tuning.h"
#include "core/model_config.h"
#include "core/status_macros.h"
#include "expert_service/expert_backend.h"
#include "expert_service/expert_server.h"
#include "gateway/remote_expert_backend.h"
#include "rpc/server.h"
#include "rpc/tensor_codec.h"
#include "rpc/tls.h"
#include "switchyard/v1/expert.grpc.pb.h"
#include "tests/in_process_expert.h"

namespace switchyard {
namespace {

int64_t NowNanos() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// Mixtral-8x7B: hidden 4096, 8 experts, top-2.
const ModelConfig& BenchConfig() {
  static const ModelConfig config;
  return config;
}

// An expert whose compute copies input to output after sleeping delay_us
// (0: no sleep), recording when its last call started and ended.
class NoOpExpertBackend final : public ExpertBackend {
 public:
  absl::Status RunLayer(int, absl::Span<const ExpertBatch> batches) override {
    const int64_t start = NowNanos();
    const int delay = delay_us.load(std::memory_order_relaxed);
    if (delay > 0) std::this_thread::sleep_for(std::chrono::microseconds(delay));
    const size_t d = static_cast<size_t>(BenchConfig().hidden_size);
    for (const ExpertBatch& b : batches) {
      std::memcpy(b.output, b.input, sizeof(float) * d * static_cast<size_t>(b.tokens));
    }
    compute_start.store(start, std::memory_order_relaxed);
    compute_end.store(NowNanos(), std::memory_order_relaxed);
    return absl::OkStatus();
  }
  std::string Describe() const override { return "no-op (dispatch_bench)"; }

  std::atomic<int> delay_us{0};
  std::atomic<int64_t> compute_start{0};
  std::atomic<int64_t> compute_end{0};
};

// One expert server over a NoOpExpertBackend, observed (the time each
// Forward reached the handler), on TCP or a unix socket.
struct ExpertShard : testing::InProcessExpert {
  NoOpExpertBackend* noop = nullptr;  // in `compute`
  std::string socket_path;            // unix transport only

  ~ExpertShard() {
    Stop();
    if (!socket_path.empty()) std::filesystem::remove(socket_path);
  }
};

// Eight expert servers on one transport and a RemoteExpertBackend per wire dtype.
struct Cluster {
  std::vector<std::unique_ptr<ExpertShard>> shards;
  std::array<std::unique_ptr<RemoteExpertBackend>, 2> backends;  // [f32, bf16]
};

// [tcp, unix][path][plaintext, tls]: path 0 is the transport before issue
// #10's second item (unary Forward per batch, every call through the
// server's worker queue), path 1 one ForwardStream per replica (compute on
// the receiving thread when the shard is idle), path 2 the frame socket
// (also computing inline), path 3 the frame socket with both ends polling
// for kSpinUs before they sleep (--frame-spin-us on gateway and experts),
// path 4 the frame socket of version 1 (the rows inside the message).
std::array<std::array<std::array<std::unique_ptr<Cluster>, 2>, 5>, 2> clusters;
constexpr int kSpinUs = 200;

// The PKI of tls:1: a CA, a server certificate for 127.0.0.1 and a client
// certificate; made once, removed at exit.
constexpr char kMakePki[] = R"sh(set -eu
o() { openssl "$@" > /dev/null 2>&1; }
o req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.pem \
  -days 2 -subj /CN=bench-ca -addext basicConstraints=critical,CA:TRUE \
  -addext keyUsage=critical,keyCertSign,cRLSign
for n in server client; do
  o req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout $n.key -out $n.csr \
    -subj /CN=$n
done
printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' > server.ext
printf 'extendedKeyUsage=clientAuth\n' > client.ext
for n in server client; do
  o x509 -req -in $n.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $n.pem -days 2 \
    -extfile $n.ext
done
)sh";

absl::StatusOr<std::string> PkiDir() {
  static const absl::StatusOr<std::string> dir = []() -> absl::StatusOr<std::string> {
    const std::string d = absl::StrCat("/tmp/switchyard-dispatch-bench-", getpid(), "-pki");
    std::filesystem::create_directories(d);
    std::atexit([] {
      std::error_code ec;
      std::filesystem::remove_all(absl::StrCat("/tmp/switchyard-dispatch-bench-", getpid(), "-pki"),
                                  ec);
    });
    const std::string script = d + "/make.sh";
    if (FILE* f = std::fopen(script.c_str(), "w")) {
      std::fputs(kMakePki, f);
      std::fclose(f);
    }
    if (std::system(absl::StrCat("cd '", d, "' && bash make.sh").c_str()) != 0) {
      return absl::FailedPreconditionError("tls:1 needs the openssl command to make certificates");
    }
    return d;
  }();
  return dir;
}

absl::StatusOr<Cluster*> GetCluster(bool unix_socket, int path, bool tls) {
  std::unique_ptr<Cluster>& slot = clusters[unix_socket ? 1 : 0][path][tls ? 1 : 0];
  if (slot) return slot.get();
  if (tls && unix_socket) return absl::InvalidArgumentError("tls:1 is for TCP (unix:0) only");
  std::shared_ptr<grpc::ServerCredentials> server_credentials;
  std::shared_ptr<grpc::ChannelCredentials> channel_credentials;
  std::shared_ptr<const rpc::FrameTlsContext> server_frames, client_frames;
  if (tls) {
    absl::StatusOr<std::string> pki = PkiDir();
    if (!pki.ok()) return pki.status();
    const rpc::TlsFiles server = {.cert_file = *pki + "/server.pem",
                                  .key_file = *pki + "/server.key",
                                  .ca_file = *pki + "/ca.pem"};
    const rpc::TlsFiles client = {.cert_file = *pki + "/client.pem",
                                  .key_file = *pki + "/client.key",
                                  .ca_file = *pki + "/ca.pem"};
    SY_ASSIGN_OR_RETURN(server_credentials, rpc::ServerCredentialsFromFiles(server, true));
    SY_ASSIGN_OR_RETURN(server_frames, rpc::FrameServerTlsFromFiles(server, true));
    SY_ASSIGN_OR_RETURN(channel_credentials, rpc::ChannelCredentialsFromFiles(client));
    SY_ASSIGN_OR_RETURN(client_frames, rpc::FrameClientTlsFromFiles(client));
  }
  const ModelConfig& config = BenchConfig();
  auto cluster = std::make_unique<Cluster>();
  ExpertTopology topology;
  for (int e = 0; e < config.num_local_experts; ++e) {
    auto shard = std::make_unique<ExpertShard>();
    shard->noop = shard->AddCompute(std::make_unique<NoOpExpertBackend>());
    ShardDescription description;
    description.experts = {e};
    description.layer_begin = 0;
    description.layer_end = config.num_hidden_layers;
    description.weights_dtype = "bf16";
    ExpertServerOptions server_options;
    server_options.inline_compute_when_idle = path >= 1;
    std::string listen = "127.0.0.1:0";
    if (unix_socket) {
      shard->socket_path =
          absl::StrCat("/tmp/switchyard-dispatch-bench-", getpid(), "-", path, "-", e, ".sock");
      std::filesystem::remove(shard->socket_path);
      listen = "unix:" + shard->socket_path;
    }
    if (absl::Status s = shard->Serve(config, std::move(description), server_options, listen,
                                      /*observe=*/true, server_credentials);
        !s.ok()) {
      return s;
    }
    if (path >= 2) {
      const std::string frames = unix_socket ? listen + ".frames" : "127.0.0.1:0";
      if (absl::Status s = shard->ServeFrames(frames, server_frames, path == 3 ? kSpinUs : 0,
                                              path == 4 ? 1 : rpc::kFrameVersion);
          !s.ok()) {
        return s;
      }
    }
    topology.replicas[e] = {shard->server->address()};
    cluster->shards.push_back(std::move(shard));
  }
  for (int wire = 0; wire < 2; ++wire) {
    RemoteExpertOptions options;
    options.wire_dtype = wire == 0 ? v1::DTYPE_F32 : v1::DTYPE_BF16;
    options.connect_timeout_ms = 10000;
    options.use_stream = path >= 1;
    options.use_frames = path >= 2;
    options.reply_spin_us = path == 3 ? kSpinUs : 0;
    options.credentials = channel_credentials;
    options.frame_tls = client_frames;
    auto backend = RemoteExpertBackend::Connect(topology, config, /*checkpoint_dir=*/"", options);
    if (!backend.ok()) return backend.status();
    cluster->backends[wire] = *std::move(backend);
  }
  slot = std::move(cluster);
  return slot.get();
}

std::vector<float> RandomRows(int64_t n, int64_t d) {
  std::mt19937 rng(7);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n * d));
  for (float& v : x) v = dist(rng);
  return x;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * static_cast<double>(v.size())));
  return v[i];
}

// Args: tokens, experts, unix (0 TCP loopback, 1 unix socket), bf16 (wire
// dtype), delay_us (expert compute; 0 = no-op copy), path (0 before, 1
// stream, 2 frames, 3 frames polling, 4 frames version 1; see `clusters`),
// tls (mutual TLS; TCP only).
void BM_DispatchLayer(benchmark::State& state) {
  const int tokens = static_cast<int>(state.range(0));
  const int k = static_cast<int>(state.range(1));
  const bool unix_socket = state.range(2) != 0;
  const bool bf16 = state.range(3) != 0;
  const int delay_us = static_cast<int>(state.range(4));
  const int path = static_cast<int>(state.range(5));
  const bool tls = state.range(6) != 0;
  const int64_t d = BenchConfig().hidden_size;
  auto cluster = GetCluster(unix_socket, path, tls);
  if (!cluster.ok()) {
    state.SkipWithError(cluster.status().ToString().c_str());
    return;
  }
  RemoteExpertBackend* backend = (*cluster)->backends[bf16 ? 1 : 0].get();
  std::vector<ExpertShard*> shards;
  for (int e = 0; e < k; ++e) {
    shards.push_back((*cluster)->shards[e].get());
    shards.back()->noop->delay_us.store(delay_us);
  }

  const std::vector<float> input = RandomRows(tokens, d);
  std::vector<std::vector<float>> outputs(k, std::vector<float>(input.size()));
  std::vector<ExpertBatch> batches;
  for (int e = 0; e < k; ++e) {
    batches.push_back(
        {.expert = e, .tokens = tokens, .input = input.data(), .output = outputs[e].data()});
  }

  // Untimed first call: connections warm, buffers allocated.
  if (absl::Status s = backend->RunLayer(0, batches); !s.ok()) {
    state.SkipWithError(s.ToString().c_str());
    return;
  }
  std::vector<double> layer_us;
  double send = 0, server = 0, compute = 0, reply = 0;
  // Context switches of the whole process (gateway and servers alike).
  const auto switches = [] {
    rusage usage{};
    getrusage(RUSAGE_SELF, &usage);
    return static_cast<double>(usage.ru_nvcsw + usage.ru_nivcsw);
  };
  const double switches_before = switches();
  for (auto _ : state) {
    const int64_t t0 = NowNanos();
    const absl::Status status = backend->RunLayer(0, batches);
    const int64_t t1 = NowNanos();
    if (!status.ok()) {
      state.SkipWithError(status.ToString().c_str());
      break;
    }
    state.SetIterationTime(static_cast<double>(t1 - t0) * 1e-9);
    layer_us.push_back(static_cast<double>(t1 - t0) * 1e-3);
    int64_t last_end = t0;
    for (ExpertShard* s : shards) {
      // The stream path does not see the handler: its send_us runs to the
      // compute start (server_us 0).
      const int64_t received =
          path == 0 ? s->observed->forward_received_ns.load(std::memory_order_relaxed)
                    : s->noop->compute_start.load(std::memory_order_relaxed);
      const int64_t start = s->noop->compute_start.load(std::memory_order_relaxed);
      const int64_t end = s->noop->compute_end.load(std::memory_order_relaxed);
      send += static_cast<double>(received - t0) / k;
      server += static_cast<double>(start - received) / k;
      compute += static_cast<double>(end - start) / k;
      last_end = std::max(last_end, end);
    }
    reply += static_cast<double>(t1 - last_end);
  }
  const double switches_after = switches();
  for (ExpertShard* s : shards) s->noop->delay_us.store(0);
  if (layer_us.empty()) return;

  // The no-op expert returns its input: what came back must be the input, as
  // rounded by the wire dtype.
  for (int e = 0; e < k; ++e) {
    for (size_t i = 0; i < input.size(); ++i) {
      const float want = bf16 ? Bf16ToF32(F32ToBf16(input[i])) : input[i];
      if (outputs[e][i] != want) {
        state.SkipWithError(
            absl::StrCat("expert ", e, " output[", i, "] = ", outputs[e][i], ", expected ", want)
                .c_str());
        return;
      }
    }
  }

  const double n = static_cast<double>(layer_us.size());
  state.counters["p50_us"] = Percentile(layer_us, 0.50);
  state.counters["p99_us"] = Percentile(layer_us, 0.99);
  state.counters["send_us"] = send / n * 1e-3;
  state.counters["server_us"] = server / n * 1e-3;
  state.counters["compute_us"] = compute / n * 1e-3;
  state.counters["reply_us"] = reply / n * 1e-3;
  state.counters["switches"] = (switches_after - switches_before) / n;
  state.counters["wire_MB"] =
      static_cast<double>(2 * k * tokens * d * (bf16 ? 2 : 4)) / 1e6;  // both directions
  state.SetLabel(absl::StrCat(path == 0   ? "before "
                              : path == 1 ? "stream "
                              : path == 2 ? "frames "
                              : path == 3 ? "frames+poll "
                                          : "frames-v1 ",
                              unix_socket ? "unix" : (tls ? "tcp+tls" : "tcp"), " ",
                              bf16 ? "bf16" : "f32", " ",
                              delay_us == 0 ? "no-op" : absl::StrCat("sleep ", delay_us, "us")));
}

void DispatchArgs(benchmark::internal::Benchmark* b) {
  b->ArgNames({"tokens", "experts", "unix", "bf16", "delay_us", "path", "tls"});
  b->ArgsProduct({{1, 16, 256}, {1, 2, 8}, {0, 1}, {0, 1}, {0}, {0, 1, 2}, {0}});
  // A fixed 100 us expert compute: what the hop adds around real work.
  b->ArgsProduct({{1, 16}, {2}, {0, 1}, {1}, {100}, {0, 1, 2}, {0}});
  // Mutual TLS on every path, over TCP.
  b->ArgsProduct({{1, 16, 64, 128, 256}, {2}, {0}, {1}, {0}, {0, 1, 2}, {1}});
  // Frames with both ends polling before they sleep (path:2 above is the
  // same without): the gateway's thread and one per expert spin, so this
  // needs a core each (experts:2 has three spinning threads).
  b->ArgsProduct({{1, 16}, {1, 2}, {0, 1}, {1}, {0}, {3}, {0}});
  // Frames of version 1 (path:2 is version 2, the rows after the message).
  b->ArgsProduct({{1, 16, 256}, {2}, {0}, {0, 1}, {0}, {4}, {0}});
}
BENCHMARK(BM_DispatchLayer)->Apply(DispatchArgs)->UseManualTime()->Unit(benchmark::kMicrosecond);

// Args: tokens, bf16.
void BM_Encode(benchmark::State& state) {
  const int64_t tokens = state.range(0);
  const v1::DType dtype = state.range(1) != 0 ? v1::DTYPE_BF16 : v1::DTYPE_F32;
  const int64_t d = BenchConfig().hidden_size;
  const std::vector<float> x = RandomRows(tokens, d);
  for (auto _ : state) {
    v1::Tensor tensor;
    rpc::EncodeMatrix(x.data(), tokens, d, dtype, &tensor);
    benchmark::DoNotOptimize(tensor);
  }
  state.SetBytesProcessed(state.iterations() * tokens * d * static_cast<int64_t>(sizeof(float)));
}
BENCHMARK(BM_Encode)
    ->ArgNames({"tokens", "bf16"})
    ->ArgsProduct({{1, 16, 256}, {0, 1}})
    ->Unit(benchmark::kMicrosecond);

// Args: tokens, bf16.
void BM_Decode(benchmark::State& state) {
  const int64_t tokens = state.range(0);
  const v1::DType dtype = state.range(1) != 0 ? v1::DTYPE_BF16 : v1::DTYPE_F32;
  const int64_t d = BenchConfig().hidden_size;
  const std::vector<float> x = RandomRows(tokens, d);
  v1::Tensor tensor;
  rpc::EncodeMatrix(x.data(), tokens, d, dtype, &tensor);
  for (auto _ : state) {
    absl::StatusOr<std::vector<float>> y = rpc::DecodeMatrix(tensor, d, "bench");
    if (!y.ok()) {
      state.SkipWithError(y.status().ToString().c_str());
      break;
    }
    benchmark::DoNotOptimize(y->data());
  }
  state.SetBytesProcessed(state.iterations() * tokens * d * static_cast<int64_t>(sizeof(float)));
}
BENCHMARK(BM_Decode)
    ->ArgNames({"tokens", "bf16"})
    ->ArgsProduct({{1, 16, 256}, {0, 1}})
    ->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace switchyard

int main(int argc, char** argv) {
  // As the gateway and expert processes do (SWITCHYARD_MALLOC_TUNING=0: not).
  benchmark::AddCustomContext("malloc", switchyard::TuneMallocForTransientBuffers());
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  // Backends (channels) first, then the servers, so no call is in flight.
  for (auto& by_path : switchyard::clusters) {
    for (auto& by_security : by_path) {
      for (auto& cluster : by_security) {
        if (!cluster) continue;
        for (auto& backend : cluster->backends) backend.reset();
        cluster.reset();
      }
    }
  }
  benchmark::Shutdown();
  return 0;
}
