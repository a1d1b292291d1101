// Micro-batch ping-pong in the CPU runner (gateway/model_runner.h,
// --micro-batches): the same requests with 1 micro-batch and with 2, 3 and
// auto give bit-for-bit the same logits and tokens, with local experts and
// with remote experts behind real in-process gRPC expert servers; the calls
// of two micro-batches are in flight at once; a failed expert still ends
// only the sequences routed to it.
//
// The workload's last step has 26 tokens, more than a split step may have
// (gateway/step_runner.h) unless every product is row-count invariant: with
// the kernels capped at AVX2 (micro_batch_test_avx2), its products take the
// BLAS GEMM, and splitting it anyway gave last-position logits up to 8.6e-6
// off (measured with the rule disabled), so that run checks that the rule
// keeps such steps whole; on AMX (BF16 tiles for any row count) such steps,
// and prefill chunks of 17, 33 and 100 tokens, split with the same bits.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <future>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/checkpoint.h"
#include "core/cpu_ops.h"
#include "expert_service/expert_backend.h"
#include "expert_service/expert_server.h"
#include "gateway/local_model.h"
#include "gateway/model_runner.h"
#include "gateway/remote_expert_backend.h"
#include "gtest/gtest.h"
#include "rpc/server.h"
#include "tests/per_batch_backend.h"
#include "tests/test_util.h"

namespace switchyard {
namespace {

// Passes every call to `inner`, counting the calls and how many are in
// flight at once; optionally sleeps in each call (a slow network) or fails
// every batch of one expert (as a dead remote expert after its retries).
class WatchedBackend final : public ExpertBackend {
 public:
  explicit WatchedBackend(ExpertBackend* inner) : inner_(inner) {}
  absl::Status RunLayer(int layer, absl::Span<const ExpertBatch> batches) override {
    return testing::RunLayerThroughPerBatch(*this, layer, batches);
  }
  absl::Status RunLayerPerBatch(int layer, absl::Span<const ExpertBatch> batches,
                                std::vector<absl::Status>* batch_status) override {
    const int now = ++in_flight_;
    int seen = max_in_flight_.load();
    while (now > seen && !max_in_flight_.compare_exchange_weak(seen, now)) {
    }
    ++calls_;
    if (delay_ms_ > 0) std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms_));
    std::vector<ExpertBatch> healthy;
    std::vector<size_t> healthy_index;
    batch_status->assign(batches.size(), absl::OkStatus());
    for (size_t i = 0; i < batches.size(); ++i) {
      if (batches[i].expert == failing_) {
        (*batch_status)[i] = absl::UnavailableError(
            absl::StrCat("expert ", failing_, " (layer ", layer, ") unavailable: test"));
        continue;
      }
      healthy.push_back(batches[i]);
      healthy_index.push_back(i);
    }
    std::vector<absl::Status> inner_status;
    absl::Status s = inner_->RunLayerPerBatch(layer, healthy, &inner_status);
    for (size_t j = 0; j < inner_status.size() && j < healthy_index.size(); ++j) {
      (*batch_status)[healthy_index[j]] = inner_status[j];
    }
    --in_flight_;
    return s;
  }
  std::string Describe() const override { return "watched " + inner_->Describe(); }
  bool RowsIndependentOfCount() const override { return inner_->RowsIndependentOfCount(); }

  void set_delay_ms(int ms) { delay_ms_ = ms; }
  void set_failing(int expert) { failing_ = expert; }
  int calls() const { return calls_; }
  int max_in_flight() const { return max_in_flight_; }
  void Reset() {
    calls_ = 0;
    max_in_flight_ = 0;
  }

 private:
  ExpertBackend* inner_;
  int delay_ms_ = 0;
  int failing_ = -1;
  std::atomic<int> calls_{0}, in_flight_{0}, max_in_flight_{0};
};

// An expert shard served over real gRPC on loopback.
struct Shard {
  std::unique_ptr<ExpertStore> store;
  std::unique_ptr<LocalExpertBackend> backend;
  std::unique_ptr<ExpertServiceImpl> service;
  std::unique_ptr<rpc::RunningServer> server;
  ~Shard() {
    if (server) server->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
    server.reset();
    if (service) service->Shutdown();
  }
};

// Everything a run of the workload produces, in order.
struct Transcript {
  std::vector<float> logits;
  std::vector<int32_t> tokens;
  std::vector<int> expert_calls;  // per step
};

class MicroBatchTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    LocalModelOptions options;
    options.kv_cache_tokens = 8192;
    auto model = LocalModel::Load(testing::TinyMixtralDir(), options);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = model->release();
    // Two shards of four experts each.
    std::vector<std::string> spec;
    for (int s = 0; s < 2; ++s) {
      std::vector<int> experts = {4 * s, 4 * s + 1, 4 * s + 2, 4 * s + 3};
      auto ckpt =
          Checkpoint::Open(testing::TinyMixtralDir(), WeightSelection::ExpertsOnly(experts));
      ASSERT_TRUE(ckpt.ok()) << ckpt.status();
      auto shard = std::make_unique<Shard>();
      auto store = ExpertStore::Load(**ckpt);
      ASSERT_TRUE(store.ok()) << store.status();
      shard->store = *std::move(store);
      auto description = DescribeShard(testing::TinyMixtralDir(), **ckpt);
      ASSERT_TRUE(description.ok()) << description.status();
      shard->backend = std::make_unique<LocalExpertBackend>(shard->store.get());
      shard->service =
          std::make_unique<ExpertServiceImpl>(shard->store->config(), shard->backend.get(),
                                              *description, ExpertServerOptions{.workers = 2});
      rpc::ServerOptions server_options;
      server_options.listen_address = "127.0.0.1:0";
      auto server = rpc::RunningServer::Start(server_options, {shard->service.get()});
      ASSERT_TRUE(server.ok()) << server.status();
      shard->server = *std::move(server);
      for (int e : experts) spec.push_back(absl::StrCat(e, "=", shard->server->address()));
      shards_.push_back(shard.release());
    }
    auto topology = ParseExpertTopology(absl::StrJoin(spec, ";"), 8);
    ASSERT_TRUE(topology.ok()) << topology.status();
    RemoteExpertOptions remote;
    remote.connect_timeout_ms = 10000;
    auto backend = RemoteExpertBackend::Connect(*topology, model_->config(),
                                                testing::TinyMixtralDir(), remote);
    ASSERT_TRUE(backend.ok()) << backend.status();
    remote_ = backend->release();
  }
  static void TearDownTestSuite() {
    delete remote_;
    for (Shard* s : shards_) delete s;
    shards_.clear();
    delete model_;
  }

  static ExpertBackend* local() { return local_backend_.get(); }

  // Greedy decoding of six sequences with ModelRunner(max_micro_batches):
  // a prefill step of 13 tokens, four decode steps of 6, then a step that
  // adds two 10-token prompts to the decodes (26 tokens: one micro-batch).
  static Transcript Run(ExpertBackend* experts, int max_micro_batches, WatchedBackend* watch) {
    Transcript t;
    ModelRunner runner(&model_->attention(), experts, nullptr, max_micro_batches);
    const int V = model_->config().vocab_size;
    const std::vector<int> lengths = {2, 3, 2, 1, 3, 2};
    std::vector<std::vector<int32_t>> ids;
    std::vector<std::unique_ptr<SequenceKv>> kvs;
    for (size_t i = 0; i < lengths.size(); ++i) {
      ids.push_back(Prompt(static_cast<int>(i), lengths[i]));
      kvs.push_back(model_->kv_pool().NewSequence());
    }
    std::vector<int32_t> next(ids.size());
    for (int step = 0; step < 6; ++step) {
      std::vector<StepInput> inputs;
      for (size_t i = 0; i < ids.size(); ++i) {
        if (step == 0) {
          inputs.push_back({kvs[i].get(), ids[i], LogitsWanted::kLast});
        } else {
          inputs.push_back({kvs[i].get(), absl::MakeConstSpan(&next[i], 1), LogitsWanted::kLast});
        }
      }
      std::vector<std::vector<int32_t>> extra;
      std::vector<std::unique_ptr<SequenceKv>> extra_kvs;
      if (step == 5) {
        for (int j = 0; j < 2; ++j) {
          extra.push_back(Prompt(20 + j, 10));
          extra_kvs.push_back(model_->kv_pool().NewSequence());
        }
        for (int j = 0; j < 2; ++j) {
          inputs.push_back({extra_kvs[j].get(), extra[j], LogitsWanted::kLast});
        }
      }
      if (watch != nullptr) watch->Reset();
      auto out = runner.Step(inputs);
      EXPECT_TRUE(out.ok()) << out.status();
      if (!out.ok()) return t;
      EXPECT_TRUE(out->sequence_status.empty());
      t.logits.insert(t.logits.end(), out->logits.begin(), out->logits.end());
      t.expert_calls.push_back(watch != nullptr ? watch->calls() : 0);
      for (size_t i = 0; i < ids.size(); ++i) {
        const float* row = out->logits.data() + static_cast<size_t>(out->logits_row_begin[i]) * V;
        next[i] = static_cast<int32_t>(std::max_element(row, row + V) - row);
        t.tokens.push_back(next[i]);
      }
    }
    return t;
  }

  // Prefill chunks: for each step size S of 17, 33 and 100 tokens, new
  // sequences whose prompts add up to S, then a second chunk of the same
  // lengths for the same sequences (positions past the first chunk), all
  // logits wanted.
  static Transcript RunPrefillChunks(ExpertBackend* experts, int max_micro_batches,
                                     WatchedBackend* watch) {
    Transcript t;
    ModelRunner runner(&model_->attention(), experts, nullptr, max_micro_batches);
    const std::vector<std::vector<int>> steps = {{9, 8}, {11, 11, 11}, {40, 25, 20, 15}};
    for (size_t s = 0; s < steps.size(); ++s) {
      std::vector<std::unique_ptr<SequenceKv>> kvs;
      for (size_t i = 0; i < steps[s].size(); ++i) kvs.push_back(model_->kv_pool().NewSequence());
      for (int chunk = 0; chunk < 2; ++chunk) {
        std::vector<std::vector<int32_t>> ids;
        std::vector<StepInput> inputs;
        for (size_t i = 0; i < steps[s].size(); ++i) {
          ids.push_back(Prompt(static_cast<int>(100 * s + 10 * chunk + i), steps[s][i]));
        }
        for (size_t i = 0; i < steps[s].size(); ++i) {
          inputs.push_back({kvs[i].get(), ids[i], LogitsWanted::kAll});
        }
        watch->Reset();
        auto out = runner.Step(inputs);
        EXPECT_TRUE(out.ok()) << out.status();
        if (!out.ok()) return t;
        EXPECT_TRUE(out->sequence_status.empty());
        t.logits.insert(t.logits.end(), out->logits.begin(), out->logits.end());
        t.expert_calls.push_back(watch->calls());
      }
    }
    return t;
  }

  // RunPrefillChunks with 2 and 3 micro-batches against 1, local and remote
  // experts: the same bits; every step split (`split`) or none.
  static void ExpectPrefillChunksSameBits(bool split) {
    const int L = model_->config().num_hidden_layers;
    LocalExpertBackend local(&model_->experts());
    for (bool remote : {false, true}) {
      ExpertBackend* inner = remote ? static_cast<ExpertBackend*>(remote_) : &local;
      WatchedBackend watch(inner);
      const std::string where = remote ? "remote experts (gRPC)" : "local experts";
      const Transcript one = RunPrefillChunks(&watch, 1, &watch);
      ASSERT_EQ(one.expert_calls.size(), 6u);
      for (int m : {2, 3}) {
        const Transcript got = RunPrefillChunks(&watch, m, &watch);
        ExpectSameBits(
            got, one,
            absl::StrCat(where, ", steps of 17/33/100 tokens, ", m, " micro-batches vs 1 (",
                         cpu::CpuIsaName(cpu::ActiveIsa()), split ? ", split)" : ", kept whole)"));
        ASSERT_EQ(got.expert_calls.size(), one.expert_calls.size());
        for (size_t s = 0; s < got.expert_calls.size(); ++s) {
          EXPECT_EQ(one.expert_calls[s], L) << where << " step " << s;
          // The 17-token steps have two sequences: at most two micro-batches.
          const int parts = s < 2 ? std::min(m, 2) : m;
          EXPECT_EQ(got.expert_calls[s], split ? L * parts : L) << where << " step " << s;
        }
      }
    }
  }

  static std::vector<int32_t> Prompt(int seed, int length) {
    std::vector<int32_t> p = {1};
    uint32_t x = 777u + 131u * seed;
    while (static_cast<int>(p.size()) < length) {
      x = x * 1664525u + 1013904223u;
      p.push_back(3 + static_cast<int32_t>((x >> 8) % 31990));
    }
    return p;
  }

  // Exact comparison: the max |diff| (printed) must be 0 and the bits equal.
  static void ExpectSameBits(const Transcript& got, const Transcript& want,
                             const std::string& what) {
    ASSERT_EQ(got.logits.size(), want.logits.size()) << what;
    double max_diff = 0;
    for (size_t i = 0; i < got.logits.size(); ++i) {
      max_diff = std::max(max_diff, std::fabs(static_cast<double>(got.logits[i]) - want.logits[i]));
    }
    std::printf("[ micro-batch ] %s: %zu logits, max |diff| %g, tokens %s\n", what.c_str(),
                got.logits.size(), max_diff, got.tokens == want.tokens ? "equal" : "DIFFER");
    EXPECT_EQ(max_diff, 0.0) << what;
    EXPECT_EQ(std::memcmp(got.logits.data(), want.logits.data(), got.logits.size() * sizeof(float)),
              0)
        << what << ": the logits' bits differ";
    EXPECT_EQ(got.tokens, want.tokens) << what;
  }

  static LocalModel* model_;
  static std::vector<Shard*> shards_;
  static RemoteExpertBackend* remote_;
  static std::unique_ptr<LocalExpertBackend> local_backend_;
};

