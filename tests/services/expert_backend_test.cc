// LocalExpertBackend::RunLayer on OpenMP teams of every size: whole experts
// per thread, or (with more threads than experts) the experts' output rows
// split over the team, must give the bits of a one-thread run.
#include "expert_service/expert_backend.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "core/checkpoint.h"
#include "core/cpu_ops.h"
#include "core/dtype.h"
#include "core/safetensors.h"
#include "core/tensor_names.h"
#include "expert_service/expert_ffn.h"
#include "gtest/gtest.h"
#include "tests/test_util.h"

namespace switchyard {
namespace {

// Awkward shapes: D = 136 and F = 232 are multiples of 8 but not of 16 or 32
// (the vector kernels' tails), 2F = 464 and D = 136 rows split into uneven
// 8-row groups.
constexpr int kHidden = 136;
constexpr int kFfn = 232;
constexpr int kExperts = 8;

// Writes a one-layer checkpoint of only expert weights, stored as `dtype`
// (kBF16 or kF32), into a fresh folder; returns the folder.
std::string WriteExpertCheckpoint(DType dtype) {
  const std::string dir = testing::MakeTempDir();
  std::string config = testing::ReadAll(testing::TinyMixtralDir() + "/config.json");
  config =
      absl::StrReplaceAll(config, {{"\"hidden_size\": 64", "\"hidden_size\": 136"},
                                   {"\"intermediate_size\": 128", "\"intermediate_size\": 232"},
                                   {"\"num_hidden_layers\": 2", "\"num_hidden_layers\": 1"}});
  testing::WriteAll(dir + "/config.json", config);
  std::vector<std::vector<uint8_t>> bytes;
  std::vector<SafetensorsTensor> tensors;
  uint32_t seed = 1;
  for (int e = 0; e < kExperts; ++e) {
    for (const char* which : {"w1", "w2", "w3"}) {
      const bool down = std::strcmp(which, "w2") == 0;
      const int64_t rows = down ? kHidden : kFfn, cols = down ? kFfn : kHidden;
      std::vector<float> w(static_cast<size_t>(rows * cols));
      for (float& v : w) {
        seed = seed * 1664525u + 1013904223u;
        v = (static_cast<float>(seed >> 8) / 16777216.0f - 0.5f) * 0.3f;
      }
      std::vector<uint8_t> b;
      if (dtype == DType::kBF16) {
        std::vector<uint16_t> bits(w.size());
        for (size_t i = 0; i < w.size(); ++i) bits[i] = F32ToBf16(w[i]);
        b.resize(bits.size() * 2);
        std::memcpy(b.data(), bits.data(), b.size());
      } else {
        b.resize(w.size() * 4);
        std::memcpy(b.data(), w.data(), b.size());
      }
      bytes.push_back(std::move(b));
      tensors.push_back({names::Expert(0, e, which), dtype, {rows, cols}, {}});
    }
  }
  for (size_t i = 0; i < tensors.size(); ++i) tensors[i].bytes = bytes[i];
  const absl::Status s = WriteSafetensors(dir + "/model.safetensors", tensors);
  EXPECT_TRUE(s.ok()) << s;
  return dir;
}

std::unique_ptr<ExpertStore> LoadStore(const std::string& dir) {
  auto checkpoint = Checkpoint::Open(dir, WeightSelection::ExpertsOnly({0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_TRUE(checkpoint.ok()) << checkpoint.status();
  if (!checkpoint.ok()) return nullptr;
  auto store = ExpertStore::Load(**checkpoint);
  EXPECT_TRUE(store.ok()) << store.status();
  return store.ok() ? *std::move(store) : nullptr;
}

// The kernel levels this CPU runs, capped by SWITCHYARD_CPU_ISA as the
// process started (the level in force when the test begins).
std::vector<cpu::CpuIsa> Levels(cpu::CpuIsa cap) {
  std::vector<cpu::CpuIsa> out;
  for (cpu::CpuIsa isa : {cpu::CpuIsa::kScalar, cpu::CpuIsa::kAvx2, cpu::CpuIsa::kAvx512,
                          cpu::CpuIsa::kAvx512Bf16, cpu::CpuIsa::kAmx}) {
    if (isa <= cap) out.push_back(isa);
  }
  return out;
}

class ExpertBackendTeamTest : public ::testing::Test {
 protected:
  void SetUp() override {
    isa_ = cpu::ActiveIsa();
    precision_ = cpu::ActivePrecision();
    threads_ = omp_get_max_threads();
  }
  void TearDown() override {
    cpu::SetIsa(isa_);
    cpu::SetPrecision(precision_);
    omp_set_num_threads(threads_);
  }
  cpu::CpuIsa isa_ = cpu::CpuIsa::kScalar;
  cpu::MatmulPrecision precision_ = cpu::MatmulPrecision::kF32;
  int threads_ = 1;
};

// Teams of 1..16 threads (2 and 3 experts on 3+ threads split rows; 8
// experts on fewer threads take whole experts), 1, 2, 3 and 8 experts with
// unequal token counts around the 16-token kernel chunks (past 16 FP32
// weights, and BF16 ones below AVX-512, take the BLAS GEMM whole), BF16
// weights in both precisions and FP32 weights, at every level up to the one
// in force (SWITCHYARD_CPU_ISA caps it): the outputs equal the one-thread
// run bit for bit.
TEST_F(ExpertBackendTeamTest, EveryTeamSizeGivesTheOneThreadBits) {
  struct Model {
    const char* name;
    DType dtype;
    std::unique_ptr<ExpertStore> store;
  };
  std::vector<Model> models;
  models.push_back({"bf16 weights", DType::kBF16, LoadStore(WriteExpertCheckpoint(DType::kBF16))});
  models.push_back({"f32 weights", DType::kF32, LoadStore(WriteExpertCheckpoint(DType::kF32))});
  for (const Model& m : models) ASSERT_NE(m.store, nullptr) << m.name;

  const int teams[] = {1, 2, 3, 4, 5, 8, 16};
  const int expert_counts[] = {1, 2, 3, 8};
  const int token_counts[] = {1, 2, 7, 17, 33};
  std::printf("%-12s %-12s %-5s %14s %8s\n", "weights", "level", "prec", "max |diff|", "cases");
  for (const Model& m : models) {
    LocalExpertBackend backend(m.store.get());
    for (cpu::CpuIsa isa : Levels(isa_)) {
      ASSERT_EQ(cpu::SetIsa(isa), isa);
      for (cpu::MatmulPrecision precision :
           {cpu::MatmulPrecision::kF32, cpu::MatmulPrecision::kBf16}) {
        const bool bf16 = precision == cpu::MatmulPrecision::kBf16;
        if (bf16 && m.dtype == DType::kF32) continue;  // FP32 matrices run in FP32 anyway
        cpu::SetPrecision(precision);
        double worst = 0;
        int cases = 0;
        for (int count : expert_counts) {
          for (int tokens : token_counts) {
            // Expert j gets `tokens` rows, every other one fewer, so that the
            // token counts (and the shares of the team) differ.
            std::vector<int> rows(count);
            for (int j = 0; j < count; ++j) rows[j] = j % 2 == 0 ? tokens : 1 + (tokens * j) % 5;
            std::vector<std::vector<float>> inputs(count);
            for (int j = 0; j < count; ++j) {
              inputs[j].resize(static_cast<size_t>(rows[j]) * kHidden);
              for (size_t i = 0; i < inputs[j].size(); ++i) {
                inputs[j][i] = std::sin(0.37f * static_cast<float>(i) + 1.3f * j) * 1.5f;
              }
            }
            auto run = [&](int team) {
              omp_set_num_threads(team);
              std::vector<std::vector<float>> outputs(count);
              std::vector<ExpertBatch> batches(count);
              for (int j = 0; j < count; ++j) {
                outputs[j].assign(static_cast<size_t>(rows[j]) * kHidden, -9.0f);
                // Experts 7, 5, 3, ...: not in index order.
                batches[j] = {(kExperts - 1 - 2 * j + kExperts) % kExperts, rows[j],
                              inputs[j].data(), outputs[j].data()};
              }
              const absl::Status s = backend.RunLayer(0, batches);
              EXPECT_TRUE(s.ok()) << s;
              return outputs;
            };
            const auto reference = run(1);
            for (int j = 0; j < count; ++j) {  // every output written
              ASSERT_EQ(std::count(reference[j].begin(), reference[j].end(), -9.0f), 0);
            }
            for (int team : teams) {
              const auto out = run(team);
              ++cases;
              for (int j = 0; j < count; ++j) {
                double diff = 0;
                for (size_t i = 0; i < out[j].size(); ++i) {
                  diff = std::max(diff, std::abs(static_cast<double>(out[j][i]) - reference[j][i]));
                }
                worst = std::max(worst, diff);
                EXPECT_EQ(0, std::memcmp(out[j].data(), reference[j].data(),
                                         out[j].size() * sizeof(float)))
                    << m.name << " " << cpu::CpuIsaName(isa) << (bf16 ? " bf16" : " f32")
                    << " team " << team << " experts " << count << " tokens " << tokens
                    << " expert " << j << " max |diff| " << diff;
              }
            }
          }
        }
        std::printf("%-12s %-12s %-5s %14.3g %8d\n", m.name, cpu::CpuIsaName(isa),
                    bf16 ? "bf16" : "f32", worst, cases);
      }
    }
  }
}

}  // namespace
}  // namespace switchyard
