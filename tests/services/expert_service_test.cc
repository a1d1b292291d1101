// The expert gRPC service and its client, RemoteExpertBackend, in-process:
// servers on 127.0.0.1:0 over the tiny-mixtral fixture.
#include <arpa/inet.h>
#include <grpcpp/generic/generic_stub.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/checkpoint.h"
#include "core/cpu_ops.h"
#include "core/dtype.h"
#include "core/fingerprint.h"
#include "core/make_model.h"
#include "expert_service/expert_backend.h"
#include "expert_service/expert_ffn.h"
#include "expert_service/expert_process.h"
#include "expert_service/expert_server.h"
#include "gateway/expert_dns.h"
#include "gateway/remote_expert_backend.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "rpc/frame_socket.h"
#include "rpc/server.h"
#include "rpc/tensor_codec.h"
#include "switchyard/v1/expert.grpc.pb.h"
#include "tests/http_util.h"
#include "tests/in_process_expert.h"
#include "tests/test_util.h"
#include "tests/tolerances.h"

namespace switchyard {
namespace {

using ::testing::HasSubstr;
using ::testing::UnorderedElementsAre;

constexpr int kD = 64;  // tiny-mixtral hidden size

std::vector<int> AllExperts() { return {0, 1, 2, 3, 4, 5, 6, 7}; }

// The CPU experts after a fixed delay per Forward: a slow replica.
class DelayedExpertBackend final : public ExpertBackend {
 public:
  DelayedExpertBackend(ExpertBackend* inner, int delay_ms) : inner_(inner), delay_ms_(delay_ms) {}
  absl::Status RunLayer(int layer, absl::Span<const ExpertBatch> batches) override {
    std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms_));
    return inner_->RunLayer(layer, batches);
  }
  std::string Describe() const override { return inner_->Describe(); }

 private:
  ExpertBackend* inner_;
  int delay_ms_;
};

// A running expert shard over the CPU experts of a checkpoint.
using Shard = testing::InProcessExpert;

// `delay_ms` > 0: every Forward takes that much longer (a slow replica).
std::unique_ptr<Shard> StartShard(const std::string& dir, std::vector<int> experts, int workers = 2,
                                  int delay_ms = 0) {
  auto shard = std::make_unique<Shard>();
  auto description = shard->LoadCheckpointExperts(dir, experts);
  EXPECT_TRUE(description.ok()) << description.status();
  if (!description.ok()) return nullptr;
  if (delay_ms > 0) {
    shard->AddCompute(
        std::make_unique<DelayedExpertBackend>(shard->compute.back().get(), delay_ms));
  }
  const absl::Status served = shard->Serve(shard->store->config(), *std::move(description),
                                           ExpertServerOptions{.workers = workers});
  EXPECT_TRUE(served.ok()) << served;
  if (!served.ok()) return nullptr;
  return shard;
}

std::vector<float> RandomRows(int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n) * kD);
  for (float& v : x) v = dist(rng);
  return x;
}

std::vector<float> RoundToBf16(std::vector<float> x) {
  for (float& v : x) v = Bf16ToF32(F32ToBf16(v));
  return x;
}

double MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double m = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    m = std::max(m, std::fabs(static_cast<double>(a[i]) - b[i]));
  }
  return m;
}

std::unique_ptr<v1::ExpertService::Stub> StubFor(const std::string& address) {
  return v1::ExpertService::NewStub(
      grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
}

std::string DumpBytes(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  std::string out;
  if (!buffer.Dump(&slices).ok()) return out;
  for (const grpc::Slice& s : slices) {
    out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  return out;
}

// One raw unary call (hand-encoded protobuf bytes) over the generic stub.
grpc::Status RawUnary(const std::string& address, const std::string& method,
                      const std::string& request, std::string* response) {
  auto channel = grpc::CreateChannel(address, grpc::InsecureChannelCredentials());
  grpc::GenericStub stub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::CompletionQueue cq;
  grpc::Slice slice(request);
  grpc::ByteBuffer send(&slice, 1), receive;
  auto call = stub.PrepareUnaryCall(&context, method, send, &cq);
  call->StartCall();
  grpc::Status status;
  call->Finish(&receive, &status, reinterpret_cast<void*>(1));
  void* tag;
  bool ok;
  EXPECT_TRUE(cq.Next(&tag, &ok));
  *response = DumpBytes(receive);
  return status;
}

// The shared fixture: one shard per expert plus a local store of every expert.
class ExpertServiceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new std::string(testing::TinyMixtralDir());
    auto checkpoint = Checkpoint::Open(*dir_, WeightSelection::ExpertsOnly(AllExperts()));
    ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
    auto store = ExpertStore::Load(**checkpoint);
    ASSERT_TRUE(store.ok()) << store.status();
    local_store_ = store->release();
    shards_ = new std::vector<std::unique_ptr<Shard>>();
    for (int e : AllExperts()) {
      shards_->push_back(StartShard(*dir_, {e}));
      ASSERT_NE(shards_->back(), nullptr);
    }
  }
  static void TearDownTestSuite() {
    delete shards_;
    delete local_store_;
    delete dir_;
  }

  static const ModelConfig& config() { return local_store_->config(); }
  static Shard& shard(int expert) { return *(*shards_)[expert]; }

  // Checks that `result` is OK and holds expert 3 of layer 1 on the rows
  // `x` (3 rows), bitwise as the local expert computes it.
  // `frame_tail`: the reply frame's tail, where it was version 2.
  static void ExpectLayer1Expert3(const v1::ForwardResult& result, const std::vector<float>& x,
                                  std::optional<std::string_view> frame_tail = std::nullopt) {
    ASSERT_EQ(result.code(), 0) << result.error_message();
    std::vector<float> want(x.size());
    local_store_->Find(1, 3)->Forward(x.data(), 3, want.data());
    std::vector<float> got(x.size());
    const absl::Status s =
        rpc::DecodeMatrixInto(result.response().output(), kD, 3, got.data(), "output", frame_tail);
    ASSERT_TRUE(s.ok()) << s;
    EXPECT_EQ(MaxAbsDiff(got, want), 0.0);
  }

  // Every expert on its own shard of the fixture.
  static ExpertTopology OnePerExpertTopology() {
    ExpertTopology topology;
    for (int e : AllExperts()) topology.replicas[e] = {shard(e).address()};
    return topology;
  }

  // Every expert on the same `replicas`.
  static ExpertTopology AllExpertsOn(const std::vector<std::string>& replicas) {
    ExpertTopology topology;
    for (int e : AllExperts()) topology.replicas[e] = replicas;
    return topology;
  }

  // "0=addr0;1=addr1;..."
  static std::string OnePerExpertSpec() {
    std::vector<std::string> entries;
    for (int e : AllExperts()) entries.push_back(absl::StrCat(e, "=", shard(e).address()));
    return absl::StrJoin(entries, ";");
  }

  // Every expert on its own fixture shard but `expert`, which goes to
  // `replicas`; `options` with a 10 s connect timeout.
  static absl::StatusOr<std::unique_ptr<RemoteExpertBackend>> ConnectReplacing(
      int expert, std::vector<std::string> replicas, RemoteExpertOptions options = {}) {
    ExpertTopology topology = OnePerExpertTopology();
    topology.replicas[expert] = std::move(replicas);
    options.connect_timeout_ms = 10000;
    return RemoteExpertBackend::Connect(topology, config(), *dir_, options);
  }

  static std::unique_ptr<RemoteExpertBackend> ConnectOnePerExpert(v1::DType wire = v1::DTYPE_F32) {
    auto topology = ParseExpertTopology(OnePerExpertSpec(), 8);
    EXPECT_TRUE(topology.ok()) << topology.status();
    RemoteExpertOptions options;
    options.wire_dtype = wire;
    options.connect_timeout_ms = 10000;
    auto backend = RemoteExpertBackend::Connect(*topology, config(), *dir_, options);
    EXPECT_TRUE(backend.ok()) << backend.status();
    return backend.ok() ? *std::move(backend) : nullptr;
  }

  // Calls Forward(layer, expert) on `address` with rows x, in `dtype`.
  static grpc::Status CallForward(const std::string& address, int layer, int expert,
                                  const std::vector<float>& x, v1::DType dtype,
                                  v1::ForwardResponse* response) {
    v1::ForwardRequest request;
    request.set_layer(layer);
    request.set_expert(expert);
    request.set_config_fingerprint(config().Fingerprint());
    rpc::EncodeMatrix(x.data(), static_cast<int64_t>(x.size()) / kD, kD, dtype,
                      request.mutable_hidden_states());
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    return StubFor(address)->Forward(&context, request, response);
  }

  static std::string* dir_;
  static ExpertStore* local_store_;
  static std::vector<std::unique_ptr<Shard>>* shards_;
};

std::string* ExpertServiceTest::dir_ = nullptr;
ExpertStore* ExpertServiceTest::local_store_ = nullptr;
std::vector<std::unique_ptr<Shard>>* ExpertServiceTest::shards_ = nullptr;

// (a) ----------------------------------------------------------------------