LocalModel* MicroBatchTest::model_ = nullptr;
std::vector<Shard*> MicroBatchTest::shards_;
RemoteExpertBackend* MicroBatchTest::remote_ = nullptr;
std::unique_ptr<LocalExpertBackend> MicroBatchTest::local_backend_;

// A backend with only the synchronous call, for the default
// StartLayerPerBatch: output = input * (expert + 1); every batch of expert
// `failing` fails, and a call for layer `failing_layer` fails as a whole.
// Counts the threads that ran its calls (a thread_local mark, so a new
// thread counts even where the system reuses a finished thread's id) and
// holds each call until `rendezvous` calls are in flight at once (10 s at
// most), so calls that waited behind each other would show.
class SyncOnlyBackend final : public ExpertBackend {
 public:
  SyncOnlyBackend(int rendezvous, int failing, int failing_layer)
      : rendezvous_(rendezvous), failing_(failing), failing_layer_(failing_layer) {}
  ~SyncOnlyBackend() override = default;
  absl::Status RunLayer(int layer, absl::Span<const ExpertBatch> batches) override {
    return testing::RunLayerThroughPerBatch(*this, layer, batches);
  }
  absl::Status RunLayerPerBatch(int layer, absl::Span<const ExpertBatch> batches,
                                std::vector<absl::Status>* batch_status) override {
    thread_local const SyncOnlyBackend* counted_for = nullptr;
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (counted_for != this) {
        counted_for = this;
        ++threads_;
      }
      ++calls_;
      ++arrived_;
      met_.notify_all();
      const int round = (arrived_ - 1) / rendezvous_;  // the calls of one layer
      if (!met_.wait_for(lock, std::chrono::seconds(10),
                         [&] { return arrived_ >= (round + 1) * rendezvous_; })) {
        ++missed_rendezvous_;
      }
    }
    if (layer == failing_layer_) return absl::InvalidArgumentError("test: bad layer");
    batch_status->assign(batches.size(), absl::OkStatus());
    for (size_t i = 0; i < batches.size(); ++i) {
      const ExpertBatch& b = batches[i];
      if (b.expert == failing_) {
        (*batch_status)[i] = absl::UnavailableError(absl::StrCat("expert ", b.expert, " down"));
        continue;
      }
      for (int r = 0; r < b.tokens * kDim; ++r) b.output[r] = b.input[r] * (b.expert + 1);
    }
    return absl::OkStatus();
  }
  std::string Describe() const override { return "sync only (test)"; }

  static constexpr int kDim = 4;
  int threads() const {
    std::lock_guard<std::mutex> lock(mu_);
    return threads_;
  }
  int calls() const {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_;
  }
  int missed_rendezvous() const {
    std::lock_guard<std::mutex> lock(mu_);
    return missed_rendezvous_;
  }

 private:
  const int rendezvous_, failing_, failing_layer_;
  mutable std::mutex mu_;
  std::condition_variable met_;
  int threads_ = 0, calls_ = 0, arrived_ = 0, missed_rendezvous_ = 0;
};

