// switchyard-expert's ExpertProcess with --device cuda, on the CPU emulator
// of the CUDA backend (cuda/emulator/): the process's CUDA branch
// (precision, CudaExpertBackend, the backend name it reports) and the GPU
// backend behind the ExpertService's worker threads, called over real gRPC
// through the gateway's RemoteExpertBackend, against the CPU experts.
// On a GPU machine gpu_cluster_test covers the same with real processes.
#include <grpcpp/grpcpp.h>

#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/checkpoint.h"
#include "expert_service/expert_backend.h"
#include "expert_service/expert_ffn.h"
#include "expert_service/expert_process.h"
#include "gateway/remote_expert_backend.h"
#include "gtest/gtest.h"
#include "switchyard/v1/expert.grpc.pb.h"
#include "tests/test_util.h"
#include "tests/tolerances.h"

namespace switchyard {
namespace {

TEST(EmulatedExpertProcessTest, CudaShardOverGrpcComputesWhatTheCpuExpertsCompute) {
  const std::string dir = testing::TinyMixtralDir();
  auto config = LoadModelConfig(dir);
  ASSERT_TRUE(config.ok()) << config.status();
  const int D = config->hidden_size, E = config->num_local_experts;
  auto checkpoint = Checkpoint::Open(dir, WeightSelection::ExpertsOnly({0, 1, 2, 3, 4, 5, 6, 7}));
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  auto store = ExpertStore::Load(**checkpoint);
  ASSERT_TRUE(store.ok()) << store.status();
  LocalExpertBackend cpu(store->get());

  // Rows for experts 0 (5 tokens), 3 (1 token) and 7 (2 tokens).
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
  const std::vector<std::pair<int, int>> shape = {{0, 5}, {3, 1}, {7, 2}};
  std::vector<std::vector<float>> inputs;
  for (auto [e, n] : shape) {
    inputs.emplace_back(static_cast<size_t>(n) * D);
    for (float& v : inputs.back()) v = dist(rng);
  }
  auto run = [&](ExpertBackend& backend, int layer) {
    std::vector<std::vector<float>> outputs;
    std::vector<ExpertBatch> batches;
    for (size_t i = 0; i < shape.size(); ++i) outputs.emplace_back(inputs[i].size(), 0.0f);
    for (size_t i = 0; i < shape.size(); ++i) {
      batches.push_back({shape[i].first, shape[i].second, inputs[i].data(), outputs[i].data()});
    }
    const absl::Status s = backend.RunLayer(layer, batches);
    EXPECT_TRUE(s.ok()) << s;
    return outputs;
  };

  for (const std::string precision : {"f32", "bf16"}) {
    SCOPED_TRACE("--precision " + precision);
    ExpertProcessOptions options;
    options.model_dir = dir;
    options.listen = "127.0.0.1:0";
    options.experts = "0,1,2,3,4,5,6,7";
    options.device = "cuda";
    options.precision = precision;
    auto process = ExpertProcess::Start(options);
    ASSERT_TRUE(process.ok()) << process.status();
    {  // What the shard says it computes on.
      auto stub = v1::ExpertService::NewStub(
          grpc::CreateChannel((*process)->address(), grpc::InsecureChannelCredentials()));
      grpc::ClientContext ctx;
      v1::ShardInfo info;
      const grpc::Status s = stub->GetShardInfo(&ctx, v1::GetShardInfoRequest(), &info);
      ASSERT_TRUE(s.ok()) << s.error_message();
      EXPECT_EQ(info.backend(), "cuda-" + precision);
    }

    std::string spec;
    for (int e = 0; e < E; ++e) absl::StrAppend(&spec, e, "=", (*process)->address(), ";");
    auto topology = ParseExpertTopology(spec, E);
    ASSERT_TRUE(topology.ok()) << topology.status();
    RemoteExpertOptions remote_options;
    remote_options.connect_timeout_ms = 10000;
    auto remote = RemoteExpertBackend::Connect(*topology, *config, dir, remote_options);
    ASSERT_TRUE(remote.ok()) << remote.status();

    for (int layer = 0; layer < config->num_hidden_layers; ++layer) {
      const auto want = run(cpu, layer);
      const auto got = run(**remote, layer);
      for (size_t i = 0; i < shape.size(); ++i) {
        const std::string what = absl::StrCat(precision, " layer ", layer, " expert ",
                                              shape[i].first, " over gRPC vs cpu");
        if (precision == "f32") {
          EXPECT_TRUE(testing::AllClose(got[i], want[i], tolerance::kReorderAbs,
                                        tolerance::kReorderRel, what));
        } else {
          // BF16 weights and activations against the FP32 experts.
          EXPECT_TRUE(testing::AllClose(got[i], want[i], tolerance::kGpuBf16ExpertVsF32Abs,
                                        tolerance::kGpuBf16ExpertVsF32Rel, what));
        }
      }
    }
    (*remote).reset();
    (*process)->Shutdown(absl::Seconds(5));
  }
}

}  // namespace
}  // namespace switchyard