TEST_F(ExpertServiceTest, ForwardMatchesLocalExpertF32Exactly) {
  const ExpertFfn* ffn = local_store_->Find(1, 3);
  ASSERT_NE(ffn, nullptr);
  for (int n : {1, 33}) {
    const std::vector<float> x = RandomRows(n, 100 + n);
    std::vector<float> want(x.size());
    ffn->Forward(x.data(), n, want.data());

    v1::ForwardResponse response;
    grpc::Status status = CallForward(shard(3).address(), 1, 3, x, v1::DTYPE_F32, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(response.output().dtype(), v1::DTYPE_F32);
    ASSERT_THAT(response.output().shape(), ::testing::ElementsAre(n, kD));
    auto got = rpc::DecodeMatrix(response.output(), kD, "output");
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(MaxAbsDiff(*got, want), 0.0) << "N=" << n;
    EXPECT_GE(response.compute_micros(), 0);
    EXPECT_GE(response.queue_micros(), 0);
  }
  const ExpertCounters* counters = shard(3).service->counters(1, 3);
  ASSERT_NE(counters, nullptr);
  EXPECT_GE(counters->calls.load(), 2u);
  EXPECT_GE(counters->tokens.load(), 34u);
  EXPECT_EQ(counters->in_flight.load(), 0);
  EXPECT_EQ(shard(3).service->counters(0, 4), nullptr);
}

TEST_F(ExpertServiceTest, ForwardBf16WireWithinTolerance) {
  const ExpertFfn* ffn = local_store_->Find(1, 3);
  for (int n : {1, 33}) {
    const std::vector<float> x = RandomRows(n, 200 + n);
    // The shard computes on the bf16-rounded rows and rounds its output.
    const std::vector<float> x_bf16 = RoundToBf16(x);
    std::vector<float> want(x.size());
    ffn->Forward(x_bf16.data(), n, want.data());

    v1::ForwardResponse response;
    grpc::Status status = CallForward(shard(3).address(), 1, 3, x, v1::DTYPE_BF16, &response);
    ASSERT_TRUE(status.ok()) << status.error_message();
    EXPECT_EQ(response.output().dtype(), v1::DTYPE_BF16);
    EXPECT_EQ(response.output().data().size(), static_cast<size_t>(n) * kD * 2);
    auto got = rpc::DecodeMatrix(response.output(), kD, "output");
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_TRUE(testing::AllClose(*got, want, tolerance::kBf16WireAbs, tolerance::kBf16WireRel,
                                  absl::StrCat("bf16 wire N=", n)));
  }
}

// (b) ----------------------------------------------------------------------

TEST_F(ExpertServiceTest, BadRequestsAreRefusedAndTheServerKeepsServing) {
  const std::string address = shard(3).address();
  auto stub = StubFor(address);
  const uint64_t rejected_before = shard(3).service->Stats().rejected_calls;
  auto call = [&](const v1::ForwardRequest& request) {
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    v1::ForwardResponse response;
    return stub->Forward(&context, request, &response);
  };
  auto good = [&](int n) {
    v1::ForwardRequest r;
    r.set_layer(1);
    r.set_expert(3);
    r.set_config_fingerprint(config().Fingerprint());
    const std::vector<float> x = RandomRows(n, 7);
    rpc::EncodeMatrix(x.data(), n, kD, v1::DTYPE_F32, r.mutable_hidden_states());
    return r;
  };

  {  // Expert not held.
    v1::ForwardRequest r = good(2);
    r.set_expert(4);
    grpc::Status s = call(r);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
    EXPECT_THAT(s.error_message(), HasSubstr("layer 1 expert 4"));
    EXPECT_THAT(s.error_message(), HasSubstr("[3]"));
  }
  {  // Layer out of range.
    v1::ForwardRequest r = good(2);
    r.set_layer(2);
    grpc::Status s = call(r);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
    EXPECT_THAT(s.error_message(), HasSubstr("layer 2 expert 3"));
    r.set_layer(4000000000u);
    EXPECT_EQ(call(r).error_code(), grpc::StatusCode::NOT_FOUND);
  }
  {  // Wrong hidden size.
    v1::ForwardRequest r = good(2);
    const std::vector<float> x = RandomRows(4, 8);  // 256 floats as [8, 32]
    rpc::EncodeMatrix(x.data(), 8, 32, v1::DTYPE_F32, r.mutable_hidden_states());
    grpc::Status s = call(r);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(s.error_message(), HasSubstr("hidden_states"));
  }
  {  // Byte count does not match the shape.
    v1::ForwardRequest r = good(2);
    r.mutable_hidden_states()->mutable_data()->resize(2 * kD * 4 - 4);
    grpc::Status s = call(r);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(s.error_message(), HasSubstr("bytes"));
  }
  {  // More rows than one Forward may carry: refused before decoding, even
     // when the shape lies about the data (none sent here).
    v1::ForwardRequest r = good(1);
    r.mutable_hidden_states()->set_shape(0, kDefaultMaxForwardRows + 1);
    grpc::Status s = call(r);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(s.error_message(),
                HasSubstr(absl::StrCat(kDefaultMaxForwardRows + 1, " rows, at most ",
                                       kDefaultMaxForwardRows)));
  }
  {  // Rank 1, and no rows.
    v1::ForwardRequest r = good(2);
    r.mutable_hidden_states()->clear_shape();
    r.mutable_hidden_states()->add_shape(2 * kD);
    EXPECT_EQ(call(r).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    v1::ForwardRequest empty = good(1);
    empty.mutable_hidden_states()->set_shape(0, 0);
    empty.mutable_hidden_states()->clear_data();
    EXPECT_EQ(call(empty).error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  {  // Unsupported or unknown dtypes.
    for (int dtype : {0, 3, 77}) {
      v1::ForwardRequest r = good(2);
      r.mutable_hidden_states()->set_dtype(static_cast<v1::DType>(dtype));
      grpc::Status s = call(r);
      EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << dtype;
      EXPECT_THAT(s.error_message(), HasSubstr("dtype"));
    }
  }
  {  // Another model's fingerprint.
    v1::ForwardRequest r = good(2);
    r.set_config_fingerprint("0123456789abcdef");
    grpc::Status s = call(r);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_THAT(s.error_message(), HasSubstr("0123456789abcdef"));
    EXPECT_THAT(s.error_message(), HasSubstr(config().Fingerprint()));
  }
  {  // No fingerprint at all is accepted (the guard is optional).
    v1::ForwardRequest r = good(3);
    r.clear_config_fingerprint();
    EXPECT_TRUE(call(r).ok());
  }
  // Still serving.
  grpc::Status s = call(good(5));
  EXPECT_TRUE(s.ok()) << s.error_message();
  EXPECT_GE(shard(3).service->Stats().rejected_calls - rejected_before, 11u);
}

// (c) ----------------------------------------------------------------------

// Batches of every expert for one layer, with varied token counts.
struct LayerInput {
  std::vector<std::vector<float>> inputs;
  std::vector<std::vector<float>> outputs;
  std::vector<ExpertBatch> batches;
};

LayerInput MakeLayerInput(uint32_t seed, std::vector<int> experts = AllExperts()) {
  LayerInput in;
  for (size_t i = 0; i < experts.size(); ++i) {
    const int n = 1 + static_cast<int>((seed * 7 + i * 5) % 17);
    in.inputs.push_back(RandomRows(n, seed * 100 + i));
    in.outputs.emplace_back(in.inputs.back().size(), -1.0f);
  }
  for (size_t i = 0; i < experts.size(); ++i) {
    in.batches.push_back({.expert = experts[i],
                          .tokens = static_cast<int>(in.inputs[i].size() / kD),
                          .input = in.inputs[i].data(),
                          .output = in.outputs[i].data()});
  }
  return in;
}

TEST_F(ExpertServiceTest, RemoteBackendMatchesLocalBackend) {
  auto remote = ConnectOnePerExpert();
  ASSERT_NE(remote, nullptr);
  EXPECT_THAT(remote->Describe(), HasSubstr(shard(5).address()));
  LocalExpertBackend local(local_store_);
  for (int layer = 0; layer < 2; ++layer) {
    LayerInput want = MakeLayerInput(layer + 1);
    LayerInput got = MakeLayerInput(layer + 1);
    ASSERT_TRUE(local.RunLayer(layer, want.batches).ok());
    absl::Status s = remote->RunLayer(layer, got.batches);
    ASSERT_TRUE(s.ok()) << s;
    for (size_t i = 0; i < want.outputs.size(); ++i) {
      EXPECT_EQ(MaxAbsDiff(got.outputs[i], want.outputs[i]), 0.0)
          << "layer " << layer << " batch " << i;
    }
  }
  // A subset of experts, one of them twice.
  LayerInput want = MakeLayerInput(9, {6, 2, 6});
  LayerInput got = MakeLayerInput(9, {6, 2, 6});
  ASSERT_TRUE(local.RunLayer(1, want.batches).ok());
  ASSERT_TRUE(remote->RunLayer(1, got.batches).ok());
  for (size_t i = 0; i < want.outputs.size(); ++i) {
    EXPECT_EQ(MaxAbsDiff(got.outputs[i], want.outputs[i]), 0.0);
  }
  EXPECT_TRUE(remote->RunLayer(0, {}).ok());

  const RemoteExpertStats stats = remote->stats();
  ASSERT_EQ(stats.experts.size(), 8u);
  EXPECT_EQ(stats.experts[6].calls, 4u);
  EXPECT_EQ(stats.experts[6].latency_count, 4u);
  EXPECT_TRUE(stats.experts[6].errors_by_code.empty());
  EXPECT_EQ(stats.experts[0].calls, 2u);
  EXPECT_EQ(stats.experts[0].targets, std::vector<std::string>{shard(0).address()});

  // Caller bugs are INVALID_ARGUMENT, not crashes.
  EXPECT_EQ(remote->RunLayer(2, got.batches).code(), absl::StatusCode::kInvalidArgument);
  std::vector<ExpertBatch> bad = {
      {.expert = 8, .tokens = 1, .input = got.inputs[0].data(), .output = got.outputs[0].data()}};
  EXPECT_EQ(remote->RunLayer(0, bad).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ExpertServiceTest, RemoteBackendBf16WireWithinTolerance) {
  auto remote = ConnectOnePerExpert(v1::DTYPE_BF16);
  ASSERT_NE(remote, nullptr);
  EXPECT_THAT(remote->Describe(), HasSubstr("bf16"));
  LocalExpertBackend local(local_store_);
  LayerInput got = MakeLayerInput(3);
  LayerInput want = MakeLayerInput(3);
  for (auto& x : want.inputs) x = RoundToBf16(x);
  for (size_t i = 0; i < want.batches.size(); ++i) want.batches[i].input = want.inputs[i].data();
  ASSERT_TRUE(local.RunLayer(1, want.batches).ok());
  ASSERT_TRUE(remote->RunLayer(1, got.batches).ok());
  for (size_t i = 0; i < want.outputs.size(); ++i) {
    EXPECT_TRUE(testing::AllClose(got.outputs[i], want.outputs[i], tolerance::kBf16WireAbs,
                                  tolerance::kBf16WireRel, absl::StrCat("expert ", i)));
  }
}

// (d) ----------------------------------------------------------------------

TEST_F(ExpertServiceTest, ConnectRefusesAServerHoldingAnotherExpert) {
  auto backend = ConnectReplacing(2, {shard(5).address()});
  ASSERT_FALSE(backend.ok());
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(backend.status().message()),
              HasSubstr("expert 2 at " + shard(5).address()));
  EXPECT_THAT(std::string(backend.status().message()), HasSubstr("holds experts [5] not 2"));
}

TEST_F(ExpertServiceTest, ConnectRefusesAnotherModelOrOtherWeights) {
  const std::string tmp =
      ::testing::TempDir() + "/expert_service_test_models_" + std::to_string(getpid());
  std::filesystem::remove_all(tmp);
  // Same config, other weights.
  MakeModelOptions other_weights{
      .preset = "tiny", .out_dir = tmp + "/seed7", .seed = 7, .threads = 1};
  ASSERT_TRUE(MakeModel(other_weights).ok());
  // Another config (one layer).
  MakeModelOptions other_model{
      .preset = "tiny", .out_dir = tmp + "/one-layer", .layers = 1, .threads = 1};
  ASSERT_TRUE(MakeModel(other_model).ok());
  auto seed7 = StartShard(tmp + "/seed7", {4});
  auto one_layer = StartShard(tmp + "/one-layer", {4});
  ASSERT_NE(seed7, nullptr);
  ASSERT_NE(one_layer, nullptr);
  RemoteExpertOptions options;
  options.connect_timeout_ms = 10000;

  ExpertTopology topology = OnePerExpertTopology();
  topology.replicas[4] = {seed7->address()};
  auto backend = RemoteExpertBackend::Connect(topology, config(), *dir_, options);
  ASSERT_FALSE(backend.ok());
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(std::string(backend.status().message()),
              HasSubstr("expert 4 at " + seed7->address()));
  EXPECT_THAT(std::string(backend.status().message()), HasSubstr("expert weights"));
  // Without the gateway's checkpoint folder the weights are not compared.
  EXPECT_TRUE(RemoteExpertBackend::Connect(topology, config(), "", options).ok());

  topology.replicas[4] = {one_layer->address()};
  backend = RemoteExpertBackend::Connect(topology, config(), *dir_, options);
  ASSERT_FALSE(backend.ok());
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kFailedPrecondition);
  auto other_config = LoadModelConfig(tmp + "/one-layer");
  ASSERT_TRUE(other_config.ok());
  EXPECT_THAT(std::string(backend.status().message()),
              HasSubstr(absl::StrCat("expert 4 at ", one_layer->address(), " serves model ",
                                     other_config->Fingerprint(), " but the gateway loaded ",
                                     config().Fingerprint())));
  seed7.reset();
  one_layer.reset();
  std::filesystem::remove_all(tmp);
}

TEST_F(ExpertServiceTest, ConnectTimesOutNamingTheSilentReplica) {
  ExpertTopology topology = OnePerExpertTopology();
  topology.replicas[6] = {"unix:/tmp/switchyard-no-such-socket-" + std::to_string(getpid())};
  RemoteExpertOptions options;
  options.connect_timeout_ms = 500;
  auto backend = RemoteExpertBackend::Connect(topology, config(), *dir_, options);
  ASSERT_FALSE(backend.ok());
  EXPECT_EQ(backend.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(backend.status().message()),
              HasSubstr("expert 6 at unix:/tmp/switchyard-no-such"));
}

// (e) ----------------------------------------------------------------------

TEST_F(ExpertServiceTest, FailsOverToAnotherReplicaAndReportsWhenAllAreDown) {
  auto a = StartShard(*dir_, AllExperts());
  auto b = StartShard(*dir_, AllExperts());
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  const ExpertTopology topology = AllExpertsOn({a->address(), b->address()});
  RemoteExpertOptions options;
  options.connect_timeout_ms = 10000;
  options.call_deadline_ms = 3000;
  auto backend = RemoteExpertBackend::Connect(topology, config(), *dir_, options);
  ASSERT_TRUE(backend.ok()) << backend.status();
  LocalExpertBackend local(local_store_);
  auto check_layer = [&](uint32_t seed) {
    LayerInput want = MakeLayerInput(seed);
    LayerInput got = MakeLayerInput(seed);
    EXPECT_TRUE(local.RunLayer(1, want.batches).ok());
    absl::Status s = (*backend)->RunLayer(1, got.batches);
    EXPECT_TRUE(s.ok()) << s;
    for (size_t i = 0; i < want.outputs.size(); ++i) {
      EXPECT_EQ(MaxAbsDiff(got.outputs[i], want.outputs[i]), 0.0);
    }
  };
  for (uint32_t seed = 1; seed <= 3; ++seed) check_layer(seed);
  // Both replicas took calls.
  uint64_t a_calls = 0, b_calls = 0;
  for (const auto& e : a->service->Stats().experts) a_calls += e.calls;
  for (const auto& e : b->service->Stats().experts) b_calls += e.calls;
  EXPECT_GT(a_calls, 0u);
  EXPECT_GT(b_calls, 0u);

  a->Stop();
  for (uint32_t seed = 4; seed <= 8; ++seed) check_layer(seed);

  b->Stop();
  LayerInput got = MakeLayerInput(9);
  absl::Status s = (*backend)->RunLayer(0, got.batches);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("(layer 0) unavailable"));
  EXPECT_THAT(std::string(s.message()), ::testing::ContainsRegex("expert [0-7] \\(layer 0\\)"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("UNAVAILABLE"));
  const RemoteExpertStats stats = (*backend)->stats();
  uint64_t unavailable = 0;
  for (const auto& e : stats.experts) {
    auto it = e.errors_by_code.find("UNAVAILABLE");
    if (it != e.errors_by_code.end()) unavailable += it->second;
  }
  EXPECT_GE(unavailable, 16u);  // every expert, both replicas, on the last layer call
}

// Live topology changes: new replicas are checked as at Connect, a refused
// change leaves everything as it was, a removed replica gets no new call.
TEST_F(ExpertServiceTest, ApplyTopologyChecksNewReplicasAndDrainsRemovedOnes) {
  auto extra = StartShard(*dir_, AllExperts());
  ASSERT_NE(extra, nullptr);
  ExpertTopology topology = OnePerExpertTopology();
  RemoteExpertOptions options;
  options.connect_timeout_ms = 500;
  auto connected = RemoteExpertBackend::Connect(topology, config(), *dir_, options);
  ASSERT_TRUE(connected.ok()) << connected.status();
  RemoteExpertBackend& backend = **connected;
  const std::string before = FormatExpertTopology(backend.topology());
  EXPECT_EQ(before, FormatExpertTopology(topology));

  // Refused: a replica holding another expert, a silent one, an expert left
  // with no replica. Nothing changes.
  ExpertTopology wrong = topology;
  wrong.replicas[2].push_back(shard(5).address());
  absl::StatusOr<std::string> r = backend.ApplyTopology(wrong);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("holds experts [5] not 2"));
  ExpertTopology silent = topology;
  silent.replicas[6].push_back("unix:/tmp/switchyard-no-such-socket-" + std::to_string(getpid()));
  r = backend.ApplyTopology(silent);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kUnavailable) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("expert 6 at unix:/tmp/switchyard-no"));
  ExpertTopology empty = topology;
  empty.replicas[1].clear();
  r = backend.ApplyTopology(empty);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_THAT(std::string(r.status().message()), HasSubstr("no replica given for expert 1"));
  EXPECT_EQ(FormatExpertTopology(backend.topology()), before);
  // The same topology again: nothing to do.
  r = backend.ApplyTopology(topology);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, "");

  LocalExpertBackend local(local_store_);
  auto check_layer = [&](uint32_t seed) {
    LayerInput want = MakeLayerInput(seed);
    LayerInput got = MakeLayerInput(seed);
    EXPECT_TRUE(local.RunLayer(1, want.batches).ok());
    absl::Status s = backend.RunLayer(1, got.batches);
    EXPECT_TRUE(s.ok()) << s;
    for (size_t i = 0; i < want.outputs.size(); ++i) {
      EXPECT_EQ(MaxAbsDiff(got.outputs[i], want.outputs[i]), 0.0);
    }
  };
  // Join: every expert gets the extra replica too; it takes calls.
  ExpertTopology joined = topology;
  for (int e : AllExperts()) joined.replicas[e].push_back(extra->address());
  r = backend.ApplyTopology(joined);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_THAT(*r, HasSubstr("expert 0: +" + extra->address()));
  for (uint32_t seed = 1; seed <= 4; ++seed) check_layer(seed);
  EXPECT_GT(backend.stats().calls_by_target.at(extra->address()), 0u);

  // Leave: the original replicas go; they get no new call.
  ExpertTopology left;
  for (int e : AllExperts()) left.replicas[e] = {extra->address()};
  r = backend.ApplyTopology(left);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_THAT(*r, HasSubstr("expert 3: -" + shard(3).address()));
  const RemoteExpertStats at_leave = backend.stats();
  for (uint32_t seed = 5; seed <= 8; ++seed) check_layer(seed);
  const RemoteExpertStats after = backend.stats();
  for (int e : AllExperts()) {
    const std::string& gone = shard(e).address();
    EXPECT_EQ(after.calls_by_target.at(gone), at_leave.calls_by_target.at(gone)) << gone;
    EXPECT_EQ(after.experts[e].targets, std::vector<std::string>{extra->address()});
  }
  EXPECT_GT(after.calls_by_target.at(extra->address()),
            at_leave.calls_by_target.at(extra->address()));
}