// The default StartLayerPerBatch runs calls on persistent workers: many
// layers x micro-batches take as many threads as calls were in flight at
// once (not one per call), the calls of a layer still run at the same time,
// and a failed batch or call is reported for that batch or call only.
TEST(StartLayerPerBatchTest, PersistentWorkersAndPerBatchFailures) {
  constexpr int kLayers = 40, kMicroBatches = 3, kExperts = 4, kFailing = 2, kFailingLayer = 7;
  constexpr int D = SyncOnlyBackend::kDim;
  SyncOnlyBackend backend(kMicroBatches, kFailing, kFailingLayer);
  EXPECT_EQ(backend.layer_call_threads(), 0);
  for (int layer = 0; layer < kLayers; ++layer) {
    struct MicroBatch {
      std::vector<float> input, output;  // [kExperts * (m + 1) tokens, D]
      std::vector<ExpertBatch> batches;
      std::vector<absl::Status> batch_status;
      std::future<absl::Status> done;
    };
    std::vector<MicroBatch> mbs(kMicroBatches);
    for (int m = 0; m < kMicroBatches; ++m) {
      MicroBatch& mb = mbs[m];
      const int tokens = m + 1;  // per expert
      mb.input.resize(static_cast<size_t>(kExperts) * tokens * D);
      mb.output.assign(mb.input.size(), -1.0f);
      for (size_t i = 0; i < mb.input.size(); ++i) mb.input[i] = layer + 0.25f * i + m;
      for (int e = 0; e < kExperts; ++e) {
        const size_t at = static_cast<size_t>(e) * tokens * D;
        mb.batches.push_back({e, tokens, mb.input.data() + at, mb.output.data() + at});
      }
    }
    for (MicroBatch& mb : mbs) {
      mb.done = backend.StartLayerPerBatch(layer, mb.batches, &mb.batch_status);
    }
    for (int m = 0; m < kMicroBatches; ++m) {
      MicroBatch& mb = mbs[m];
      const absl::Status status = mb.done.get();
      if (layer == kFailingLayer) {
        EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument) << status;
        continue;
      }
      ASSERT_TRUE(status.ok()) << "layer " << layer << " micro-batch " << m << ": " << status;
      ASSERT_EQ(mb.batch_status.size(), mb.batches.size());
      for (size_t i = 0; i < mb.batches.size(); ++i) {
        const ExpertBatch& b = mb.batches[i];
        if (b.expert == kFailing) {
          EXPECT_EQ(mb.batch_status[i].code(), absl::StatusCode::kUnavailable);
          EXPECT_NE(mb.batch_status[i].message().find("expert 2"), std::string::npos);
          continue;
        }
        EXPECT_TRUE(mb.batch_status[i].ok()) << mb.batch_status[i];
        for (int r = 0; r < b.tokens * D; ++r) {
          ASSERT_EQ(b.output[r], b.input[r] * (b.expert + 1)) << "layer " << layer;
        }
      }
    }
  }
  const int threads = backend.layer_call_threads();
  std::printf("%d calls ran on %d threads (workers started: %d)\n", backend.calls(),
              backend.threads(), threads);
  EXPECT_EQ(backend.calls(), kLayers * kMicroBatches);
  EXPECT_EQ(backend.missed_rendezvous(), 0) << "calls of one layer waited behind each other";
  // Each layer's calls wait for each other, so kMicroBatches run at once:
  // that many workers, reused by every layer.
  EXPECT_EQ(threads, kMicroBatches);
  EXPECT_EQ(backend.threads(), kMicroBatches);
}

