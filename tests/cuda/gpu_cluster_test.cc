// The split cluster on one GPU: eight switchyard-expert processes with
// --device cuda (one expert each) behind a gateway with --device cuda give
// the same greedy tokens as the gateway with its experts in-process on the
// GPU, and, in FP32, as Hugging Face. Skips without a CUDA device.
#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>
#include <vector>

#include "cuda/device.h"
#include "gateway/gateway_server.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "switchyard/v1/expert.grpc.pb.h"
#include "switchyard/v1/generation.grpc.pb.h"
#include "tests/cuda/cuda_test_util.h"
#include "tests/process_util.h"
#include "tests/test_util.h"

namespace switchyard {
namespace {

constexpr int kExperts = 8;

class GpuClusterTest : public ::testing::Test {
 protected:
  struct Cluster {
    std::vector<std::unique_ptr<testing::ChildProcess>> experts;
    std::vector<std::string> expert_addresses;
    std::unique_ptr<Gateway> split;  // --device cuda, experts in the processes above
    std::unique_ptr<Gateway> local;  // --device cuda, experts in-process on the GPU
  };

  void SetUp() override {
    SY_SKIP_WITHOUT_GPU();
    if (cluster_ != nullptr) return;
    auto c = std::make_unique<Cluster>();
    std::string spec;
    for (int e = 0; e < kExperts; ++e) {
      c->experts.push_back(std::make_unique<testing::ChildProcess>());
      auto address = c->experts.back()->Start({testing::BinaryDir() + "/switchyard-expert",
                                               "--model", testing::TinyMixtralDir(), "--experts",
                                               std::to_string(e), "--listen", "127.0.0.1:0",
                                               "--device", "cuda", "--precision", "f32"});
      ASSERT_TRUE(address.ok()) << address.status();
      c->expert_addresses.push_back(*address);
      spec += std::to_string(e) + "=" + *address + ";";
    }
    GatewayOptions options;
    options.model_dir = testing::TinyMixtralDir();
    options.listen = "127.0.0.1:0";
    options.device = "cuda";
    options.precision = "f32";
    options.kv_cache_tokens = 4096;
    options.experts = spec;
    auto split = Gateway::Start(options);
    ASSERT_TRUE(split.ok()) << split.status();
    c->split = *std::move(split);
    options.experts = "local";
    auto local = Gateway::Start(options);
    ASSERT_TRUE(local.ok()) << local.status();
    c->local = *std::move(local);
    cluster_ = c.release();
  }
  static void TearDownTestSuite() {
    if (cluster_ == nullptr) return;
    cluster_->split.reset();
    cluster_->local.reset();
    for (auto& e : cluster_->experts) EXPECT_EQ(e->Kill(SIGTERM), 0) << "expert did not exit 0";
    delete cluster_;
    cluster_ = nullptr;
  }

  static std::vector<int32_t> Greedy(Gateway* gateway, const v1::GenerateRequest& request) {
    auto stub = v1::GenerationService::NewStub(
        grpc::CreateChannel(gateway->address(), grpc::InsecureChannelCredentials()));
    v1::GenerateResponse response;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    grpc::Status status = stub->Generate(&ctx, request, &response);
    EXPECT_TRUE(status.ok()) << status.error_message();
    return {response.token_ids().begin(), response.token_ids().end()};
  }

  static Cluster* cluster_;
};

GpuClusterTest::Cluster* GpuClusterTest::cluster_ = nullptr;

TEST_F(GpuClusterTest, ExpertsReportTheirGpuBackend) {
  for (const std::string& address : cluster_->expert_addresses) {
    auto stub = v1::ExpertService::NewStub(
        grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
    v1::ShardInfo info;
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    ASSERT_TRUE(stub->GetShardInfo(&ctx, v1::GetShardInfoRequest(), &info).ok()) << address;
    EXPECT_EQ(info.backend(), "cuda-f32") << address;
  }
}

TEST_F(GpuClusterTest, SplitEqualsInProcessGpuEqualsHuggingFaceInFp32) {
  const nlohmann::json reference =
      nlohmann::json::parse(testing::ReadAll(testing::TinyMixtralDir() + "/reference.json"));
  int prompt = 0;
  for (const auto& p : reference["prompts"]) {
    v1::GenerateRequest request;
    request.mutable_token_ids()->mutable_ids()->Add(p["input_ids"].begin(), p["input_ids"].end());
    request.mutable_stopping()->set_max_new_tokens(24);
    request.mutable_stopping()->set_ignore_eos(true);
    const std::vector<int32_t> split = Greedy(cluster_->split.get(), request);
    const std::vector<int32_t> local = Greedy(cluster_->local.get(), request);
    EXPECT_EQ(split, local) << "prompt " << prompt;
    EXPECT_EQ(split, p["greedy_new_ids"].get<std::vector<int32_t>>()) << "prompt " << prompt;
    ++prompt;
  }
  EXPECT_GT(prompt, 0);
}

}  // namespace
}  // namespace switchyard