// A replica whose every Forward ends CANCELLED, as a shutting-down server
// ends calls it received but had not started; GetShardInfo is the real one's.
class CancellingExpertService final : public v1::ExpertService::CallbackService {
 public:
  explicit CancellingExpertService(ExpertServiceImpl* real) : real_(real) {}
  grpc::ServerUnaryReactor* GetShardInfo(grpc::CallbackServerContext* context,
                                         const v1::GetShardInfoRequest* request,
                                         v1::ShardInfo* response) override {
    return real_->GetShardInfo(context, request, response);
  }
  grpc::ServerUnaryReactor* Forward(grpc::CallbackServerContext* context, const v1::ForwardRequest*,
                                    v1::ForwardResponse*) override {
    forwards_.fetch_add(1);
    grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
    reactor->Finish(grpc::Status(grpc::StatusCode::CANCELLED, "Cancelled"));
    return reactor;
  }
  int forwards() const { return forwards_.load(); }

 private:
  ExpertServiceImpl* real_;
  std::atomic<int> forwards_{0};
};

TEST_F(ExpertServiceTest, CancelledByTheServerIsRetriedOnAnotherReplica) {
  auto real = StartShard(*dir_, {0});
  ASSERT_NE(real, nullptr);
  CancellingExpertService cancelling(real->service.get());
  rpc::ServerOptions server_options;
  server_options.listen_address = "127.0.0.1:0";
  auto server = rpc::RunningServer::Start(server_options, {&cancelling});
  ASSERT_TRUE(server.ok()) << server.status();

  ExpertTopology topology = OnePerExpertTopology();
  // The cancelling replica is listed first, so expert 0's first call goes there.
  topology.replicas[0] = {(*server)->address(), shard(0).address()};
  RemoteExpertOptions options;
  options.connect_timeout_ms = 10000;
  auto backend = RemoteExpertBackend::Connect(topology, config(), *dir_, options);
  ASSERT_TRUE(backend.ok()) << backend.status();
  LocalExpertBackend local(local_store_);
  for (uint32_t seed = 20; seed < 23; ++seed) {
    LayerInput want = MakeLayerInput(seed);
    LayerInput got = MakeLayerInput(seed);
    ASSERT_TRUE(local.RunLayer(0, want.batches).ok());
    absl::Status s = (*backend)->RunLayer(0, got.batches);
    ASSERT_TRUE(s.ok()) << s;
    for (size_t i = 0; i < want.outputs.size(); ++i) {
      EXPECT_EQ(MaxAbsDiff(got.outputs[i], want.outputs[i]), 0.0) << i;
    }
  }
  EXPECT_GE(cancelling.forwards(), 1);
  const RemoteExpertStats::PerExpert e0 = (*backend)->stats().experts[0];
  EXPECT_EQ(e0.retries, static_cast<uint64_t>(cancelling.forwards()));
  ASSERT_EQ(e0.errors_by_code.count("CANCELLED"), 1u);
  EXPECT_EQ(e0.errors_by_code.at("CANCELLED"), static_cast<uint64_t>(cancelling.forwards()));

  // With no other replica the layer fails as unavailable, naming what it saw.
  topology.replicas[0] = {(*server)->address()};
  auto lone = RemoteExpertBackend::Connect(topology, config(), *dir_, options);
  ASSERT_TRUE(lone.ok()) << lone.status();
  LayerInput got = MakeLayerInput(30);
  absl::Status s = (*lone)->RunLayer(0, got.batches);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("expert 0 (layer 0) unavailable"));
  EXPECT_THAT(std::string(s.message()), HasSubstr("CANCELLED"));
  (*server)->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
}

// One expert's failure is its batch's alone: RunLayerPerBatch gives the dead
// expert's batch UNAVAILABLE naming the expert and its address, and every
// other batch its exact output (the model runners end only the sequences
// whose tokens were in the failed batch).
TEST_F(ExpertServiceTest, AFailedExpertFailsOnlyItsOwnBatch) {
  auto doomed = StartShard(*dir_, {2});
  ASSERT_NE(doomed, nullptr);
  const std::string doomed_address = doomed->address();
  RemoteExpertOptions options;
  options.call_deadline_ms = 3000;
  auto backend = ConnectReplacing(2, {doomed_address}, options);
  ASSERT_TRUE(backend.ok()) << backend.status();
  doomed->Stop();

  LocalExpertBackend local(local_store_);
  LayerInput want = MakeLayerInput(41);
  LayerInput got = MakeLayerInput(41);
  ASSERT_TRUE(local.RunLayer(1, want.batches).ok());
  std::vector<absl::Status> batch_status;
  const absl::Status layer_status = (*backend)->RunLayerPerBatch(1, got.batches, &batch_status);
  ASSERT_TRUE(layer_status.ok()) << layer_status;
  ASSERT_EQ(batch_status.size(), got.batches.size());
  for (size_t i = 0; i < got.batches.size(); ++i) {
    if (got.batches[i].expert == 2) {
      EXPECT_EQ(batch_status[i].code(), absl::StatusCode::kUnavailable) << batch_status[i];
      EXPECT_THAT(std::string(batch_status[i].message()),
                  HasSubstr("expert 2 (layer 1) unavailable"));
      EXPECT_THAT(std::string(batch_status[i].message()), HasSubstr(doomed_address));
    } else {
      EXPECT_TRUE(batch_status[i].ok()) << batch_status[i];
      EXPECT_EQ(MaxAbsDiff(got.outputs[i], want.outputs[i]), 0.0) << "batch " << i;
    }
  }
  // RunLayer reports the same error for the whole layer.
  LayerInput again = MakeLayerInput(42);
  const absl::Status s = (*backend)->RunLayer(1, again.batches);
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_THAT(std::string(s.message()), HasSubstr("expert 2 (layer 1) unavailable"));
}

// DNS mode: one target that stands for several addresses (here an ipv4:
// list; on Kubernetes a dns:/// name with one address per pod). A call that
// fails on one address is retried on another address of the same target.
TEST_F(ExpertServiceTest, OneTargetWithSeveralAddressesRetriesOnAnotherAddress) {
  auto real = StartShard(*dir_, {0});
  ASSERT_NE(real, nullptr);
  CancellingExpertService cancelling(real->service.get());
  rpc::ServerOptions server_options;
  server_options.listen_address = "127.0.0.1:0";
  auto server = rpc::RunningServer::Start(server_options, {&cancelling});
  ASSERT_TRUE(server.ok()) << server.status();

  const std::string one_name = absl::StrCat("ipv4:", (*server)->address(), ",", real->address());
  auto backend = ConnectReplacing(0, {one_name});
  ASSERT_TRUE(backend.ok()) << backend.status();
  // Connect returns once the target has one ready connection; round_robin
  // connects to every address at once but picks only ready ones, so a retry
  // right away could find the same (failing) address alone. Let the other
  // connection come up first, as it long has on a serving gateway: until a
  // layer call succeeds (only the real address answers), then count from there.
  LocalExpertBackend local(local_store_);
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(30);
  for (uint32_t seed = 40;; ++seed) {
    LayerInput warm = MakeLayerInput(seed, {0});
    if ((*backend)->RunLayer(0, warm.batches).ok()) break;
    ASSERT_LT(std::chrono::steady_clock::now(), give_up) << "the real address never answered";
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  const int forwards_before = cancelling.forwards();
  const RemoteExpertStats::PerExpert before = (*backend)->stats().experts[0];
  // At least 8 layer calls; more (up to 64) until one has gone to the failing
  // address.
  int layer_calls = 0;
  for (uint32_t seed = 50; layer_calls < 64; ++seed) {
    if (layer_calls >= 8 && cancelling.forwards() > forwards_before) break;
    LayerInput want = MakeLayerInput(seed, {0});
    LayerInput got = MakeLayerInput(seed, {0});
    ASSERT_TRUE(local.RunLayer(0, want.batches).ok());
    absl::Status s = (*backend)->RunLayer(0, got.batches);
    ASSERT_TRUE(s.ok()) << "layer call " << layer_calls << ": " << s;
    EXPECT_EQ(MaxAbsDiff(got.outputs[0], want.outputs[0]), 0.0);
    ++layer_calls;
  }
  // round_robin spread the first attempts over both addresses, and every one
  // that reached the cancelling address was retried on the real one.
  const RemoteExpertStats::PerExpert e0 = (*backend)->stats().experts[0];
  const int failed_first = cancelling.forwards() - forwards_before;
  std::printf("[ dns mode ] %s: %d of %d layer calls first went to the failing address\n",
              one_name.c_str(), failed_first, layer_calls);
  EXPECT_GE(failed_first, 1);
  EXPECT_EQ(e0.retries - before.retries, static_cast<uint64_t>(failed_first));
  EXPECT_EQ(e0.calls - before.calls, static_cast<uint64_t>(layer_calls + failed_first));
  (*server)->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
}

// A DNS server on 127.0.0.1 (UDP) that answers every A query with
// `addresses` and every other query with no records: enough for gRPC's
// c-ares resolver, pointed at it by a dns://127.0.0.1:PORT/NAME:P target,
// to see one name with several addresses, as a Kubernetes headless Service
// gives the gateway one address per ready pod.
class FakeDnsServer {
 public:
  explicit FakeDnsServer(std::vector<std::string> addresses) : addresses_(std::move(addresses)) {
    fd_ = socket(AF_INET, SOCK_DGRAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    if (fd_ < 0 || bind(fd_, reinterpret_cast<sockaddr*>(&addr), len) != 0 ||
        getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      ADD_FAILURE() << "fake DNS server: cannot bind a UDP socket";
      return;
    }
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] { Serve(); });
  }
  ~FakeDnsServer() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
    if (fd_ >= 0) close(fd_);
  }
  int port() const { return port_; }
  int a_queries() const { return a_queries_.load(); }

 private:
  void Serve() {
    while (!stop_) {
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, 50) <= 0) continue;
      uint8_t q[512];
      sockaddr_in from{};
      socklen_t from_len = sizeof(from);
      const ssize_t n =
          recvfrom(fd_, q, sizeof(q), 0, reinterpret_cast<sockaddr*>(&from), &from_len);
      if (n < 12) continue;
      // The question: labels up to a zero byte, then QTYPE and QCLASS.
      size_t end = 12;
      while (end < static_cast<size_t>(n) && q[end] != 0) end += q[end] + 1;
      end += 5;
      if (end > static_cast<size_t>(n)) continue;
      const int qtype = (q[end - 4] << 8) | q[end - 3];
      std::string reply(reinterpret_cast<const char*>(q), end);
      reply[2] = static_cast<char>(0x84 | (q[2] & 0x01));  // response, authoritative, RD copied
      reply[3] = 0;                                        // NOERROR
      reply[4] = 0, reply[5] = 1;                          // one question
      const bool a = qtype == 1;
      if (a) a_queries_.fetch_add(1);
      const size_t answers = a ? addresses_.size() : 0;
      reply[6] = 0, reply[7] = static_cast<char>(answers);
      for (int i = 8; i < 12; ++i) reply[i] = 0;
      for (size_t i = 0; i < answers; ++i) {
        in_addr ip{};
        inet_pton(AF_INET, addresses_[i].c_str(), &ip);
        const uint8_t record[] = {0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 5, 0, 4};  // name, A, IN, TTL 5
        reply.append(reinterpret_cast<const char*>(record), sizeof(record));
        reply.append(reinterpret_cast<const char*>(&ip), 4);
      }
      sendto(fd_, reply.data(), reply.size(), 0, reinterpret_cast<sockaddr*>(&from), from_len);
    }
  }

  std::vector<std::string> addresses_;
  int fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  std::atomic<int> a_queries_{0};
  std::thread thread_;
};

// DNS mode with a real name: one dns:/// target whose name resolves to two
// addresses (127.0.0.1 and 127.0.0.2, the same port), one replica behind
// each. A call that fails on one address is retried on the other.
TEST_F(ExpertServiceTest, ADnsNameWithSeveralAddressesRetriesOnAnotherAddress) {
  // The real replica on 127.0.0.2, the cancelling one on 127.0.0.1, same port.
  auto real = StartShard(*dir_, {0});
  ASSERT_NE(real, nullptr);
  CancellingExpertService cancelling(real->service.get());
  rpc::ServerOptions second;
  second.listen_address = "127.0.0.2:0";
  auto real_server = rpc::RunningServer::Start(second, {real->service.get()});
  ASSERT_TRUE(real_server.ok()) << real_server.status();
  const std::string port =
      (*real_server)->address().substr((*real_server)->address().rfind(':') + 1);
  rpc::ServerOptions first;
  first.listen_address = "127.0.0.1:" + port;
  auto cancelling_server = rpc::RunningServer::Start(first, {&cancelling});
  ASSERT_TRUE(cancelling_server.ok()) << cancelling_server.status();

  FakeDnsServer dns({"127.0.0.1", "127.0.0.2"});
  const std::string name =
      absl::StrCat("dns://127.0.0.1:", dns.port(), "/experts.switchyard.test:", port);
  auto backend = ConnectReplacing(0, {name});
  ASSERT_TRUE(backend.ok()) << backend.status();
  LocalExpertBackend local(local_store_);
  constexpr int kLayers = 8;
  for (uint32_t seed = 70; seed < 70 + kLayers; ++seed) {
    LayerInput want = MakeLayerInput(seed, {0});
    LayerInput got = MakeLayerInput(seed, {0});
    ASSERT_TRUE(local.RunLayer(0, want.batches).ok());
    absl::Status s = (*backend)->RunLayer(0, got.batches);
    ASSERT_TRUE(s.ok()) << "layer call " << seed - 70 << ": " << s;
    EXPECT_EQ(MaxAbsDiff(got.outputs[0], want.outputs[0]), 0.0);
  }
  const RemoteExpertStats::PerExpert e0 = (*backend)->stats().experts[0];
  std::printf(
      "[ dns mode ] %s (%d A queries): %d of %d layer calls first went to the failing "
      "address\n",
      name.c_str(), dns.a_queries(), cancelling.forwards(), kLayers);
  EXPECT_GE(dns.a_queries(), 1);
  EXPECT_GE(cancelling.forwards(), 1) << "round_robin never used the first address";
  EXPECT_EQ(e0.retries, static_cast<uint64_t>(cancelling.forwards()));
  (*cancelling_server)->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  (*real_server)->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
}