TEST(MicroBatchSplitTest, WholeSequencesBalancedByTokens) {
  auto slices = [](std::vector<int> tokens) {
    std::vector<SequenceSlice> s;
    int row = 0;
    for (int t : tokens) {
      s.push_back({row, t, 0, nullptr});
      row += t;
    }
    return s;
  };
  EXPECT_EQ(SplitIntoMicroBatches(slices({1, 1, 1, 1}), 4, 2), (std::vector<int>{0, 2, 4}));
  EXPECT_EQ(SplitIntoMicroBatches(slices({1, 1, 1, 1}), 4, 3), (std::vector<int>{0, 2, 3, 4}));
  EXPECT_EQ(SplitIntoMicroBatches(slices({1, 1, 1, 1}), 4, 1), (std::vector<int>{0, 4}));
  EXPECT_EQ(SplitIntoMicroBatches(slices({5}), 5, 2), (std::vector<int>{0, 1}));
  EXPECT_EQ(SplitIntoMicroBatches(slices({1, 1}), 2, 8), (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(SplitIntoMicroBatches(slices({6, 1, 1, 1}), 9, 2), (std::vector<int>{0, 1, 4}));
  EXPECT_EQ(SplitIntoMicroBatches(slices({1, 1, 1, 6}), 9, 3), (std::vector<int>{0, 2, 3, 4}));
  // More tokens than the row-count-invariant CPU products take: one.
  EXPECT_EQ(SplitIntoMicroBatches(slices({10, 10}), 20, 2), (std::vector<int>{0, 2}));
  EXPECT_EQ(SplitIntoMicroBatches(slices({10, 10}), 20, 2, MaxSplitStepTokens(false)),
            (std::vector<int>{0, 2}));
  // Unless they are invariant for any row count.
  EXPECT_EQ(SplitIntoMicroBatches(slices({10, 10}), 20, 2, MaxSplitStepTokens(true)),
            (std::vector<int>{0, 1, 2}));
  EXPECT_EQ(SplitIntoMicroBatches(slices({50, 30, 20}), 100, 2, MaxSplitStepTokens(true)),
            (std::vector<int>{0, 1, 3}));
  EXPECT_EQ(ResolveMicroBatches(0, /*experts_off_host=*/true), 2);
  EXPECT_EQ(ResolveMicroBatches(0, /*experts_off_host=*/false), 1);
  EXPECT_EQ(ResolveMicroBatches(3, /*experts_off_host=*/false), 3);
}

TEST_F(MicroBatchTest, SameBitsAsOneMicroBatchWithLocalAndRemoteExperts) {
  local_backend_ = std::make_unique<LocalExpertBackend>(&model_->experts());
  const int L = model_->config().num_hidden_layers;
  for (bool remote : {false, true}) {
    ExpertBackend* inner = remote ? static_cast<ExpertBackend*>(remote_) : local();
    WatchedBackend watch(inner);
    const std::string where = remote ? "remote experts (gRPC)" : "local experts";
    const Transcript one = Run(&watch, 1, &watch);
    ASSERT_FALSE(one.logits.empty());
    EXPECT_EQ(one.expert_calls[0], L) << "one call per layer with one micro-batch";
    for (int flag : {2, 3, 0}) {
      const int m = ResolveMicroBatches(flag, remote);
      const Transcript got = Run(&watch, m, &watch);
      ExpectSameBits(got, one, absl::StrCat(where, ", --micro-batches ", flag, " (", m, ") vs 1"));
      // The split happened: a call per (layer, micro-batch) in the steps of
      // at most 16 tokens; in the 26-token step only where every product is
      // row-count invariant (else one call per layer).
      ASSERT_EQ(got.expert_calls.size(), one.expert_calls.size());
      EXPECT_EQ(got.expert_calls[0], L * m) << where << " " << m;
      EXPECT_EQ(got.expert_calls[1], L * m) << where << " " << m;
      const bool any_rows =
          model_->attention().RowsIndependentOfCount() && inner->RowsIndependentOfCount();
      EXPECT_EQ(got.expert_calls[5], any_rows ? L * m : L) << where << " " << m;
    }
  }
}

// With slow expert calls, the second micro-batch's calls start while the
// first's are still in flight: the gateway computed its attention meanwhile.
TEST_F(MicroBatchTest, TheExpertCallsOfTwoMicroBatchesOverlap) {
  WatchedBackend watch(remote_);
  watch.set_delay_ms(40);
  ModelRunner runner(&model_->attention(), &watch, nullptr, 2);
  std::vector<std::vector<int32_t>> ids = {Prompt(1, 2), Prompt(2, 2), Prompt(3, 2)};
  std::vector<std::unique_ptr<SequenceKv>> kvs;
  std::vector<StepInput> inputs;
  for (const auto& p : ids) {
    kvs.push_back(model_->kv_pool().NewSequence());
    inputs.push_back({kvs.back().get(), p, LogitsWanted::kLast});
  }
  auto out = runner.Step(inputs);
  ASSERT_TRUE(out.ok()) << out.status();
  std::printf("[ micro-batch ] 40 ms expert calls: at most %d in flight at once\n",
              watch.max_in_flight());
  EXPECT_EQ(watch.max_in_flight(), 2);
}

// A failed expert ends only the sequences routed to it, with overlap on as
// with it off: the same sequences fail, and the survivors' logits and
// caches are the same bits.
TEST_F(MicroBatchTest, AFailedExpertEndsOnlyItsSequencesWithOverlap) {
  const int V = model_->config().vocab_size;
  std::vector<std::vector<int32_t>> ids;
  for (int i = 0; i < 6; ++i) ids.push_back(Prompt(40 + i, 2 + i % 2));
  auto run = [&](int failing, int m, std::vector<std::unique_ptr<SequenceKv>>* kvs) {
    WatchedBackend watch(remote_);
    watch.set_failing(failing);
    ModelRunner runner(&model_->attention(), &watch, nullptr, m);
    std::vector<StepInput> inputs;
    for (const auto& p : ids) {
      kvs->push_back(model_->kv_pool().NewSequence());
      inputs.push_back({kvs->back().get(), p, LogitsWanted::kLast});
    }
    auto out = runner.Step(inputs);
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? *std::move(out) : StepOutput{};
  };
  // An expert that some sequences use and others do not (alone, as in the step).
  int failing = -1, failed = 0;
  for (int e = 0; e < 8 && failing < 0; ++e) {
    std::vector<std::unique_ptr<SequenceKv>> kvs;
    StepOutput out = run(e, 1, &kvs);
    failed = 0;
    for (size_t i = 0; i < ids.size(); ++i) failed += !out.ok(i);
    if (failed > 0 && failed < static_cast<int>(ids.size())) failing = e;
  }
  ASSERT_GE(failing, 0) << "every expert is used by all or none of the sequences";
  std::vector<std::unique_ptr<SequenceKv>> kvs1, kvs2;
  const StepOutput one = run(failing, 1, &kvs1);
  const StepOutput two = run(failing, 2, &kvs2);
  ASSERT_EQ(two.sequence_status.size(), ids.size());
  for (size_t i = 0; i < ids.size(); ++i) {
    EXPECT_EQ(two.sequence_status[i].code(), one.sequence_status[i].code()) << i;
    EXPECT_EQ(kvs2[i]->length(), kvs1[i]->length()) << i;
    if (!one.ok(i)) {
      EXPECT_EQ(two.logits_row_begin[i], -1) << i;
      EXPECT_EQ(kvs2[i]->length(), 0) << "a failed sequence's cache grew";
      continue;
    }
    ASSERT_TRUE(two.ok(i)) << two.sequence_status[i];
    EXPECT_EQ(std::memcmp(two.logits.data() + static_cast<size_t>(two.logits_row_begin[i]) * V,
                          one.logits.data() + static_cast<size_t>(one.logits_row_begin[i]) * V,
                          V * sizeof(float)),
              0)
        << "survivor " << i << " differs with overlap";
  }
  std::printf(
      "[ micro-batch ] expert %d down, 2 micro-batches: %d of %zu sequences ended, the "
      "rest the same bits as 1\n",
      failing, failed, ids.size());
}

// On AMX every product (BF16 tiles) gives a row the same bits for any row
// count, so steps of more than 16 tokens split too, with the same bits.
TEST_F(MicroBatchTest, PrefillChunksSplitWithTheSameBitsOnAmx) {
  if (cpu::ActiveIsa() != cpu::CpuIsa::kAmx) {
    GTEST_SKIP() << "kernel level " << cpu::CpuIsaName(cpu::ActiveIsa()) << ", not amx";
  }
  ASSERT_TRUE(model_->attention().RowsIndependentOfCount());
  ASSERT_TRUE(LocalExpertBackend(&model_->experts()).RowsIndependentOfCount());
  ASSERT_TRUE(remote_->RowsIndependentOfCount()) << "the shards' ShardInfo said otherwise";
  ExpectPrefillChunksSameBits(/*split=*/true);
}

// With FP32 precision below AVX-512, products of more than 16 rows take the
// BLAS GEMM: such steps stay whole (and give the same bits).
TEST_F(MicroBatchTest, PrefillChunksStayWholeWhereProductsDependOnRowCount) {
  const cpu::CpuIsa isa = cpu::ActiveIsa();
  const cpu::MatmulPrecision precision = cpu::ActivePrecision();
  cpu::SetIsa(std::min(cpu::CpuIsa::kAvx2, cpu::DetectedIsa()));
  cpu::SetPrecision(cpu::MatmulPrecision::kF32);
  EXPECT_FALSE(model_->attention().RowsIndependentOfCount());
  EXPECT_FALSE(LocalExpertBackend(&model_->experts()).RowsIndependentOfCount());
  ExpectPrefillChunksSameBits(/*split=*/false);
  cpu::SetIsa(isa);
  cpu::SetPrecision(precision);
}

}  // namespace
}  // namespace switchyard
