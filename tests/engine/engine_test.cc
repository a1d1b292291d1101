// Model runner invariants: cached decode equals recompute, batching does not
// change results, the KV cache budget holds, bad input is refused.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "gateway/generate.h"
#include "gateway/local_model.h"
#include "gtest/gtest.h"
#include "tests/per_batch_backend.h"
#include "tests/test_util.h"
#include "tests/tolerances.h"

namespace switchyard {
namespace {

using testing::AllClose;

class EngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    LocalModelOptions options;
    options.kv_cache_tokens = 4096;
    auto model = LocalModel::Load(testing::TinyMixtralDir(), options);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = model->release();
    bf16_pool_ = new KvCachePool(model_->config(), 4096, /*host_storage=*/true, KvLayout::kPaged,
                                 KvDtype::kBf16);
  }
  static void TearDownTestSuite() {
    delete bf16_pool_;
    delete model_;
  }

  int V() const { return model_->config().vocab_size; }

  // The equivalence tests run on both: FP32 K/V (the model's pool; the
  // suite runs without SWITCHYARD_CPU_PRECISION) and BF16 K/V. Both sides of
  // each comparison read K/V of the same dtype, so the FP32 bound holds.
  static std::vector<KvCachePool*> Pools() { return {&model_->kv_pool(), bf16_pool_}; }

  // Logits of every position of `ids`, computed in one prefill.
  std::vector<float> FullLogits(const std::vector<int32_t>& ids, KvCachePool* pool = nullptr) {
    auto kv = (pool != nullptr ? pool : &model_->kv_pool())->NewSequence();
    StepInput in{kv.get(), ids, LogitsWanted::kAll};
    auto out = model_->runner().Step({&in, 1});
    EXPECT_TRUE(out.ok()) << out.status();
    return out.ok() ? out->logits : std::vector<float>();
  }

  void CachedDecodeEqualsFullRecompute(KvCachePool* pool);
  void ChunkedPrefillEqualsOneShot(KvCachePool* pool);
  void MixedBatchEqualsEachAlone(KvCachePool* pool);
  void PagedEqualsContiguous(KvDtype dtype);

  static LocalModel* model_;
  static KvCachePool* bf16_pool_;
};

LocalModel* EngineTest::model_ = nullptr;
KvCachePool* EngineTest::bf16_pool_ = nullptr;

std::vector<int32_t> Prompt(int seed, int length) {
  std::vector<int32_t> ids = {1};
  uint32_t x = 12345u + 977u * seed;
  while (static_cast<int>(ids.size()) < length) {
    x = x * 1664525u + 1013904223u;
    ids.push_back(3 + static_cast<int32_t>((x >> 8) % 31990));
  }
  return ids;
}

TEST_F(EngineTest, CachedDecodeEqualsFullRecompute) {
  for (KvCachePool* pool : Pools()) {
    SCOPED_TRACE(KvDtypeName(pool->dtype()));
    CachedDecodeEqualsFullRecompute(pool);
  }
}

void EngineTest::CachedDecodeEqualsFullRecompute(KvCachePool* pool) {
  const std::vector<int32_t> ids = Prompt(1, 23);
  const std::vector<float> full = FullLogits(ids, pool);
  // Prefill 7 tokens, then feed the rest one at a time.
  auto kv = pool->NewSequence();
  std::vector<float> incremental;
  StepInput prefill{kv.get(), absl::MakeConstSpan(ids).subspan(0, 7), LogitsWanted::kAll};
  auto out = model_->runner().Step({&prefill, 1});
  ASSERT_TRUE(out.ok()) << out.status();
  incremental = out->logits;
  for (size_t i = 7; i < ids.size(); ++i) {
    StepInput decode{kv.get(), absl::MakeConstSpan(ids).subspan(i, 1), LogitsWanted::kLast};
    out = model_->runner().Step({&decode, 1});
    ASSERT_TRUE(out.ok()) << out.status();
    incremental.insert(incremental.end(), out->logits.begin(), out->logits.end());
  }
  EXPECT_EQ(kv->length(), static_cast<int>(ids.size()));
  EXPECT_TRUE(
      AllClose(incremental, full, tolerance::kReorderAbs, tolerance::kReorderRel,
               absl::StrCat("prefill+decode vs recompute, ", KvDtypeName(pool->dtype()), " K/V")));
}