// Least outstanding calls: with one of two replicas slowed down, concurrent
// callers send it far fewer calls than the even split round-robin gives.
TEST_F(ExpertServiceTest, ASlowReplicaGetsFewerCalls) {
  constexpr int kDelayMs = 200;  // far more than a fast call takes on a loaded machine
  auto slow = StartShard(*dir_, {0}, /*workers=*/2, kDelayMs);
  ASSERT_NE(slow, nullptr);
  auto backend = ConnectReplacing(0, {shard(0).address(), slow->address()});
  ASSERT_TRUE(backend.ok()) << backend.status();
  const auto calls_of = [](const Shard& s) {
    uint64_t calls = 0;
    for (const auto& e : s.service->Stats().experts) calls += e.calls;
    return calls;
  };
  const uint64_t fast_before = calls_of(shard(0));
  constexpr int kThreads = 6;
  constexpr int kIterations = 15;
  std::vector<int> failures(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kIterations; ++i) {
        LayerInput got = MakeLayerInput(3000 + t * kIterations + i, {0});
        if (!(*backend)->RunLayer(i % 2, got.batches).ok()) ++failures[t];
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(failures[t], 0) << "thread " << t;
  const uint64_t fast_calls = calls_of(shard(0)) - fast_before;
  const uint64_t slow_calls = calls_of(*slow);
  std::printf("[ balance  ] %d callers, replica +%d ms: fast %llu calls, slow %llu calls\n",
              kThreads, kDelayMs, static_cast<unsigned long long>(fast_calls),
              static_cast<unsigned long long>(slow_calls));
  EXPECT_EQ(fast_calls + slow_calls, static_cast<uint64_t>(kThreads * kIterations));
  EXPECT_GT(slow_calls, 0u) << "a slow replica still gets calls when the fast one is busy";
  // Round-robin would give each half; least outstanding gives the slow one
  // at most a third.
  EXPECT_LT(slow_calls * 3, static_cast<uint64_t>(kThreads * kIterations));
}

// (f) ----------------------------------------------------------------------

TEST_F(ExpertServiceTest, ConcurrentRunLayerCallsAllGetTheirOwnResults) {
  auto remote = ConnectOnePerExpert();
  ASSERT_NE(remote, nullptr);
  LocalExpertBackend local(local_store_);
  constexpr int kThreads = 8;
  constexpr int kIterations = 10;
  std::vector<int> failures(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kIterations; ++i) {
        const uint32_t seed = 1000 + t * kIterations + i;
        const int layer = (t + i) % 2;
        LayerInput want = MakeLayerInput(seed);
        LayerInput got = MakeLayerInput(seed);
        if (!local.RunLayer(layer, want.batches).ok() ||
            !remote->RunLayer(layer, got.batches).ok()) {
          ++failures[t];
          continue;
        }
        for (size_t b = 0; b < want.outputs.size(); ++b) {
          if (got.outputs[b] != want.outputs[b]) ++failures[t];
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < kThreads; ++t) EXPECT_EQ(failures[t], 0) << "thread " << t;
  uint64_t calls = 0;
  for (const auto& e : remote->stats().experts) calls += e.calls;
  EXPECT_EQ(calls, static_cast<uint64_t>(kThreads * kIterations * 8));
}

// (g) ----------------------------------------------------------------------

TEST_F(ExpertServiceTest, GetShardInfoDescribesTheShard) {
  v1::ShardInfo info;
  grpc::ClientContext context;
  grpc::Status s = StubFor(shard(3).address())->GetShardInfo(&context, {}, &info);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(info.config_fingerprint(), config().Fingerprint());
  EXPECT_THAT(info.experts(), ::testing::ElementsAre(3u));
  EXPECT_EQ(info.layer_begin(), 0u);
  EXPECT_EQ(info.layer_end(), 2u);
  EXPECT_EQ(info.dims().hidden_size(), 64u);
  EXPECT_EQ(info.dims().intermediate_size(), 128u);
  EXPECT_EQ(info.dims().num_layers(), 2u);
  EXPECT_EQ(info.dims().num_experts(), 8u);
  EXPECT_EQ(info.dims().experts_per_token(), 2u);
  EXPECT_EQ(info.weights_dtype(), "bf16");
  EXPECT_EQ(info.backend(), "cpu-f32");
  // BF16 weights: row-count invariant exactly where the CPU kernels in force
  // are (true on AMX/AVX-512, false at avx2 in f32 precision).
  EXPECT_EQ(info.rows_independent_of_count(), cpu::RowsIndependentOfCount(/*bf16_weights=*/true));
  EXPECT_EQ(info.version(), "0.1.0");
  ASSERT_EQ(info.expert_weight_fingerprints().size(), 1u);
  auto fp = ExpertWeightsFingerprint(*dir_, 3);
  ASSERT_TRUE(fp.ok()) << fp.status();
  EXPECT_EQ(info.expert_weight_fingerprints().at(3), *fp);
}

TEST_F(ExpertServiceTest, ServesHealthAndReflection) {
  auto shard = StartShard(*dir_, {1});
  ASSERT_NE(shard, nullptr);
  // grpc.health.v1.Health/Check, request {service: ""}: response {status: SERVING (1)}.
  std::string response;
  grpc::Status s = RawUnary(shard->address(), "/grpc.health.v1.Health/Check", "", &response);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(response, std::string("\x08\x01", 2));
  shard->server->SetServing(false);
  s = RawUnary(shard->address(), "/grpc.health.v1.Health/Check", "", &response);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(response, std::string("\x08\x02", 2));  // NOT_SERVING

  // grpc.reflection.v1alpha.ServerReflection: list_services (field 7) lists ours.
  auto channel = grpc::CreateChannel(shard->address(), grpc::InsecureChannelCredentials());
  grpc::GenericStub stub(channel);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  grpc::CompletionQueue cq;
  auto call = stub.PrepareCall(
      &context, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  void* tag;
  bool ok;
  call->StartCall(reinterpret_cast<void*>(1));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  grpc::Slice request(std::string("\x3a\x00", 2));
  call->Write(grpc::ByteBuffer(&request, 1), reinterpret_cast<void*>(2));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  grpc::ByteBuffer reply;
  call->Read(&reply, reinterpret_cast<void*>(3));
  ASSERT_TRUE(cq.Next(&tag, &ok) && ok);
  EXPECT_THAT(DumpBytes(reply), HasSubstr("switchyard.v1.ExpertService"));
  EXPECT_THAT(DumpBytes(reply), HasSubstr("grpc.health.v1.Health"));
  call->WritesDone(reinterpret_cast<void*>(4));
  ASSERT_TRUE(cq.Next(&tag, &ok));
  grpc::Status finish;
  call->Finish(&finish, reinterpret_cast<void*>(5));
  ASSERT_TRUE(cq.Next(&tag, &ok));
  EXPECT_TRUE(finish.ok()) << finish.error_message();
}

TEST_F(ExpertServiceTest, GracefulStopFinishesAcceptedCalls) {
  auto s = StartShard(*dir_, {0}, /*workers=*/1);
  ASSERT_NE(s, nullptr);
  auto backend = ConnectReplacing(0, {s->address()});
  ASSERT_TRUE(backend.ok()) << backend.status();

  // 32 sizeable batches queue up behind the single worker.
  constexpr int kBatches = 32;
  constexpr int kTokens = 512;
  std::vector<std::vector<float>> inputs, outputs, want;
  std::vector<ExpertBatch> batches;
  for (int i = 0; i < kBatches; ++i) {
    inputs.push_back(RandomRows(kTokens, 500 + i));
    outputs.emplace_back(inputs.back().size());
    want.emplace_back(inputs.back().size());
    local_store_->Find(0, 0)->Forward(inputs.back().data(), kTokens, want.back().data());
  }
  for (int i = 0; i < kBatches; ++i) {
    batches.push_back(
        {.expert = 0, .tokens = kTokens, .input = inputs[i].data(), .output = outputs[i].data()});
  }
  absl::Status status;
  std::thread runner([&] { status = (*backend)->RunLayer(0, batches); });
  // Stop once every call has been accepted (queued or running).
  const ExpertCounters* counters = s->service->counters(0, 0);
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (counters->in_flight.load() + static_cast<int64_t>(counters->calls.load()) < kBatches &&
         std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  // Informational: how much work the stop had to wait for.
  std::printf("stopping with %llu of %d calls done\n",
              static_cast<unsigned long long>(counters->calls.load()), kBatches);
  s->Stop();
  runner.join();
  ASSERT_TRUE(status.ok()) << status;
  for (int i = 0; i < kBatches; ++i) EXPECT_EQ(MaxAbsDiff(outputs[i], want[i]), 0.0) << i;
  const ExpertServerStats stats = s->service->Stats();
  EXPECT_EQ(stats.queued_calls, 0);
  EXPECT_EQ(stats.experts[0].in_flight, 0);
  EXPECT_EQ(stats.experts[0].calls, static_cast<uint64_t>(kBatches));
  s->service->Shutdown();  // idempotent
}

// The ForwardStream path ------------------------------------------------------

// The CPU experts, recording how many batches each backend call carried (and
// sleeping delay_ms first when set).
class RecordingExpertBackend final : public ExpertBackend {
 public:
  explicit RecordingExpertBackend(ExpertBackend* inner) : inner_(inner) {}
  absl::Status RunLayer(int layer, absl::Span<const ExpertBatch> batches) override {
    const int delay = delay_ms.load();
    if (delay > 0) std::this_thread::sleep_for(std::chrono::milliseconds(delay));
    std::lock_guard<std::mutex> lock(mu_);
    ++calls_by_batches_[batches.size()];
    return inner_->RunLayer(layer, batches);
  }
  std::string Describe() const override { return inner_->Describe(); }
  int CallsWithBatches(size_t n) {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_by_batches_[n];
  }
  std::atomic<int> delay_ms{0};

 private:
  ExpertBackend* inner_;
  std::mutex mu_;
  std::map<size_t, int> calls_by_batches_;
};

// A shard behind an ObservedExpertService and a RecordingExpertBackend, on
// `listen` (default a free port; pass "127.0.0.1:PORT" to restart one).
// Stops at once (Kill, and when destroyed): calls and streams in flight are
// cancelled.
struct CountedShard : testing::InProcessExpert {
  RecordingExpertBackend* recording = nullptr;
  void Kill() { Stop(std::chrono::milliseconds(0)); }
};

std::unique_ptr<CountedShard> StartCountedShard(const std::string& dir, std::vector<int> experts,
                                                const std::string& listen = "127.0.0.1:0",
                                                const std::string& backend_name = "cpu-f32",
                                                bool frames = false) {
  auto shard = std::make_unique<CountedShard>();
  shard->stop_grace = std::chrono::milliseconds(0);
  auto description = shard->LoadCheckpointExperts(dir, experts);
  EXPECT_TRUE(description.ok()) << description.status();
  if (!description.ok()) return nullptr;
  shard->recording =
      shard->AddCompute(std::make_unique<RecordingExpertBackend>(shard->compute.back().get()));
  const absl::Status served =
      shard->Serve(shard->store->config(), *std::move(description),
                   ExpertServerOptions{.backend_name = backend_name}, listen, /*observe=*/true);
  EXPECT_TRUE(served.ok()) << served;
  if (!served.ok()) return nullptr;
  if (frames) {
    const absl::Status framed = shard->ServeFrames();
    EXPECT_TRUE(framed.ok()) << framed;
    if (!framed.ok()) return nullptr;
  }
  return shard;
}

// A CountedShard that also serves a frame socket.
std::unique_ptr<CountedShard> StartFramedShard(const std::string& dir, std::vector<int> experts,
                                               const std::string& listen = "127.0.0.1:0") {
  return StartCountedShard(dir, std::move(experts), listen, "cpu-f32", /*frames=*/true);
}

// A connection to `shard`'s frame socket (TCP), its greeting read.
absl::StatusOr<rpc::FrameSocket> DialGreeted(const CountedShard& shard, absl::Time deadline) {
  absl::StatusOr<rpc::FrameSocket> socket =
      rpc::DialFrames(absl::StrCat("127.0.0.1:", shard.frames->endpoint().port), deadline);
  if (!socket.ok()) return socket.status();
  std::string greeting;
  if (absl::Status s = rpc::ReadFrame(*socket, 1024, deadline, &greeting); !s.ok()) return s;
  return socket;
}

// `threads` threads each run `iterations` layers at once (layers 0 and 1 in
// turn, inputs MakeLayerInput(seed_base + ...)) through every one of
// `remotes` and through `local`; returns the largest difference between a
// remote output and the local one (and between the remotes), and counts the
// layers or batches that failed in *failures.
double RunLayersFromThreads(ExpertBackend& local, const std::vector<RemoteExpertBackend*>& remotes,
                            int threads, int iterations, uint32_t seed_base, int* failures) {
  std::vector<int> failed(threads, 0);
  std::vector<double> max_diff(threads, 0.0);
  std::vector<std::thread> running;
  for (int t = 0; t < threads; ++t) {
    running.emplace_back([&, t] {
      for (int i = 0; i < iterations; ++i) {
        const uint32_t seed = seed_base + t * iterations + i;
        const int layer = (t + i) % 2;
        LayerInput want = MakeLayerInput(seed);
        if (!local.RunLayer(layer, want.batches).ok()) {
          ++failed[t];
          continue;
        }
        std::vector<LayerInput> got;
        for (RemoteExpertBackend* remote : remotes) {
          got.push_back(MakeLayerInput(seed));
          std::vector<absl::Status> batch_status;
          if (!remote->RunLayerPerBatch(layer, got.back().batches, &batch_status).ok()) {
            ++failed[t];
            continue;
          }
          for (const absl::Status& b : batch_status) failed[t] += b.ok() ? 0 : 1;
        }
        for (size_t b = 0; b < want.outputs.size(); ++b) {
          for (size_t r = 0; r < got.size(); ++r) {
            max_diff[t] = std::max({max_diff[t], MaxAbsDiff(got[r].outputs[b], want.outputs[b]),
                                    MaxAbsDiff(got[r].outputs[b], got[0].outputs[b])});
          }
        }
      }
    });
  }
  for (auto& th : running) th.join();
  *failures = 0;
  for (int f : failed) *failures += f;
  return *std::max_element(max_diff.begin(), max_diff.end());
}

// Several threads run layers at once through one backend: the stream
// multiplexes them (one stream to the shard, no unary call), each layer's
// eight batches travel as one request that the shard runs as one layer, and
// every output equals the unary path's and the local backend's exactly.
TEST_F(ExpertServiceTest, StreamedLayersFromSeveralThreadsMatchUnaryExactly) {
  auto all = StartCountedShard(*dir_, AllExperts());
  ASSERT_NE(all, nullptr);
  const ExpertTopology topology = AllExpertsOn({all->address()});
  RemoteExpertOptions options;
  options.connect_timeout_ms = 10000;
  auto streamed = RemoteExpertBackend::Connect(topology, config(), *dir_, options);
  ASSERT_TRUE(streamed.ok()) << streamed.status();
  options.use_stream = false;
  auto unary = RemoteExpertBackend::Connect(topology, config(), *dir_, options);
  ASSERT_TRUE(unary.ok()) << unary.status();
  EXPECT_THAT((*streamed)->Describe(), HasSubstr("streams"));

  LocalExpertBackend local(local_store_);
  constexpr int kThreads = 6;
  constexpr int kIterations = 10;
  int failures = 0;
  const double worst = RunLayersFromThreads(local, {streamed->get(), unary->get()}, kThreads,
                                            kIterations, 4000, &failures);
  std::printf("[ stream   ] %d threads x %d layers: max |stream - unary|, |stream - local| = %g\n",
              kThreads, kIterations, worst);
  EXPECT_EQ(failures, 0);
  EXPECT_EQ(worst, 0.0);
  // The unary backend's calls only, one per batch; one stream for all threads.
  EXPECT_EQ(all->observed->unary_calls.load(), kThreads * kIterations * 8);
  EXPECT_EQ(all->observed->streams.load(), 1);
  EXPECT_EQ(all->recording->CallsWithBatches(8), kThreads * kIterations);
  EXPECT_EQ(all->service->Stats().queued_calls, 0);
}

// A connection that breaks while a call computes on it fails exactly the
// batches in flight on it, with a status naming the broken ForwardStream or
// frame connection, and nothing else; the layer returns well within its
// deadline. On a stream the replica is killed; on frames only its frame
// connections break (as a crash or a cut link would break them: no reply
// comes), so the next layer reconnects and gets exactly its outputs.
TEST_F(ExpertServiceTest, AConnectionBrokenMidCallFailsOnlyItsBatches) {
  LocalExpertBackend local(local_store_);
  for (const bool frames : {false, true}) {
    SCOPED_TRACE(frames ? "frames" : "stream");
    auto doomed = frames ? StartFramedShard(*dir_, {2}) : StartCountedShard(*dir_, {2});
    ASSERT_NE(doomed, nullptr);
    const std::string doomed_address = doomed->address();
    RemoteExpertOptions options;
    options.call_deadline_ms = 20000;
    auto backend = ConnectReplacing(2, {doomed_address}, options);
    ASSERT_TRUE(backend.ok()) << backend.status();
    {  // warm: the stream or a frame connection is open
      LayerInput got = MakeLayerInput(60);
      ASSERT_TRUE((*backend)->RunLayer(0, got.batches).ok());
    }
    doomed->recording->delay_ms = 1000;  // the call is in flight when it breaks
    LayerInput want = MakeLayerInput(61);
    ASSERT_TRUE(local.RunLayer(0, want.batches).ok());
    LayerInput got = MakeLayerInput(61);
    std::vector<absl::Status> batch_status;
    absl::Status layer_status;
    const auto start = std::chrono::steady_clock::now();
    std::thread runner(
        [&] { layer_status = (*backend)->RunLayerPerBatch(0, got.batches, &batch_status); });
    const ExpertCounters* counters = doomed->service->counters(0, 2);
    const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
    while (counters->in_flight.load() == 0 && std::chrono::steady_clock::now() < give_up) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
    ASSERT_EQ(counters->in_flight.load(), 1);
    std::thread breaker([&] {
      if (frames) {
        doomed->frames->AbortConnections();
      } else {
        doomed->Kill();
      }
    });
    runner.join();
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    breaker.join();
    ASSERT_TRUE(layer_status.ok()) << layer_status;
    ASSERT_EQ(batch_status.size(), 8u);
    std::printf("[ broken   ] layer returned after %.2f s: %s\n", seconds,
                batch_status[2].ToString().c_str());
    const std::string message(batch_status[2].message());
    EXPECT_EQ(batch_status[2].code(), absl::StatusCode::kUnavailable) << batch_status[2];
    EXPECT_THAT(message, HasSubstr("expert 2 (layer 0)"));
    EXPECT_THAT(message, HasSubstr(doomed_address));
    EXPECT_THAT(message, HasSubstr(frames ? "frame connection" : "ForwardStream"));
    for (size_t b = 0; b < 8; ++b) {
      if (b == 2) continue;
      EXPECT_TRUE(batch_status[b].ok()) << b << ": " << batch_status[b];
      EXPECT_EQ(MaxAbsDiff(got.outputs[b], want.outputs[b]), 0.0) << b;
    }
    EXPECT_LT(seconds, 10.0) << "the broken connection was not noticed before the deadline";
    if (frames) {
      doomed->recording->delay_ms = 0;
      LayerInput next = MakeLayerInput(61);
      const absl::Status s = (*backend)->RunLayer(0, next.batches);
      ASSERT_TRUE(s.ok()) << s;
      EXPECT_EQ(MaxAbsDiff(next.outputs[2], want.outputs[2]), 0.0);
      EXPECT_EQ(doomed->frames->connections_accepted(), 2u);
    }
  }
}

// A stream to a replica that stopped fails fast; once the replica is back on
// the same address, the next layers open a new stream to it and succeed.
TEST_F(ExpertServiceTest, AStreamReconnectsAfterTheReplicaRestarts) {
  auto first = StartCountedShard(*dir_, {5});
  ASSERT_NE(first, nullptr);
  const std::string address = first->address();
  RemoteExpertOptions options;
  options.call_deadline_ms = 2000;
  options.max_reconnect_backoff_ms = 200;
  auto backend = ConnectReplacing(5, {address}, options);
  ASSERT_TRUE(backend.ok()) << backend.status();
  LocalExpertBackend local(local_store_);
  LayerInput want = MakeLayerInput(70);
  ASSERT_TRUE(local.RunLayer(1, want.batches).ok());
  {
    LayerInput got = MakeLayerInput(70);
    ASSERT_TRUE((*backend)->RunLayer(1, got.batches).ok());
    EXPECT_EQ(MaxAbsDiff(got.outputs[5], want.outputs[5]), 0.0);
  }
  EXPECT_EQ(first->observed->streams.load(), 1);
  first->Kill();
  {
    LayerInput got = MakeLayerInput(70);
    std::vector<absl::Status> batch_status;
    ASSERT_TRUE((*backend)->RunLayerPerBatch(1, got.batches, &batch_status).ok());
    EXPECT_EQ(batch_status[5].code(), absl::StatusCode::kUnavailable) << batch_status[5];
    for (size_t b = 0; b < 8; ++b) {
      if (b != 5) {
        EXPECT_TRUE(batch_status[b].ok()) << b << ": " << batch_status[b];
      }
    }
  }
  auto second = StartCountedShard(*dir_, {5}, address);
  ASSERT_NE(second, nullptr);
  absl::Status status;
  int tries = 0;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  do {
    ++tries;
    LayerInput got = MakeLayerInput(70);
    status = (*backend)->RunLayer(1, got.batches);
    if (status.ok()) {
      EXPECT_EQ(MaxAbsDiff(got.outputs[5], want.outputs[5]), 0.0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  } while (std::chrono::steady_clock::now() < give_up);
  std::printf("[ restart  ] back after %d layer call(s): %s\n", tries, status.ToString().c_str());
  ASSERT_TRUE(status.ok()) << status;
  EXPECT_GE(second->observed->streams.load(), 1);
  EXPECT_EQ(second->observed->unary_calls.load(), 0);
}

// A replica that accepts a request but never answers in time, on a
// ForwardStream and on a frame connection: the batch fails when the layer's
// deadline passes (the connection itself is healthy, so only the deadline can
// end the wait), the other batches are fine, nothing hangs; the late reply is
// dropped, never taken for a later call's (a frame connection it was due on
// is closed), so the next layers get exactly their own outputs.
TEST_F(ExpertServiceTest, AReplyThatNeverComesFailsAtTheDeadlineAndIsDropped) {
  LocalExpertBackend local(local_store_);
  for (const bool frames : {false, true}) {
    SCOPED_TRACE(frames ? "frames" : "stream");
    auto stuck = frames ? StartFramedShard(*dir_, {1}) : StartCountedShard(*dir_, {1});
    ASSERT_NE(stuck, nullptr);
    RemoteExpertOptions options;
    options.call_deadline_ms = 1000;
    auto backend = ConnectReplacing(1, {stuck->address()}, options);
    ASSERT_TRUE(backend.ok()) << backend.status();
    // The reply would come 2 s after the deadline: returning well before it
    // (with room for a loaded machine) can only be the deadline's doing.
    stuck->recording->delay_ms = 3000;
    LayerInput got = MakeLayerInput(80);
    std::vector<absl::Status> batch_status;
    const auto start = std::chrono::steady_clock::now();
    ASSERT_TRUE((*backend)->RunLayerPerBatch(0, got.batches, &batch_status).ok());
    const double seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("[ deadline ] %s, 1000 ms budget, returned after %.3f s: %s\n",
                frames ? "frames" : "stream", seconds, batch_status[1].ToString().c_str());
    EXPECT_GE(seconds, 0.95);
    EXPECT_LT(seconds, 2.5);
    EXPECT_EQ(batch_status[1].code(), absl::StatusCode::kUnavailable) << batch_status[1];
    EXPECT_THAT(std::string(batch_status[1].message()),
                HasSubstr(frames ? "DEADLINE_EXCEEDED: no reply on the frame connection"
                                 : "DEADLINE_EXCEEDED: no reply on the ForwardStream"));
    for (size_t b = 0; b < 8; ++b) {
      if (b != 1) {
        EXPECT_TRUE(batch_status[b].ok()) << b << ": " << batch_status[b];
      }
    }
    stuck->recording->delay_ms = 0;
    // The late reply is sent (3 s after the call began) before the next calls.
    std::this_thread::sleep_until(start + std::chrono::milliseconds(3300));
    for (uint32_t seed : {81u, 82u}) {
      LayerInput want = MakeLayerInput(seed);
      LayerInput next = MakeLayerInput(seed);
      ASSERT_TRUE(local.RunLayer(0, want.batches).ok());
      const absl::Status s = (*backend)->RunLayer(0, next.batches);
      ASSERT_TRUE(s.ok()) << s;
      EXPECT_EQ(MaxAbsDiff(next.outputs[1], want.outputs[1]), 0.0) << seed;
    }
    if (frames) {
      EXPECT_EQ(stuck->frames->connections_accepted(), 2u);
    }
  }
}

// A shard that computes in BF16 (its backend name ends in "-bf16") gets its
// hidden states as BF16, which it would round them to anyway, and replies in
// F32: the output is exactly the expert of the BF16-rounded input. A shard in
// F32 (the parity mode) gets F32 and is exact.
TEST_F(ExpertServiceTest, Bf16InputsGoOnlyToShardsThatComputeInBf16) {
  auto bf16 = StartCountedShard(*dir_, {3}, "127.0.0.1:0", "test-bf16");
  ASSERT_NE(bf16, nullptr);
  ExpertTopology topology = OnePerExpertTopology();
  topology.replicas[3] = {bf16->address()};
  RemoteExpertOptions options;
  options.connect_timeout_ms = 10000;
  for (bool use_stream : {true, false}) {
    options.use_stream = use_stream;
    auto backend = RemoteExpertBackend::Connect(topology, config(), *dir_, options);
    ASSERT_TRUE(backend.ok()) << backend.status();
    LayerInput got = MakeLayerInput(95);
    ASSERT_TRUE((*backend)->RunLayer(1, got.batches).ok());
    for (size_t b = 0; b < 8; ++b) {
      const int n = got.batches[b].tokens;
      const std::vector<float> x = b == 3 ? RoundToBf16(got.inputs[b]) : got.inputs[b];
      std::vector<float> want(x.size());
      local_store_->Find(1, static_cast<int>(b))->Forward(x.data(), n, want.data());
      EXPECT_EQ(MaxAbsDiff(got.outputs[b], want), 0.0)
          << "expert " << b << " stream " << use_stream;
    }
    // The output came back in F32: not every value is a BF16 value.
    const std::vector<float>& out3 = got.outputs[3];
    EXPECT_NE(RoundToBf16(out3), out3);
  }
}

// The frame socket path ------------------------------------------------------

// Several threads run layers at once on a shard's frame socket: every batch
// goes there (no ForwardStream, no unary call), each thread's layer travels as
// one frame request on a connection of its own (reused from layer to layer:
// at most one connection per thread), and every output equals the local
// backend's exactly.
TEST_F(ExpertServiceTest, FramesCarryConcurrentLayersAndMatchLocalExactly) {
  auto all = StartFramedShard(*dir_, AllExperts());
  ASSERT_NE(all, nullptr);
  const ExpertTopology topology = AllExpertsOn({all->address()});
  RemoteExpertOptions options;
  options.connect_timeout_ms = 10000;
  auto backend = RemoteExpertBackend::Connect(topology, config(), *dir_, options);
  ASSERT_TRUE(backend.ok()) << backend.status();
  EXPECT_THAT((*backend)->Describe(), HasSubstr("frames"));

  LocalExpertBackend local(local_store_);
  constexpr int kThreads = 4;
  constexpr int kIterations = 10;
  int failures = 0;
  const double worst =
      RunLayersFromThreads(local, {backend->get()}, kThreads, kIterations, 7000, &failures);
  std::printf("[ frames   ] %d threads x %d layers, max |frames - local| = %g, %llu connections\n",
              kThreads, kIterations, worst,
              static_cast<unsigned long long>(all->frames->connections_accepted()));
  EXPECT_EQ(failures, 0);
  EXPECT_EQ(worst, 0.0);
  EXPECT_EQ(all->frames->requests_read(), uint64_t{kThreads * kIterations});
  // All version 2: the rows after the message.
  EXPECT_EQ(all->frames->requests_with_tail_read(), uint64_t{kThreads * kIterations});
  EXPECT_GE(all->frames->connections_accepted(), 1u);
  EXPECT_LE(all->frames->connections_accepted(), uint64_t{kThreads});
  EXPECT_EQ(all->observed->streams.load(), 0);
  EXPECT_EQ(all->observed->unary_calls.load(), 0);
  // Each layer's eight batches ran as one backend call.
  EXPECT_EQ(all->recording->CallsWithBatches(8), kThreads * kIterations);

  // use_frames = false: the same shard over gRPC only.
  options.use_frames = false;
  auto grpc_only = RemoteExpertBackend::Connect(topology, config(), *dir_, options);
  ASSERT_TRUE(grpc_only.ok()) << grpc_only.status();
  LayerInput got = MakeLayerInput(7999);
  ASSERT_TRUE((*grpc_only)->RunLayer(1, got.batches).ok());
  EXPECT_EQ(all->frames->requests_read(), uint64_t{kThreads * kIterations});
  EXPECT_EQ(all->observed->streams.load(), 1);
}

// A shard that announces frame version 1 (an older shard) gets version 1
// frames, one that announces 2 gets the rows after the message; with F32
// and with BF16 on the wire, the outputs of both have the same bits, and
// with F32 they equal the local backend's.
TEST_F(ExpertServiceTest, FramesOfEitherVersionGiveTheSameBits) {
  LocalExpertBackend local(local_store_);
  for (const v1::DType wire : {v1::DTYPE_F32, v1::DTYPE_BF16}) {
    std::vector<LayerInput> by_version;
    for (const int version : {1, 2}) {
      auto shard = StartCountedShard(*dir_, AllExperts());
      ASSERT_NE(shard, nullptr);
      ASSERT_TRUE(shard->ServeFrames("127.0.0.1:0", nullptr, 0, version).ok());
      v1::ShardInfo info;
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
      ASSERT_TRUE(StubFor(shard->address())->GetShardInfo(&ctx, {}, &info).ok());
      EXPECT_EQ(info.frame_version(), static_cast<uint32_t>(version));
      RemoteExpertOptions options;
      options.connect_timeout_ms = 10000;
      options.wire_dtype = wire;
      auto backend =
          RemoteExpertBackend::Connect(AllExpertsOn({shard->address()}), config(), *dir_, options);
      ASSERT_TRUE(backend.ok()) << backend.status();
      LayerInput got = MakeLayerInput(7300);
      const absl::Status s = (*backend)->RunLayer(1, got.batches);
      ASSERT_TRUE(s.ok()) << s;
      EXPECT_EQ(shard->frames->requests_read(), 1u);
      EXPECT_EQ(shard->frames->requests_with_tail_read(), version == 2 ? 1u : 0u);
      by_version.push_back(std::move(got));
    }
    LayerInput want = MakeLayerInput(7300);
    ASSERT_TRUE(local.RunLayer(1, want.batches).ok());
    double versions = 0.0, to_local = 0.0;
    for (size_t b = 0; b < 8; ++b) {
      versions = std::max(versions, MaxAbsDiff(by_version[0].outputs[b], by_version[1].outputs[b]));
      to_local = std::max(to_local, MaxAbsDiff(by_version[1].outputs[b], want.outputs[b]));
    }
    std::printf("[ versions ] wire %s: max |v2 - v1| = %g, max |v2 - local| = %g\n",
                v1::DType_Name(wire).c_str(), versions, to_local);
    EXPECT_EQ(versions, 0.0);
    if (wire == v1::DTYPE_F32) {
      EXPECT_EQ(to_local, 0.0);
    }
  }
}

// A version 2 frame straight on the socket: each batch's rows are read from
// the tail where its tensor points, and the reply (version 2 too) carries
// the outputs in its own tail. A batch whose rows do not fit in the tail is
// refused by name and the others are answered; the same tensor over gRPC,
// with no frame at all, is refused too.
TEST_F(ExpertServiceTest, AVersion2FrameCarriesItsRowsAfterTheMessage) {
  auto shard = StartFramedShard(*dir_, {3});
  ASSERT_NE(shard, nullptr);
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  auto socket = DialGreeted(*shard, deadline);
  ASSERT_TRUE(socket.ok()) << socket.status();
  const std::vector<float> x = RandomRows(3, 192);
  const std::vector<float> y = RandomRows(3, 193);
  const size_t bytes = rpc::EncodedMatrixBytes(3, kD, v1::DTYPE_F32);
  v1::ForwardStreamRequest request;
  request.set_id(9);
  // Batch 0 at offset `bytes`, batch 1 at 0 (any order), batch 2 past the end.
  const size_t offsets[] = {bytes, 0, 2 * bytes - 4};
  for (size_t offset : offsets) {
    v1::ForwardRequest* batch = request.add_batches();
    batch->set_layer(1);
    batch->set_expert(3);
    rpc::DescribeMatrixInFrameTail(3, kD, v1::DTYPE_F32, offset, batch->mutable_hidden_states());
  }
  ASSERT_TRUE(rpc::WriteMessageFrameWithTail(
                  *socket, request, 2 * bytes,
                  [&](char* tail) {
                    rpc::EncodeMatrixTo(y.data(), 3, kD, v1::DTYPE_F32, tail);
                    rpc::EncodeMatrixTo(x.data(), 3, kD, v1::DTYPE_F32, tail + bytes);
                  },
                  deadline)
                  .ok());
  v1::ForwardStreamResponse response;
  rpc::FrameTail tail;
  const absl::Status read = rpc::ReadMessageFrame(*socket, 1 << 20, deadline, &response, &tail);
  ASSERT_TRUE(read.ok()) << read;
  EXPECT_TRUE(tail.present);
  EXPECT_EQ(tail.bytes.size(), 2 * bytes);  // the outputs of batches 0 and 1
  EXPECT_EQ(response.id(), 9u);
  ASSERT_EQ(response.results_size(), 3);
  EXPECT_TRUE(response.results(0).response().output().has_frame_tail_offset());
  EXPECT_TRUE(response.results(0).response().output().data().empty());
  ExpectLayer1Expert3(response.results(0), x, tail.view());
  ExpectLayer1Expert3(response.results(1), y, tail.view());
  EXPECT_EQ(response.results(2).code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(response.results(2).error_message(), HasSubstr("but the frame's tail has"));

  v1::ForwardRequest unary = request.batches(1);
  unary.set_config_fingerprint(config().Fingerprint());
  v1::ForwardResponse unary_response;
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  const grpc::Status s = StubFor(shard->address())->Forward(&context, unary, &unary_response);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(s.error_message(), HasSubstr("did not come in a version 2 frame"));
}

// --frame-spin-us on both ends (the layer's thread polls for its replies,
// each connection's thread for its next request, before they sleep): the
// same frames and the same exact outputs, layers from several threads at
// once, a pause longer than the spin included. A spin out of range is
// refused on either side, naming it.
TEST_F(ExpertServiceTest, FramesWithPollingOnBothEndsMatchLocalExactly) {
  auto all = StartFramedShard(*dir_, AllExperts());
  ASSERT_NE(all, nullptr);
  ASSERT_TRUE(all->ServeFrames("127.0.0.1:0", nullptr, /*request_spin_us=*/300).ok());
  const ExpertTopology topology = AllExpertsOn({all->address()});
  RemoteExpertOptions options;
  options.connect_timeout_ms = 10000;
  options.reply_spin_us = 300;
  auto backend = RemoteExpertBackend::Connect(topology, config(), *dir_, options);
  ASSERT_TRUE(backend.ok()) << backend.status();

  LocalExpertBackend local(local_store_);
  int failures = 0;
  double worst = RunLayersFromThreads(local, {backend->get()}, 2, 6, 7100, &failures);
  // Both ends now sleep in poll: the next layer wakes them as before.
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  worst = std::max(worst, RunLayersFromThreads(local, {backend->get()}, 1, 3, 7200, &failures));
  std::printf("[ polling  ] 15 layers, max |frames - local| = %g\n", worst);
  EXPECT_EQ(failures, 0);
  EXPECT_EQ(worst, 0.0);
  EXPECT_EQ(all->frames->requests_read(), 15u);
  EXPECT_EQ(all->observed->streams.load(), 0);
  EXPECT_EQ(all->observed->unary_calls.load(), 0);

  options.reply_spin_us = -1;
  auto refused = RemoteExpertBackend::Connect(topology, config(), *dir_, options);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(refused.status().message(), HasSubstr("reply spin must be 0..100000 us, got -1"));
  const absl::Status server =
      all->ServeFrames("127.0.0.1:0", nullptr, /*request_spin_us=*/rpc::kMaxSpinUs + 1);
  EXPECT_EQ(server.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(server.message(), HasSubstr("request spin must be 0..100000 us, got 100001"));
}

// A shard whose frame socket goes away while its gRPC server stays: the
// idle connection is found closed before anything is written to it, the dial
// fails, and the calls go on the ForwardStream (exact, nothing lost). When
// the shard opens a new frame socket (a restart on the same gRPC address
// would), the backend asks GetShardInfo where it is and goes back to frames.
TEST_F(ExpertServiceTest, FramesFallBackToGrpcAndFindARestartedFrameSocket) {
  auto framed = StartFramedShard(*dir_, {4});
  ASSERT_NE(framed, nullptr);
  RemoteExpertOptions options;
  options.max_reconnect_backoff_ms = 100;
  auto backend = ConnectReplacing(4, {framed->address()}, options);
  ASSERT_TRUE(backend.ok()) << backend.status();
  LocalExpertBackend local(local_store_);
  const auto run_and_check = [&](uint32_t seed) {
    LayerInput want = MakeLayerInput(seed);
    LayerInput got = MakeLayerInput(seed);
    ASSERT_TRUE(local.RunLayer(1, want.batches).ok());
    const absl::Status s = (*backend)->RunLayer(1, got.batches);
    ASSERT_TRUE(s.ok()) << s;
    for (size_t b = 0; b < 8; ++b) EXPECT_EQ(MaxAbsDiff(got.outputs[b], want.outputs[b]), 0.0);
  };
  run_and_check(170);
  EXPECT_EQ(framed->frames->requests_read(), 1u);
  EXPECT_EQ(framed->observed->streams.load(), 0);

  framed->StopFrames();
  run_and_check(171);
  run_and_check(172);
  EXPECT_EQ(framed->frames->requests_read(), 1u);
  EXPECT_EQ(framed->observed->streams.load(), 1);

  ASSERT_TRUE(framed->ServeFrames().ok());  // a new port and token
  // Once the backoff has passed, a layer dials again, finds the old socket
  // gone, asks GetShardInfo and uses the new one; the next reuses its connection.
  int layers = 0;
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (framed->frames->requests_read() == 0 && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(150));  // past the backoff
    run_and_check(173 + layers++);
  }
  std::printf("[ refound  ] new frame socket on port %u after %d layer(s)\n",
              framed->frames->endpoint().port, layers);
  ASSERT_EQ(framed->frames->requests_read(), 1u);
  run_and_check(200);
  EXPECT_EQ(framed->frames->requests_read(), 2u);
  EXPECT_EQ(framed->frames->connections_accepted(), 1u);
}

// The frame socket speaks only frames: a client that sends garbage, or a
// frame over the size limit, loses its connection; the server keeps serving
// others; a refused batch is answered in its result like on a stream.
TEST_F(ExpertServiceTest, AFrameSocketRefusesGarbageAndKeepsServing) {
  auto shard = StartFramedShard(*dir_, {3});
  ASSERT_NE(shard, nullptr);
  const FrameEndpoint endpoint = shard->frames->endpoint();
  const std::string address = absl::StrCat("127.0.0.1:", endpoint.port);
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  std::string greeting;
  {
    auto socket = rpc::DialFrames(address, deadline);
    ASSERT_TRUE(socket.ok()) << socket.status();
    ASSERT_TRUE(rpc::ReadFrame(*socket, 1024, deadline, &greeting).ok());
    EXPECT_EQ(greeting, endpoint.token);
    ASSERT_EQ(send(socket->fd(), "GET / HTTP/1.1\r\n\r\n", 18, MSG_NOSIGNAL), 18);
    std::string reply;
    const absl::Status s = rpc::ReadFrame(*socket, 1024, deadline, &reply);
    EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  }
  // A well-formed request for an expert it does not hold, then one it does.
  auto socket = rpc::DialFrames(address, deadline);
  ASSERT_TRUE(socket.ok()) << socket.status();
  ASSERT_TRUE(rpc::ReadFrame(*socket, 1024, deadline, &greeting).ok());
  const std::vector<float> x = RandomRows(3, 190);
  v1::ForwardStreamRequest request;
  request.set_id(41);
  for (int expert : {5, 3}) {
    v1::ForwardRequest* batch = request.add_batches();
    batch->set_layer(1);
    batch->set_expert(expert);
    rpc::EncodeMatrix(x.data(), 3, kD, v1::DTYPE_F32, batch->mutable_hidden_states());
  }
  ASSERT_TRUE(rpc::WriteMessageFrame(*socket, request, deadline).ok());
  v1::ForwardStreamResponse response;
  const absl::Status read = rpc::ReadMessageFrame(*socket, 1 << 20, deadline, &response);
  ASSERT_TRUE(read.ok()) << read;
  EXPECT_EQ(response.id(), 41u);
  ASSERT_EQ(response.results_size(), 2);
  EXPECT_EQ(response.results(0).code(), static_cast<int>(absl::StatusCode::kNotFound));
  EXPECT_THAT(response.results(0).error_message(), HasSubstr("not held"));
  ExpectLayer1Expert3(response.results(1), x);
  EXPECT_EQ(shard->frames->connections_accepted(), 2u);
}

// A batch whose shape says 1000 rows but whose data holds 3 is refused by
// name, and the batch beside it is answered exactly: the shard's buffers
// start uninitialised, and the refused batch's rows are never computed or
// sent.
TEST_F(ExpertServiceTest, ABatchWhoseDataDoesNotFillItsShapeIsRefusedAlone) {
  auto shard = StartFramedShard(*dir_, {3});
  ASSERT_NE(shard, nullptr);
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  auto socket = DialGreeted(*shard, deadline);
  ASSERT_TRUE(socket.ok()) << socket.status();
  const std::vector<float> x = RandomRows(3, 191);
  v1::ForwardStreamRequest request;
  request.set_id(7);
  for (int b = 0; b < 2; ++b) {
    v1::ForwardRequest* batch = request.add_batches();
    batch->set_layer(1);
    batch->set_expert(3);
    rpc::EncodeMatrix(x.data(), 3, kD, v1::DTYPE_F32, batch->mutable_hidden_states());
  }
  request.mutable_batches(0)->mutable_hidden_states()->set_shape(0, 1000);
  ASSERT_TRUE(rpc::WriteMessageFrame(*socket, request, deadline).ok());
  v1::ForwardStreamResponse response;
  const absl::Status read = rpc::ReadMessageFrame(*socket, 1 << 20, deadline, &response);
  ASSERT_TRUE(read.ok()) << read;
  ASSERT_EQ(response.results_size(), 2);
  EXPECT_EQ(response.results(0).code(), static_cast<int>(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(response.results(0).error_message(), HasSubstr("data bytes"));
  ExpectLayer1Expert3(response.results(1), x);
}

// EndStreams (what switchyard-expert runs before its graceful stop) ends an
// idle stream at once, so the server's shutdown does not wait out its grace
// period for it; the gateway then gets UNAVAILABLE and can go elsewhere.
TEST_F(ExpertServiceTest, EndStreamsLetsAGracefulStopFinishEarly) {
  auto s = StartCountedShard(*dir_, {4});
  ASSERT_NE(s, nullptr);
  auto backend = ConnectReplacing(4, {s->address()});
  ASSERT_TRUE(backend.ok()) << backend.status();
  LayerInput got = MakeLayerInput(90);
  ASSERT_TRUE((*backend)->RunLayer(0, got.batches).ok());
  s->service->EndStreams();
  const auto start = std::chrono::steady_clock::now();
  s->server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(20));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("[ end      ] graceful stop took %.3f s (grace 20 s)\n", seconds);
  EXPECT_LT(seconds, 10.0);
  s->server.reset();
  LayerInput after = MakeLayerInput(91);
  std::vector<absl::Status> batch_status;
  ASSERT_TRUE((*backend)->RunLayerPerBatch(0, after.batches, &batch_status).ok());
  EXPECT_EQ(batch_status[4].code(), absl::StatusCode::kUnavailable) << batch_status[4];
}

// ExpertProcess: what switchyard-expert runs, in-process -----------------------

TEST(ExpertProcessTest, ServesItsShardWithMetricsAndStopsCleanly) {
  ExpertProcessOptions options;
  options.model_dir = testing::TinyMixtralDir();
  options.listen = "127.0.0.1:0";
  options.experts = "3,5";
  options.layers = "1:2";
  options.metrics_listen = "127.0.0.1:0";
  options.frame_spin_us = 150;
  auto process = ExpertProcess::Start(options);
  ASSERT_TRUE(process.ok()) << process.status();
  EXPECT_EQ((*process)->experts(), (std::vector<int>{3, 5}));
  EXPECT_EQ((*process)->layers(), std::make_pair(1, 2));
  EXPECT_THAT((*process)->summary(), HasSubstr("loaded experts [3,5] layers [1, 2)"));
  EXPECT_THAT((*process)->summary(), HasSubstr("plaintext"));

  v1::ShardInfo info;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  ASSERT_TRUE(StubFor((*process)->address())->GetShardInfo(&ctx, {}, &info).ok());
  EXPECT_EQ(info.backend(), "cpu-f32");
  EXPECT_THAT(info.experts(), ::testing::ElementsAre(3, 5));
  EXPECT_EQ(info.layer_begin(), 1u);
  EXPECT_EQ(info.layer_end(), 2u);
  // A frame socket on the gRPC host, with a free port, named in ShardInfo.
  const FrameEndpoint frames = (*process)->frame_endpoint();
  EXPECT_GT(frames.port, 0u);
  EXPECT_EQ(info.frame_port(), frames.port);
  EXPECT_EQ(info.frame_token(), frames.token);
  EXPECT_EQ(frames.token.size(), 32u);
  EXPECT_THAT((*process)->summary(),
              HasSubstr(absl::StrCat("frames on port ", frames.port, " (polling 150 us)")));
  EXPECT_THAT(testing::HttpGetBody((*process)->metrics_address(), "/metrics"),
              HasSubstr("switchyard_build_info"));

  (*process)->Shutdown(absl::Seconds(1));
  (*process)->Shutdown(absl::Seconds(1));  // idempotent
  grpc::ClientContext after;
  after.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(2));
  EXPECT_FALSE(StubFor((*process)->address())->GetShardInfo(&after, {}, &info).ok());
  EXPECT_EQ(rpc::DialFrames(absl::StrCat("127.0.0.1:", frames.port), absl::Now() + absl::Seconds(2))
                .status()
                .code(),
            absl::StatusCode::kUnavailable);
}

// The frame socket: beside a unix gRPC socket it is PATH.frames; "off" and
// TLS leave it out (ShardInfo then names none, so gateways use gRPC).
TEST(ExpertProcessTest, FrameSocketFollowsTheListenAddressAndCanBeOff) {
  const std::string path =
      (std::filesystem::temp_directory_path() / absl::StrCat("sy-expert-", getpid(), ".sock"))
          .string();
  ExpertProcessOptions options;
  options.model_dir = testing::TinyMixtralDir();
  options.listen = "unix:" + path;
  options.experts = "1";
  {
    auto process = ExpertProcess::Start(options);
    ASSERT_TRUE(process.ok()) << process.status();
    EXPECT_EQ((*process)->frame_endpoint().unix_path, path + ".frames");
    EXPECT_EQ((*process)->frame_endpoint().port, 0u);
    EXPECT_TRUE(std::filesystem::exists(path + ".frames"));
    (*process)->Shutdown(absl::Seconds(1));
    EXPECT_FALSE(std::filesystem::exists(path + ".frames"));
  }
  options.listen = "127.0.0.1:0";
  options.frame_listen = "off";
  {
    auto process = ExpertProcess::Start(options);
    ASSERT_TRUE(process.ok()) << process.status();
    EXPECT_EQ((*process)->frame_endpoint().port, 0u);
    EXPECT_THAT((*process)->summary(), HasSubstr("no frame socket"));
    v1::ShardInfo info;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    ASSERT_TRUE(StubFor((*process)->address())->GetShardInfo(&ctx, {}, &info).ok());
    EXPECT_EQ(info.frame_port(), 0u);
    EXPECT_EQ(info.frame_token(), "");
  }
}

TEST(ExpertProcessTest, BadOptionsAreRefusedNamingTheFlag) {
  struct Case {
    std::function<void(ExpertProcessOptions&)> change;
    std::string message;
  };
  const std::vector<Case> cases = {
      {[](auto& o) { o.experts = "9"; }, "--experts: expert 9 out of range"},
      {[](auto& o) { o.experts = "1,1"; }, "--experts: expert 1 listed twice"},
      {[](auto& o) { o.experts = "x"; }, "--experts: 'x' is not an expert index"},
      {[](auto& o) { o.layers = "1:1"; }, "--layers: [1, 1) is not a non-empty range"},
      {[](auto& o) { o.layers = "0-2"; }, "--layers: expected B:E"},
      {[](auto& o) { o.workers = 0; }, "--workers must be in [1, 256]"},
      {[](auto& o) { o.tls.cert_file = "c.pem"; }, "--tls-cert and --tls-key go together"},
      {[](auto& o) { o.tls.ca_file = "ca.pem"; }, "--tls-client-ca needs TLS"},
      {[](auto& o) { o.device = "tpu"; }, "--device tpu: expected cpu or cuda"},
      {[](auto& o) { o.precision = "bf16"; }, "--precision bf16: the CPU computes in f32"},
      {[](auto& o) { o.model_dir = "/nonexistent-model"; }, "/nonexistent-model"},
      {[](auto& o) { o.frame_listen = "nowhere"; }, "--frame-listen: frame address 'nowhere'"},
      {[](auto& o) { o.frame_spin_us = -1; }, "--frame-spin-us must be in [0, 100000]"},
      {[](auto& o) { o.frame_version = 3; }, "--frame-version must be in [1, 2]"},
  };
  for (const Case& c : cases) {
    ExpertProcessOptions options;
    options.model_dir = testing::TinyMixtralDir();
    options.listen = "127.0.0.1:0";
    c.change(options);
    auto process = ExpertProcess::Start(options);
    ASSERT_FALSE(process.ok()) << c.message;
    EXPECT_THAT(std::string(process.status().message()), HasSubstr(c.message));
  }
}

// Topology parsing -----------------------------------------------------------

TEST(ExpertTopologyTest, ParsesSpecs) {
  auto t = ParseExpertTopology(
      " 0=127.0.0.1:5001|127.0.0.1:5002 ; 1=unix:/tmp/e1.sock;2=dns:///e2.ns.svc:50061;", 3);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_THAT(t->replicas.at(0), ::testing::ElementsAre("127.0.0.1:5001", "127.0.0.1:5002"));
  EXPECT_THAT(t->replicas.at(1), ::testing::ElementsAre("unix:/tmp/e1.sock"));
  EXPECT_THAT(t->replicas.at(2), ::testing::ElementsAre("dns:///e2.ns.svc:50061"));
  EXPECT_EQ(FormatExpertTopology(*t),
            "0=127.0.0.1:5001|127.0.0.1:5002;1=unix:/tmp/e1.sock;2=dns:///e2.ns.svc:50061");
  auto round_trip = ParseExpertTopology(FormatExpertTopology(*t), 3);
  ASSERT_TRUE(round_trip.ok());
  EXPECT_EQ(round_trip->replicas, t->replicas);
}

TEST(ExpertTopologyTest, RejectsBadSpecsNamingTheEntry) {
  struct Case {
    const char* spec;
    const char* message;
  };
  for (const Case& c : std::vector<Case>{
           {"0=a:1;1=b:1", "no replica given for expert 2"},
           {"0=a:1", "no replica given for experts 1, 2"},
           {"0=a:1;1=b:1;2=c:1;3=d:1", "expert 3 is out of range"},
           {"0=a:1;1=b:1;x=c:1", "'x' is not an expert index"},
           {"0=a:1;1=b:1;2", "entry '2' is not EXPERT=TARGET"},
           {"0=a:1;1=b:1;2=c:1|", "entry '2=c:1|' has an empty replica target"},
           {"0=a:1;1=b:1;1=c:1", "expert 1 is mapped twice"},
           {"", "no replica given for experts 0, 1, 2"},
       }) {
    auto t = ParseExpertTopology(c.spec, 3);
    ASSERT_FALSE(t.ok()) << c.spec;
    EXPECT_EQ(t.status().code(), absl::StatusCode::kInvalidArgument) << c.spec;
    EXPECT_THAT(std::string(t.status().message()), HasSubstr(c.message)) << c.spec;
  }
}

TEST(ExpertTopologyTest, ParsesJsonFiles) {
  const std::string path = ::testing::TempDir() + "/topology_" + std::to_string(getpid()) + ".json";
  {
    std::ofstream out(path);
    out << R"({"experts": {"0": ["127.0.0.1:5001", "127.0.0.1:5002"],
                           "1": ["dns:///expert-1.ns.svc:50061"], "2": "unix:/tmp/e2.sock"}})";
  }
  auto t = ParseExpertTopologyFile(path, 3);
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_THAT(t->replicas.at(0), ::testing::ElementsAre("127.0.0.1:5001", "127.0.0.1:5002"));
  EXPECT_THAT(t->replicas.at(1), ::testing::ElementsAre("dns:///expert-1.ns.svc:50061"));
  EXPECT_THAT(t->replicas.at(2), ::testing::ElementsAre("unix:/tmp/e2.sock"));
  auto loaded = LoadExpertTopology(path, 3);
  ASSERT_TRUE(loaded.ok());
  EXPECT_EQ(loaded->replicas, t->replicas);

  auto missing = ParseExpertTopologyFile(path, 4);
  ASSERT_FALSE(missing.ok());
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr(path));
  EXPECT_THAT(std::string(missing.status().message()), HasSubstr("expert 3"));
  {
    std::ofstream out(path);
    out << R"({"experts": {"0": [1]}})";
  }
  EXPECT_THAT(std::string(ParseExpertTopologyFile(path, 1).status().message()),
              HasSubstr("strings"));
  {
    std::ofstream out(path);
    out << "not json";
  }
  EXPECT_EQ(ParseExpertTopologyFile(path, 1).status().code(), absl::StatusCode::kInvalidArgument);
  std::remove(path.c_str());
  EXPECT_EQ(ParseExpertTopologyFile(path, 1).status().code(), absl::StatusCode::kNotFound);
}

// The watcher starts from the bytes the gateway's topology came from, not
// from a read of its own: a file rewritten between the two (up's autoscaler
// adding a replica while a gateway starts) is applied at the first poll.
TEST(ExpertTopologyTest, AFileChangedBeforeTheWatcherStartsIsApplied) {
  const std::string path = ::testing::TempDir() + "/watched_" + std::to_string(getpid()) + ".json";
  const auto write = [&](const std::string& text) {
    std::ofstream out(path);
    out << text;
  };
  write(R"({"experts": {"0": "127.0.0.1:5001"}})");
  std::string content;
  auto started = ParseExpertTopologyFile(path, 1, &content);
  ASSERT_TRUE(started.ok()) << started.status();
  EXPECT_EQ(content, R"({"experts": {"0": "127.0.0.1:5001"}})");
  write(R"({"experts": {"0": ["127.0.0.1:5001", "127.0.0.1:5002"]}})");

  std::vector<ExpertTopology> applied;
  ExpertTopologyFileWatcher watcher(path, content, 1, /*backend=*/nullptr, /*poll_ms=*/3600 * 1000,
                                    nullptr,
                                    [&](const ExpertTopology& t) -> absl::StatusOr<std::string> {
                                      applied.push_back(t);
                                      return std::string("expert 0: +127.0.0.1:5002");
                                    });
  EXPECT_TRUE(watcher.PollOnce());
  ASSERT_EQ(applied.size(), 1u);
  EXPECT_THAT(applied[0].replicas.at(0),
              ::testing::ElementsAre("127.0.0.1:5001", "127.0.0.1:5002"));
  EXPECT_FALSE(watcher.PollOnce()) << "the same bytes again are no change";
  EXPECT_EQ(watcher.applied(), 1);
  std::remove(path.c_str());
}

// Weight fingerprints ----------------------------------------------------------

TEST(ExpertWeightsFingerprintTest, StableDistinctAndIndependentOfSharding) {
  const std::string dir = testing::TinyMixtralDir();
  auto fp3 = ExpertWeightsFingerprint(dir, 3);
  ASSERT_TRUE(fp3.ok()) << fp3.status();
  EXPECT_EQ(fp3->size(), 16u);
  EXPECT_EQ(ExpertWeightsFingerprint(dir, 3).value_or("error"), *fp3);
  EXPECT_NE(ExpertWeightsFingerprint(dir, 4).value_or(*fp3), *fp3);
  EXPECT_EQ(ExpertWeightsFingerprint(dir, 8).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_FALSE(ExpertWeightsFingerprint(dir + "/nope", 0).ok());

  const std::string tmp = ::testing::TempDir() + "/fingerprint_test_" + std::to_string(getpid());
  std::filesystem::remove_all(tmp);
  MakeModelOptions whole{.preset = "tiny", .out_dir = tmp + "/whole", .seed = 3, .threads = 1};
  MakeModelOptions sharded = whole;
  sharded.out_dir = tmp + "/sharded";
  sharded.shard_bytes = 1 << 20;
  MakeModelOptions f32 = whole;
  f32.out_dir = tmp + "/f32";
  f32.dtype = DType::kF32;
  ASSERT_TRUE(MakeModel(whole).ok());
  ASSERT_TRUE(MakeModel(sharded).ok());
  ASSERT_TRUE(MakeModel(f32).ok());
  auto w = ExpertWeightsFingerprint(tmp + "/whole", 5);
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ(ExpertWeightsFingerprint(tmp + "/sharded", 5).value_or("error"), *w);
  const std::string f32_fp = ExpertWeightsFingerprint(tmp + "/f32", 5).value_or("error");
  EXPECT_NE(f32_fp, *w);
  EXPECT_NE(f32_fp, "error");
  EXPECT_NE(ExpertWeightsFingerprint(dir, 5).value_or("error"), *w);  // other seed
  std::filesystem::remove_all(tmp);
}

// A replica removed while a layer is in flight on it finishes that layer
// (drained, not cut off); later layers go to its successor only.
TEST_F(ExpertServiceTest, ARemovedReplicaFinishesTheLayerInFlightOnIt) {
  auto old_replica = StartCountedShard(*dir_, {4});
  ASSERT_NE(old_replica, nullptr);
  auto successor = StartCountedShard(*dir_, {4});
  ASSERT_NE(successor, nullptr);
  auto backend = ConnectReplacing(4, {old_replica->address()});
  ASSERT_TRUE(backend.ok()) << backend.status();
  LocalExpertBackend local(local_store_);
  const auto check = [&](uint32_t seed, const std::vector<absl::Status>& status,
                         const LayerInput& got) {
    LayerInput want = MakeLayerInput(seed);
    ASSERT_TRUE(local.RunLayer(0, want.batches).ok());
    ASSERT_EQ(status.size(), 8u);
    for (size_t b = 0; b < 8; ++b) {
      EXPECT_TRUE(status[b].ok()) << b << ": " << status[b];
      EXPECT_EQ(MaxAbsDiff(got.outputs[b], want.outputs[b]), 0.0) << b;
    }
  };
  {  // the stream to the old replica is open on this thread
    LayerInput got = MakeLayerInput(80);
    std::vector<absl::Status> status;
    ASSERT_TRUE((*backend)->RunLayerPerBatch(0, got.batches, &status).ok());
    check(80, status, got);
  }
  old_replica->recording->delay_ms = 300;
  LayerInput got = MakeLayerInput(81);
  std::vector<absl::Status> status;
  absl::Status layer_status;
  std::thread runner([&] { layer_status = (*backend)->RunLayerPerBatch(0, got.batches, &status); });
  const ExpertCounters* counters = old_replica->service->counters(0, 4);
  const auto give_up = std::chrono::steady_clock::now() + std::chrono::seconds(20);
  while (counters->in_flight.load() == 0 && std::chrono::steady_clock::now() < give_up) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  ASSERT_EQ(counters->in_flight.load(), 1);
  ExpertTopology topology = OnePerExpertTopology();
  topology.replicas[4] = {successor->address()};
  absl::StatusOr<std::string> changed = (*backend)->ApplyTopology(topology);
  ASSERT_TRUE(changed.ok()) << changed.status();
  EXPECT_THAT(*changed, HasSubstr("-" + old_replica->address()));
  runner.join();
  ASSERT_TRUE(layer_status.ok()) << layer_status;
  check(81, status, got);
  const uint64_t old_calls = counters->calls.load();
  EXPECT_EQ(old_calls, 2u);
  // Later layers never touch the removed replica again.
  for (uint32_t seed = 82; seed < 85; ++seed) {
    LayerInput next = MakeLayerInput(seed);
    std::vector<absl::Status> next_status;
    ASSERT_TRUE((*backend)->RunLayerPerBatch(0, next.batches, &next_status).ok());
    check(seed, next_status, next);
  }
  EXPECT_EQ(counters->calls.load(), old_calls);
  EXPECT_EQ(successor->service->counters(0, 4)->calls.load(), 3u);
  // Gone now: nothing of it is still in use.
  old_replica->Kill();
  LayerInput last = MakeLayerInput(85);
  std::vector<absl::Status> last_status;
  ASSERT_TRUE((*backend)->RunLayerPerBatch(0, last.batches, &last_status).ok());
  check(85, last_status, last);
}

// A resolver whose answers the test sets: name -> targets, or an error.
struct FakeDns {
  std::mutex mu;
  std::map<std::string, absl::StatusOr<std::vector<std::string>>> answers;  // guarded by mu
  std::vector<std::string> asked;                                           // "host:port"
  void Set(const std::string& name, absl::StatusOr<std::vector<std::string>> answer) {
    std::lock_guard<std::mutex> lock(mu);
    answers.insert_or_assign(name, std::move(answer));
  }
  ExpertTargetResolver resolver() {
    return [this](const std::string& host, int port) -> absl::StatusOr<std::vector<std::string>> {
      std::lock_guard<std::mutex> lock(mu);
      asked.push_back(absl::StrCat(host, ":", port));
      auto it = answers.find(host);
      if (it == answers.end()) return absl::UnavailableError("Name or service not known");
      return it->second;
    };
  }
};

TEST(ExpertDnsTest, NamesBecomeTheirSortedAddressesAndOtherTargetsStay) {
  FakeDns dns;
  dns.Set("experts.ns.svc", std::vector<std::string>{"10.0.0.9:50061", "10.0.0.2:50061"});
  dns.Set("other.ns.svc", std::vector<std::string>{"10.0.0.2:50061", "[fd00::5]:50061"});
  ExpertTopology configured;
  configured.replicas[0] = {"dns:///experts.ns.svc:50061"};
  configured.replicas[1] = {"dns:///experts.ns.svc:50061", "dns:///other.ns.svc:50061"};
  // Not the gateway's to resolve: a plain address, unix, a name with its own
  // DNS server, a name without a port, an ipv4: list.
  configured.replicas[2] = {"10.0.0.7:50061", "unix:/run/e2.sock", "dns://8.8.8.8/x.svc:1",
                            "dns:///noport.svc", "ipv4:10.0.0.1:1,10.0.0.2:1"};
  const DnsExpansion e = ExpandDnsTargets(configured, dns.resolver(), {});
  EXPECT_EQ(e.topology.replicas.at(0),
            (std::vector<std::string>{"10.0.0.2:50061", "10.0.0.9:50061"}));
  // An address two names share is one replica.
  EXPECT_EQ(e.topology.replicas.at(1),
            (std::vector<std::string>{"10.0.0.2:50061", "10.0.0.9:50061", "[fd00::5]:50061"}));
  EXPECT_EQ(e.topology.replicas.at(2), configured.replicas.at(2));
  EXPECT_TRUE(e.problems.empty()) << absl::StrJoin(e.problems, "; ");
  EXPECT_EQ(e.addresses.size(), 2u);
  // With TLS each address must show a certificate for its name; the shared
  // one for the first name that has it.
  EXPECT_EQ(e.topology.tls_names,
            (std::map<std::string, std::string>{{"10.0.0.2:50061", "experts.ns.svc"},
                                                {"10.0.0.9:50061", "experts.ns.svc"},
                                                {"[fd00::5]:50061", "other.ns.svc"}}));
  // Each name is resolved once, with its port.
  EXPECT_EQ(dns.asked, (std::vector<std::string>{"experts.ns.svc:50061", "other.ns.svc:50061"}));
  EXPECT_TRUE(IsExpandableDnsTarget("dns:///experts.ns.svc:50061"));
  EXPECT_TRUE(IsExpandableDnsTarget("dns:///[fd00::5]:50061"));
  EXPECT_FALSE(IsExpandableDnsTarget("dns:///noport.svc"));
  EXPECT_FALSE(IsExpandableDnsTarget("dns:///:50061"));
  EXPECT_FALSE(IsExpandableDnsTarget("dns://8.8.8.8/x.svc:1"));
}

TEST(ExpertDnsTest, ANameThatStopsResolvingKeepsItsAddressesAndANewOneIsLeftToGrpc) {
  FakeDns dns;
  dns.Set("experts.ns.svc", std::vector<std::string>{"10.0.0.2:50061", "10.0.0.3:50061"});
  ExpertTopology configured;
  configured.replicas[0] = {"dns:///experts.ns.svc:50061"};
  configured.replicas[1] = {"dns:///fresh.ns.svc:50061"};
  const DnsExpansion first = ExpandDnsTargets(configured, dns.resolver(), {});
  // Never resolved: stays a name (gRPC resolves it and keeps trying).
  EXPECT_EQ(first.topology.replicas.at(1), configured.replicas.at(1));
  ASSERT_EQ(first.problems.size(), 1u);
  EXPECT_EQ(first.problems[0],
            "dns:///fresh.ns.svc:50061: Name or service not known (left to gRPC)");

  dns.Set("experts.ns.svc", absl::UnavailableError("Temporary failure in name resolution"));
  dns.Set("fresh.ns.svc", std::vector<std::string>{});  // an empty answer resolves nothing
  const DnsExpansion second = ExpandDnsTargets(configured, dns.resolver(), first.addresses);
  EXPECT_EQ(second.topology.replicas.at(0), first.topology.replicas.at(0));
  EXPECT_EQ(second.addresses, first.addresses);
  EXPECT_EQ(second.problems,
            (std::vector<std::string>{"dns:///experts.ns.svc:50061: Temporary failure in name "
                                      "resolution (keeping its 2 addresses)",
                                      "dns:///fresh.ns.svc:50061: no address (left to gRPC)"}));
}

// Every expert mapped to one dns:/// name whose addresses are two framed
// shards (a Kubernetes headless Service over two pods): each address is a
// replica of its own on frames, and the refresher follows the answers.
TEST_F(ExpertServiceTest, ADnsNameBecomesAFramedReplicaPerAddressAndFollowsTheAnswers) {
  auto a = StartFramedShard(*dir_, AllExperts());
  auto b = StartFramedShard(*dir_, AllExperts());
  ASSERT_NE(a, nullptr);
  ASSERT_NE(b, nullptr);
  FakeDns dns;
  std::vector<std::string> both = {a->address(), b->address()};
  std::sort(both.begin(), both.end());
  dns.Set("experts.test", both);
  ExpertTopology configured;
  for (int e : AllExperts()) configured.replicas[e] = {"dns:///experts.test:50061"};
  DnsExpansion expansion = ExpandDnsTargets(configured, dns.resolver(), {});
  RemoteExpertOptions options;
  options.connect_timeout_ms = 1500;  // what a refused pod costs a refresh
  auto connected = RemoteExpertBackend::Connect(expansion.topology, config(), *dir_, options);
  ASSERT_TRUE(connected.ok()) << connected.status();
  RemoteExpertBackend& backend = **connected;
  EXPECT_THAT(backend.Describe(), HasSubstr("frames"));
  for (int e : AllExperts()) EXPECT_EQ(backend.topology().replicas.at(e), both);
  int gauge_updates = 0;
  ExpertDnsRefresher refresher(configured, std::move(expansion), &backend,
                               /*refresh_ms=*/24 * 3600 * 1000, dns.resolver(),
                               [&](const ExpertTopology&) { ++gauge_updates; });

  LocalExpertBackend local(local_store_);
  auto run_layers = [&](uint32_t seed, int n) {
    for (int i = 0; i < n; ++i) {
      LayerInput want = MakeLayerInput(seed + i);
      LayerInput got = MakeLayerInput(seed + i);
      ASSERT_TRUE(local.RunLayer(i % 2, want.batches).ok());
      const absl::Status s = backend.RunLayer(i % 2, got.batches);
      ASSERT_TRUE(s.ok()) << s;
      for (size_t k = 0; k < want.outputs.size(); ++k) {
        EXPECT_EQ(MaxAbsDiff(got.outputs[k], want.outputs[k]), 0.0);
      }
    }
  };
  run_layers(8100, 8);
  EXPECT_GT(a->frames->requests_read(), 0u);
  EXPECT_GT(b->frames->requests_read(), 0u);
  EXPECT_EQ(a->observed->unary_calls.load() + b->observed->unary_calls.load(), 0);
  EXPECT_EQ(a->observed->streams.load() + b->observed->streams.load(), 0);

  // Nothing changed: nothing applied.
  EXPECT_FALSE(refresher.RefreshOnce());
  // Pod a leaves the answers: it is drained and gets no new call.
  dns.Set("experts.test", std::vector<std::string>{b->address()});
  EXPECT_TRUE(refresher.RefreshOnce());
  for (int e : AllExperts()) {
    EXPECT_EQ(backend.topology().replicas.at(e), std::vector<std::string>{b->address()});
  }
  const uint64_t a_before = a->frames->requests_read();
  run_layers(8200, 4);
  EXPECT_EQ(a->frames->requests_read(), a_before);
  // The name stops resolving: b stays.
  dns.Set("experts.test", absl::UnavailableError("Temporary failure in name resolution"));
  EXPECT_FALSE(refresher.RefreshOnce());
  EXPECT_EQ(backend.topology().replicas.at(3), std::vector<std::string>{b->address()});
  run_layers(8300, 2);
  // A pod that does not answer is refused as a whole; the replicas stay.
  dns.Set("experts.test",
          std::vector<std::string>{b->address(),
                                   "unix:/tmp/switchyard-no-such-pod-" + std::to_string(getpid())});
  EXPECT_FALSE(refresher.RefreshOnce());
  EXPECT_EQ(refresher.refused(), 1);
  EXPECT_EQ(backend.topology().replicas.at(3), std::vector<std::string>{b->address()});
  // Pod a back: it is checked, then takes calls again.
  dns.Set("experts.test", both);
  EXPECT_TRUE(refresher.RefreshOnce());
  run_layers(8400, 8);
  EXPECT_GT(a->frames->requests_read(), a_before);
  // A reloaded configuration (the --experts file) goes through the refresher.
  ExpertTopology reloaded = configured;
  reloaded.replicas[0] = {a->address()};
  absl::StatusOr<std::string> changed = refresher.SetConfigured(reloaded);
  ASSERT_TRUE(changed.ok()) << changed.status();
  EXPECT_THAT(*changed, HasSubstr("expert 0: -" + b->address()));
  EXPECT_EQ(backend.topology().replicas.at(0), std::vector<std::string>{a->address()});
  EXPECT_EQ(backend.topology().replicas.at(1), both);
  EXPECT_EQ(refresher.applied(), 3);
  EXPECT_EQ(gauge_updates, 3);
}

}  // namespace
}  // namespace switchyard