TEST_F(EngineTest, ChunkedPrefillEqualsOneShot) {
  for (KvCachePool* pool : Pools()) {
    SCOPED_TRACE(KvDtypeName(pool->dtype()));
    ChunkedPrefillEqualsOneShot(pool);
  }
}

void EngineTest::ChunkedPrefillEqualsOneShot(KvCachePool* pool) {
  const std::vector<int32_t> ids = Prompt(2, 33);
  const std::vector<float> full = FullLogits(ids, pool);
  auto kv = pool->NewSequence();
  std::vector<float> chunked;
  for (size_t begin = 0; begin < ids.size(); begin += 10) {
    const size_t n = std::min<size_t>(10, ids.size() - begin);
    StepInput in{kv.get(), absl::MakeConstSpan(ids).subspan(begin, n), LogitsWanted::kAll};
    auto out = model_->runner().Step({&in, 1});
    ASSERT_TRUE(out.ok()) << out.status();
    chunked.insert(chunked.end(), out->logits.begin(), out->logits.end());
  }
  EXPECT_TRUE(
      AllClose(chunked, full, tolerance::kReorderAbs, tolerance::kReorderRel,
               absl::StrCat("chunks of 10 vs one prefill, ", KvDtypeName(pool->dtype()), " K/V")));
}

TEST_F(EngineTest, MixedBatchEqualsEachAlone) {
  for (KvCachePool* pool : Pools()) {
    SCOPED_TRACE(KvDtypeName(pool->dtype()));
    MixedBatchEqualsEachAlone(pool);
  }
}

void EngineTest::MixedBatchEqualsEachAlone(KvCachePool* pool) {
  // Sequence A decodes one token after a 9-token prefill, B prefills 17
  // tokens, C prefills its second chunk of 5 after 4, D is a lone BOS.
  const std::vector<int32_t> a = Prompt(3, 10), b = Prompt(4, 17), c = Prompt(5, 9);
  const std::vector<int32_t> d = {1};
  const std::string tag = absl::StrCat(", ", KvDtypeName(pool->dtype()), " K/V");
  auto kv_a = pool->NewSequence();
  auto kv_b = pool->NewSequence();
  auto kv_c = pool->NewSequence();
  auto kv_d = pool->NewSequence();
  StepInput pre_a{kv_a.get(), absl::MakeConstSpan(a).subspan(0, 9), LogitsWanted::kNone};
  StepInput pre_c{kv_c.get(), absl::MakeConstSpan(c).subspan(0, 4), LogitsWanted::kNone};
  ASSERT_TRUE(model_->runner().Step({&pre_a, 1}).ok());
  ASSERT_TRUE(model_->runner().Step({&pre_c, 1}).ok());

  std::vector<StepInput> batch = {
      {kv_a.get(), absl::MakeConstSpan(a).subspan(9, 1), LogitsWanted::kLast},
      {kv_b.get(), b, LogitsWanted::kAll},
      {kv_c.get(), absl::MakeConstSpan(c).subspan(4, 5), LogitsWanted::kAll},
      {kv_d.get(), d, LogitsWanted::kLast},
  };
  auto out = model_->runner().Step(batch);
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->logits.size(), static_cast<size_t>(1 + 17 + 5 + 1) * V());

  auto rows = [&](int input, int first, int count) {
    return absl::MakeConstSpan(out->logits)
        .subspan(static_cast<size_t>(out->logits_row_begin[input] + first) * V(),
                 static_cast<size_t>(count) * V());
  };
  auto alone = [&](const std::vector<int32_t>& ids, int first, int count) {
    std::vector<float> full = FullLogits(ids, pool);
    return std::vector<float>(full.begin() + static_cast<size_t>(first) * V(),
                              full.begin() + static_cast<size_t>(first + count) * V());
  };
  EXPECT_TRUE(AllClose(rows(0, 0, 1), alone(a, 9, 1), tolerance::kReorderAbs,
                       tolerance::kReorderRel, "A: decode in batch vs alone" + tag));
  EXPECT_TRUE(AllClose(rows(1, 0, 17), alone(b, 0, 17), tolerance::kReorderAbs,
                       tolerance::kReorderRel, "B: prefill in batch vs alone" + tag));
  EXPECT_TRUE(AllClose(rows(2, 0, 5), alone(c, 4, 5), tolerance::kReorderAbs,
                       tolerance::kReorderRel, "C: second chunk in batch vs alone" + tag));
  EXPECT_TRUE(AllClose(rows(3, 0, 1), alone(d, 0, 1), tolerance::kReorderAbs,
                       tolerance::kReorderRel, "D: BOS in batch vs alone" + tag));
}

TEST_F(EngineTest, InvalidTokenIsRefusedBeforeAnyWork) {
  auto kv = model_->kv_pool().NewSequence();
  const std::vector<int32_t> ids = {1, 32000};
  StepInput in{kv.get(), ids, LogitsWanted::kLast};
  auto out = model_->runner().Step({&in, 1});
  ASSERT_FALSE(out.ok());
  EXPECT_EQ(out.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(out.status().message().find("32000"), std::string::npos) << out.status();
  EXPECT_EQ(kv->length(), 0);
  const std::vector<int32_t> negative = {-5};
  StepInput neg{kv.get(), negative, LogitsWanted::kLast};
  EXPECT_EQ(model_->runner().Step({&neg, 1}).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(KvCacheTest, BudgetIsEnforcedAndReturned) {
  ModelConfig config;
  config.num_hidden_layers = 2;
  config.num_key_value_heads = 2;
  config.head_dim = 4;
  KvCachePool pool(config, /*max_tokens=*/64);
  auto a = pool.NewSequence();
  ASSERT_TRUE(a->Reserve(40).ok());
  EXPECT_EQ(a->reserved(), 48);  // whole blocks of 16
  EXPECT_EQ(pool.used_tokens(), 48);
  auto b = pool.NewSequence();
  absl::Status full = b->Reserve(20);
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted) << full;
  EXPECT_EQ(b->reserved(), 0);
  EXPECT_TRUE(b->Reserve(16).ok());
  EXPECT_EQ(pool.live_sequences(), 2);
  a.reset();
  EXPECT_EQ(pool.used_tokens(), 16);
  EXPECT_TRUE(b->Reserve(64).ok());
  b.reset();
  EXPECT_EQ(pool.used_tokens(), 0);
  EXPECT_EQ(pool.live_sequences(), 0);
}

// Blocks come from one pool: a freed block serves the next sequence, the
// table lists them in position order, and the pool reports its size in bytes.
// BF16 K/V take half the bytes of FP32, so a byte budget holds twice the
// tokens; the rows a BF16 pool hands out are 2-byte rows, distinct per
// position and block.
TEST(KvCacheTest, Bf16StorageHalvesTheBytesAndDoublesTheTokensOfABudget) {
  ModelConfig config;
  config.num_hidden_layers = 2;
  config.num_key_value_heads = 2;
  config.head_dim = 4;  // kv_dim 8
  EXPECT_EQ(KvCachePool::BytesPerToken(config, KvDtype::kF32), 2 * 2 * 8 * 4);
  EXPECT_EQ(KvCachePool::BytesPerToken(config, KvDtype::kBf16), 2 * 2 * 8 * 2);
  const int64_t budget = int64_t{1} << 20;
  const int64_t f32 = KvCachePool::TokensForBytes(config, KvDtype::kF32, budget);
  const int64_t bf16 = KvCachePool::TokensForBytes(config, KvDtype::kBf16, budget);
  EXPECT_EQ(f32, 8192);
  EXPECT_EQ(bf16, 2 * f32);
  EXPECT_EQ(KvCachePool::TokensForBytes(config, KvDtype::kF32, 128 * 31), 16);  // whole blocks
  for (KvLayout layout : {KvLayout::kPaged, KvLayout::kContiguous}) {
    KvCachePool pool(config, bf16, /*host_storage=*/true, layout, KvDtype::kBf16);
    EXPECT_EQ(pool.capacity_bytes(), budget);
    auto seq = pool.NewSequence();
    ASSERT_TRUE(seq->Reserve(40).ok());
    EXPECT_EQ(seq->dtype(), KvDtype::kBf16);
    for (int layer = 0; layer < 2; ++layer) {
      for (int pos = 0; pos < 40; ++pos) {
        for (int d = 0; d < 8; ++d) {
          seq->key_bf16(layer, pos)[d] = static_cast<uint16_t>(1000 * layer + 10 * pos + d);
          seq->value_bf16(layer, pos)[d] =
              static_cast<uint16_t>(30000 + 1000 * layer + 10 * pos + d);
        }
      }
    }
    for (int layer = 0; layer < 2; ++layer) {
      for (int pos = 0; pos < 40; ++pos) {
        for (int d = 0; d < 8; ++d) {
          ASSERT_EQ(seq->key_bf16(layer, pos)[d], 1000 * layer + 10 * pos + d);
          ASSERT_EQ(seq->value_bf16(layer, pos)[d], 30000 + 1000 * layer + 10 * pos + d);
        }
      }
    }
  }
}

TEST(KvCacheTest, ByteSizesParseWithUnitsAndBadOnesNameTheFlag) {
  EXPECT_EQ(*ParseByteSize("2GiB", "kv-cache-memory"), int64_t{2} << 30);
  EXPECT_EQ(*ParseByteSize("512MiB", "kv-cache-memory"), int64_t{512} << 20);
  EXPECT_EQ(*ParseByteSize("512 mib", "kv-cache-memory"), int64_t{512} << 20);
  EXPECT_EQ(*ParseByteSize("3KB", "kv-cache-memory"), 3000);
  EXPECT_EQ(*ParseByteSize("1073741824", "kv-cache-memory"), int64_t{1} << 30);
  EXPECT_EQ(*ParseByteSize("7B", "kv-cache-memory"), 7);
  for (const char* bad : {"", "GiB", "-1GiB", "0", "0MiB", "2 GiBs", "1.5GiB", "2XB",
                          "99999999999999999999", "9000000TiB"}) {
    SCOPED_TRACE(bad);
    absl::StatusOr<int64_t> parsed = ParseByteSize(bad, "kv-cache-memory");
    ASSERT_FALSE(parsed.ok());
    EXPECT_EQ(parsed.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StrContains(parsed.status().message(), "--kv-cache-memory"))
        << parsed.status();
  }
  EXPECT_EQ(*ParseKvDtype("bf16"), KvDtype::kBf16);
  EXPECT_EQ(*ParseKvDtype("f32"), KvDtype::kF32);
  EXPECT_EQ(*ParseKvDtype("auto"), DefaultHostKvDtype());
  absl::StatusOr<KvDtype> bad = ParseKvDtype("fp8");
  ASSERT_FALSE(bad.ok());
  EXPECT_TRUE(absl::StrContains(bad.status().message(), "--kv-cache-dtype")) << bad.status();
  absl::StatusOr<int64_t> available = HostMemAvailableBytes();
  ASSERT_TRUE(available.ok()) << available.status();
  EXPECT_GT(*available, 0);
}

TEST(KvCacheTest, BlocksAreReusedThroughTheBlockTable) {
  ModelConfig config;
  config.num_hidden_layers = 2;
  config.num_key_value_heads = 2;
  config.head_dim = 4;
  KvCachePool pool(config, /*max_tokens=*/70);  // 4 whole blocks
  EXPECT_EQ(pool.total_blocks(), 4);
  EXPECT_EQ(pool.bytes_per_token(), 2 * 2 * 8 * 4);
  EXPECT_EQ(pool.capacity_bytes(), 4 * 16 * pool.bytes_per_token());
  auto a = pool.NewSequence(), b = pool.NewSequence();
  ASSERT_TRUE(a->Reserve(1).ok());
  ASSERT_TRUE(b->Reserve(17).ok());
  EXPECT_EQ(pool.free_blocks(), 1);
  a.reset();
  ASSERT_TRUE(b->Reserve(64).ok());  // takes a's freed block and the last free one
  EXPECT_EQ(b->block_table().size(), 4u);
  EXPECT_EQ(pool.free_blocks(), 0);
  EXPECT_EQ(pool.NewSequence()->Reserve(1).code(), absl::StatusCode::kResourceExhausted);
  // Each position's rows are distinct memory, and writes land where reads look.
  for (int pos = 0; pos < 64; ++pos) {
    for (int layer = 0; layer < 2; ++layer) {
      b->key(layer, pos)[0] = static_cast<float>(pos * 10 + layer);
      b->value(layer, pos)[7] = static_cast<float>(-pos * 10 - layer);
    }
  }
  for (int pos = 0; pos < 64; ++pos) {
    for (int layer = 0; layer < 2; ++layer) {
      ASSERT_EQ(b->key(layer, pos)[0], static_cast<float>(pos * 10 + layer)) << pos;
      ASSERT_EQ(b->value(layer, pos)[7], static_cast<float>(-pos * 10 - layer)) << pos;
    }
  }
}

// Published full blocks are shared by a later sequence with the same leading
// tokens, kept cached when no sequence holds them, and evicted when the pool
// needs blocks.
TEST(KvCacheTest, PublishedPrefixBlocksAreSharedCachedAndEvicted) {
  ModelConfig config;
  config.num_hidden_layers = 2;
  config.num_key_value_heads = 2;
  config.head_dim = 4;
  KvCachePool pool(config, /*max_tokens=*/64);  // 4 blocks
  ASSERT_TRUE(pool.prefix_caching());
  std::vector<int32_t> tokens(40);
  for (int i = 0; i < 40; ++i) tokens[i] = 5 + i;
  auto a = pool.NewSequence();
  ASSERT_TRUE(a->Reserve(33).ok());
  a->Commit(33);
  a->Publish(tokens);  // blocks 0 and 1 are full
  const std::vector<int32_t> a_table = a->block_table();
  a.reset();
  EXPECT_EQ(pool.cached_blocks(), 2);
  EXPECT_EQ(pool.free_blocks(), 4);
  EXPECT_EQ(pool.used_tokens(), 0);

  auto b = pool.NewSequence();
  EXPECT_EQ(b->AttachCachedPrefix(tokens), 32);
  EXPECT_EQ(b->length(), 32);
  ASSERT_EQ(b->block_table().size(), 2u);
  EXPECT_EQ(b->block_table()[0], a_table[0]);
  EXPECT_EQ(b->block_table()[1], a_table[1]);
  EXPECT_EQ(pool.cached_blocks(), 0);
  EXPECT_EQ(pool.used_tokens(), 32);
  // A prompt of exactly 32 tokens shares one block: one token must be computed.
  auto exact = pool.NewSequence();
  EXPECT_EQ(exact->AttachCachedPrefix(absl::MakeConstSpan(tokens).subspan(0, 32)), 16);
  exact.reset();
  std::vector<int32_t> other = tokens;
  other[3] = 9999;  // differs in the first block: nothing to share
  EXPECT_EQ(pool.NewSequence()->AttachCachedPrefix(other), 0);
  b.reset();
  EXPECT_EQ(pool.cached_blocks(), 2);

  auto d = pool.NewSequence();
  ASSERT_TRUE(d->Reserve(64).ok());  // needs every block: the cached ones are evicted
  EXPECT_EQ(pool.cached_blocks(), 0);
  d.reset();
  EXPECT_EQ(pool.NewSequence()->AttachCachedPrefix(tokens), 0);
  EXPECT_EQ(pool.used_tokens(), 0);
}

// A pool whose K/V live on a device (host_storage = false) hands out the
// same block ids and shares published prefix blocks the same way (the GPU
// runner's slab is indexed by them), and keeps one backend attachment.
TEST(KvCacheTest, DeviceStoragePoolsShareBlockIdsAndKeepOneAttachment) {
  ModelConfig config;
  config.num_hidden_layers = 2;
  config.num_key_value_heads = 2;
  config.head_dim = 4;
  KvCachePool pool(config, /*max_tokens=*/64, /*host_storage=*/false);
  EXPECT_FALSE(pool.host_storage());
  ASSERT_TRUE(pool.prefix_caching());
  std::vector<int32_t> tokens(40);
  for (int i = 0; i < 40; ++i) tokens[i] = 5 + i;
  auto a = pool.NewSequence();
  EXPECT_EQ(&a->pool(), &pool);
  ASSERT_TRUE(a->Reserve(33).ok());
  a->Commit(33);
  a->Publish(tokens);
  for (int32_t block : a->block_table()) {
    EXPECT_GE(block, 0);
    EXPECT_LT(block, pool.total_blocks());
  }
  auto b = pool.NewSequence();
  EXPECT_EQ(b->AttachCachedPrefix(tokens), 32);
  ASSERT_EQ(b->block_table().size(), 2u);
  EXPECT_EQ(b->block_table()[0], a->block_table()[0]);
  EXPECT_EQ(b->block_table()[1], a->block_table()[1]);
  EXPECT_EQ(pool.used_tokens(), 48);  // a's three blocks, two of them shared with b

  EXPECT_EQ(pool.attachment(), nullptr);
  auto first = std::make_shared<int>(1);
  EXPECT_EQ(pool.SetAttachmentIfUnset(first), first);
  EXPECT_EQ(pool.SetAttachmentIfUnset(std::make_shared<int>(2)), first);
  EXPECT_EQ(pool.attachment(), first);
}

// Paged attention against the contiguous layout (the oracle): several
// sequences in mixed steps, chunks and decodes of awkward lengths that start
// and end inside blocks and cross their boundaries, on a pool whose free
// blocks were shuffled so that every block table jumps around the slab. The
// arithmetic is the same in the same order, only the addresses differ, so
// the logits must be bitwise equal (tolerance 0).
TEST_F(EngineTest, PagedAttentionEqualsTheContiguousOracleOnAwkwardLengths) {
  PagedEqualsContiguous(KvDtype::kF32);
}

// The same with K/V stored as BF16 on both sides: still bitwise equal.
TEST_F(EngineTest, PagedBf16AttentionEqualsTheContiguousBf16Oracle) {
  PagedEqualsContiguous(KvDtype::kBf16);
}

void EngineTest::PagedEqualsContiguous(KvDtype dtype) {
  const ModelConfig& c = model_->config();
  KvCachePool oracle_pool(c, 4096, /*host_storage=*/true, KvLayout::kContiguous, dtype);
  KvCachePool paged_pool(c, 4096, /*host_storage=*/true, KvLayout::kPaged, dtype);
  {
    // Fragment the paged pool: hold every block, free them in a scrambled order.
    std::vector<std::unique_ptr<SequenceKv>> holders;
    for (int i = 0; i < paged_pool.total_blocks(); ++i) {
      holders.push_back(paged_pool.NewSequence());
      ASSERT_TRUE(holders.back()->Reserve(1).ok());
    }
    for (size_t i = 0; i < holders.size(); ++i) holders[(i * 37) % holders.size()].reset();
  }
  ASSERT_EQ(paged_pool.used_tokens(), 0);

  constexpr int kSequences = 4;
  // Per sequence, the chunk lengths fed step after step (1 = a decode).
  const std::vector<std::vector<int>> chunks = {
      {15, 1, 1, 17, 1, 31, 1, 1},
      {1, 1, 16, 1, 33, 1, 2},
      {17, 16, 1, 1, 1, 5, 1},
      {33, 1, 15, 1, 1, 47, 1},
  };
  std::vector<std::vector<int32_t>> ids;
  std::vector<std::unique_ptr<SequenceKv>> oracle_kv, paged_kv;
  for (int s = 0; s < kSequences; ++s) {
    ids.push_back(Prompt(20 + s, 200));
    oracle_kv.push_back(oracle_pool.NewSequence());
    paged_kv.push_back(paged_pool.NewSequence());
  }
  double max_diff = 0;
  bool fragmented = false;
  for (size_t step = 0; step < 8; ++step) {
    std::vector<StepInput> oracle_in, paged_in;
    for (int s = 0; s < kSequences; ++s) {
      if (step >= chunks[s].size()) continue;
      const int at = paged_kv[s]->length();
      const auto tokens = absl::MakeConstSpan(ids[s]).subspan(at, chunks[s][step]);
      const LogitsWanted wanted = s % 2 == 0 ? LogitsWanted::kAll : LogitsWanted::kLast;
      oracle_in.push_back({oracle_kv[s].get(), tokens, wanted});
      paged_in.push_back({paged_kv[s].get(), tokens, wanted});
    }
    auto oracle = model_->runner().Step(oracle_in);
    auto paged = model_->runner().Step(paged_in);
    ASSERT_TRUE(oracle.ok()) << oracle.status();
    ASSERT_TRUE(paged.ok()) << paged.status();
    ASSERT_EQ(oracle->logits.size(), paged->logits.size());
    for (size_t i = 0; i < oracle->logits.size(); ++i) {
      max_diff =
          std::max(max_diff, static_cast<double>(std::abs(oracle->logits[i] - paged->logits[i])));
    }
    EXPECT_EQ(oracle->logits, paged->logits) << "step " << step;
  }
  for (int s = 0; s < kSequences; ++s) {
    const std::vector<int32_t>& table = paged_kv[s]->block_table();
    for (size_t i = 1; i < table.size(); ++i) fragmented |= table[i] != table[i - 1] + 1;
  }
  std::printf("paged vs contiguous, %s K/V: max |diff| %g over all logits (tolerance 0)\n",
              KvDtypeName(dtype), max_diff);
  EXPECT_TRUE(fragmented) << "the block tables are contiguous: the test checks nothing paged";
  EXPECT_EQ(max_diff, 0.0);
}

TEST_F(EngineTest, FullCacheFailsTheStepWithoutSideEffects) {
  LocalModelOptions options;
  options.kv_cache_tokens = 32;
  auto small = LocalModel::Load(testing::TinyMixtralDir(), options);
  ASSERT_TRUE(small.ok()) << small.status();
  auto kv = (*small)->kv_pool().NewSequence();
  const std::vector<int32_t> ids = Prompt(6, 40);
  StepInput in{kv.get(), ids, LogitsWanted::kLast};
  auto out = (*small)->runner().Step({&in, 1});
  EXPECT_EQ(out.status().code(), absl::StatusCode::kResourceExhausted) << out.status();
  EXPECT_EQ(kv->length(), 0);
}

// Generate reserves prompt + max_new_tokens slots before its first step: a
// pool that holds the prompt but not the whole generation fails at once, and
// the slots go back to the pool.
TEST_F(EngineTest, GenerateReservesTheWorstCaseUpFront) {
  // Counts the steps Generate runs.
  struct CountingRunner : StepRunner {
    StepRunner* inner = nullptr;
    int steps = 0;
    absl::StatusOr<StepOutput> Step(absl::Span<const StepInput> inputs, StepTrace* trace) override {
      ++steps;
      return inner->Step(inputs, trace);
    }
    const ModelConfig& config() const override { return inner->config(); }
  };
  LocalModelOptions options;
  options.kv_cache_tokens = 32;
  auto small = LocalModel::Load(testing::TinyMixtralDir(), options);
  ASSERT_TRUE(small.ok()) << small.status();
  CountingRunner runner;
  runner.inner = &(*small)->runner();
  GenerateOptions generate;
  generate.max_new_tokens = 20;
  generate.ignore_eos = true;
  const std::vector<int32_t> prompt = Prompt(7, 16);  // 16 + 20 > 32 slots
  auto result = Generate(runner, (*small)->kv_pool(), (*small)->tokenizer(), prompt, generate);
  EXPECT_EQ(result.status().code(), absl::StatusCode::kResourceExhausted) << result.status();
  EXPECT_EQ(runner.steps, 0) << "Generate ran steps before finding the pool too small";
  EXPECT_EQ((*small)->kv_pool().used_tokens(), 0);
  generate.max_new_tokens = 16;  // 16 + 16 = 32: fits
  result = Generate(runner, (*small)->kv_pool(), (*small)->tokenizer(), prompt, generate);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->token_ids.size(), 16u);
  EXPECT_EQ(runner.steps, 16);
  EXPECT_EQ((*small)->kv_pool().used_tokens(), 0);
}

// The CPU experts, except that every call to `failing` fails (as a dead
// expert's would after its retries); its outputs are NaN so a use would show.
class OneExpertDownBackend final : public ExpertBackend {
 public:
  OneExpertDownBackend(const ExpertStore* store, int failing) : local_(store), failing_(failing) {}
  absl::Status RunLayer(int layer, absl::Span<const ExpertBatch> batches) override {
    return testing::RunLayerThroughPerBatch(*this, layer, batches);
  }
  absl::Status RunLayerPerBatch(int layer, absl::Span<const ExpertBatch> batches,
                                std::vector<absl::Status>* batch_status) override {
    batch_status->assign(batches.size(), absl::OkStatus());
    for (size_t i = 0; i < batches.size(); ++i) {
      const ExpertBatch& b = batches[i];
      if (b.expert == failing_) {
        std::fill_n(b.output, static_cast<size_t>(b.tokens) * dim_,
                    std::numeric_limits<float>::quiet_NaN());
        (*batch_status)[i] = absl::UnavailableError(
            absl::StrCat("expert ", b.expert, " (layer ", layer, ") unavailable: test"));
        continue;
      }
      if (absl::Status s = local_.RunLayer(layer, {&b, 1}); !s.ok()) return s;
    }
    return absl::OkStatus();
  }
  std::string Describe() const override { return "one expert down"; }
  void set_dim(int dim) { dim_ = dim; }

 private:
  LocalExpertBackend local_;
  int failing_;
  int dim_ = 0;
};

// A failed expert ends only the sequences with a token routed to it: each
// gets the expert's error and keeps its cache length; every other sequence
// gets the logits it gets alone, and its cache stays right (its next decode
// step, still beside the failed ones' requests, equals a full recompute).
TEST_F(EngineTest, AFailedExpertEndsOnlyTheSequencesRoutedToIt) {
  constexpr int kSequences = 6;
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < kSequences; ++i) prompts.push_back(Prompt(40 + i, 2 + i % 3));
  // Which experts each prompt's tokens route to, alone.
  std::vector<std::vector<bool>> uses(kSequences, std::vector<bool>(8, false));
  for (int i = 0; i < kSequences; ++i) {
    auto kv = model_->kv_pool().NewSequence();
    StepInput in{kv.get(), prompts[i], LogitsWanted::kLast};
    StepTrace trace;
    ASSERT_TRUE(model_->runner().Step({&in, 1}, &trace).ok());
    for (const Routing& r : trace.routing) {
      for (int32_t e : r.experts) uses[i][e] = true;
    }
  }
  // An expert some sequences use and some do not.
  int failing = -1;
  for (int e = 0; e < 8 && failing < 0; ++e) {
    int users = 0;
    for (int i = 0; i < kSequences; ++i) users += uses[i][e];
    if (users > 0 && users < kSequences) failing = e;
  }
  ASSERT_GE(failing, 0) << "every expert is used by all or none of the prompts";

  OneExpertDownBackend backend(&model_->experts(), failing);
  backend.set_dim(model_->config().hidden_size);
  ModelRunner runner(&model_->attention(), &backend);
  std::vector<std::unique_ptr<SequenceKv>> kvs;
  std::vector<StepInput> inputs;
  for (int i = 0; i < kSequences; ++i) {
    kvs.push_back(model_->kv_pool().NewSequence());
    inputs.push_back({kvs.back().get(), prompts[i], LogitsWanted::kLast});
  }
  auto out = runner.Step(inputs);
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->sequence_status.size(), static_cast<size_t>(kSequences));
  int failed = 0;
  std::vector<int32_t> next(kSequences, 0);
  for (int i = 0; i < kSequences; ++i) {
    if (uses[i][failing]) {
      ++failed;
      EXPECT_EQ(out->sequence_status[i].code(), absl::StatusCode::kUnavailable) << i;
      EXPECT_NE(out->sequence_status[i].message().find(absl::StrCat("expert ", failing)),
                std::string::npos)
          << out->sequence_status[i];
      EXPECT_EQ(out->logits_row_begin[i], -1) << i;
      EXPECT_EQ(kvs[i]->length(), 0) << "a failed sequence's cache grew";
      continue;
    }
    ASSERT_TRUE(out->sequence_status[i].ok()) << i << ": " << out->sequence_status[i];
    EXPECT_EQ(kvs[i]->length(), static_cast<int>(prompts[i].size()));
    const std::vector<float> alone = FullLogits(prompts[i]);
    const auto row = absl::MakeConstSpan(out->logits)
                         .subspan(static_cast<size_t>(out->logits_row_begin[i]) * V(), V());
    const auto last = absl::MakeConstSpan(alone).subspan(alone.size() - V(), V());
    EXPECT_TRUE(AllClose(row, last, tolerance::kReorderAbs, tolerance::kReorderRel,
                         absl::StrCat("sequence ", i, " beside a failed expert vs alone")));
    // Greedy next token, then one decode step on the surviving caches.
    next[i] = static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
  }
  ASSERT_GT(failed, 0);
  ASSERT_LT(failed, kSequences);
  std::vector<StepInput> decode;
  std::vector<int> who;
  for (int i = 0; i < kSequences; ++i) {
    if (uses[i][failing]) continue;
    decode.push_back({kvs[i].get(), absl::MakeConstSpan(&next[i], 1), LogitsWanted::kLast});
    who.push_back(i);
  }
  auto step2 = model_->runner().Step(decode);  // healthy experts: the cache is what matters
  ASSERT_TRUE(step2.ok()) << step2.status();
  for (size_t j = 0; j < who.size(); ++j) {
    std::vector<int32_t> ids = prompts[who[j]];
    ids.push_back(next[who[j]]);
    const std::vector<float> full = FullLogits(ids);
    EXPECT_TRUE(AllClose(absl::MakeConstSpan(step2->logits)
                             .subspan(static_cast<size_t>(step2->logits_row_begin[j]) * V(), V()),
                         absl::MakeConstSpan(full).subspan(full.size() - V(), V()),
                         tolerance::kReorderAbs, tolerance::kReorderRel,
                         absl::StrCat("sequence ", who[j], " decode after the failure")));
  }
  std::printf("[ contain  ] expert %d down: %d of %d sequences ended, the rest exact\n", failing,
              failed, kSequences);
}

}  // namespace
}  // namespace switchyard
