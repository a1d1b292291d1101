#include "attention_service/kv_cache.h"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "core/cpu_ops.h"

namespace switchyard {

const char* KvDtypeName(KvDtype dtype) { return dtype == KvDtype::kBf16 ? "bf16" : "f32"; }

KvDtype DefaultHostKvDtype() {
  return cpu::ActivePrecision() == cpu::MatmulPrecision::kBf16 ? KvDtype::kBf16 : KvDtype::kF32;
}

absl::StatusOr<KvDtype> ParseKvDtype(absl::string_view text) {
  if (text == "auto") return DefaultHostKvDtype();
  if (text == "bf16") return KvDtype::kBf16;
  if (text == "f32") return KvDtype::kF32;
  return absl::InvalidArgumentError(
      absl::StrCat("--kv-cache-dtype must be auto, bf16 or f32, got '", text, "'"));
}

KvCachePool::KvCachePool(const ModelConfig& config, int64_t max_tokens, bool host_storage,
                         KvLayout layout, KvDtype dtype)
    : config_(config),
      max_tokens_(max_tokens),
      host_storage_(host_storage),
      layout_(layout),
      dtype_(dtype),
      elem_bytes_(KvDtypeBytes(dtype)),
      layers_(config.num_hidden_layers),
      block_plane_(static_cast<int64_t>(kBlockTokens) * config.kv_dim()),
      total_blocks_(max_tokens / kBlockTokens) {
  if (host_storage_ && layout_ == KvLayout::kPaged) {
    // Reserved address space, not memory: pages are backed as blocks are
    // first written, and MAP_NORESERVE keeps a large budget from being
    // refused up front by the kernel's overcommit heuristic.
    slab_bytes_ = static_cast<size_t>(total_blocks_) * layers_ * 2 * block_plane_ * elem_bytes_;
    void* slab = slab_bytes_ == 0 ? MAP_FAILED
                                  : mmap(nullptr, slab_bytes_, PROT_READ | PROT_WRITE,
                                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (slab != MAP_FAILED) {
      slab_ = static_cast<char*>(slab);
    } else {
      // No address space for the slab: grow each sequence's own arrays instead.
      std::fprintf(stderr,
                   "KV cache: cannot map %zu bytes for the paged pool (%s); using "
                   "per-sequence arrays without prefix reuse\n",
                   slab_bytes_, std::strerror(errno));
      layout_ = KvLayout::kContiguous;
      slab_bytes_ = 0;
    }
  }
}

KvCachePool::~KvCachePool() {
  if (slab_ != nullptr) munmap(slab_, slab_bytes_);
}

std::unique_ptr<SequenceKv> KvCachePool::NewSequence() {
  return std::unique_ptr<SequenceKv>(new SequenceKv(this));
}

namespace {

// One step of the prefix hash chain: the hash of a block's tokens and of
// every token before them (splitmix64 finaliser over each token).
uint64_t ChainHash(uint64_t h, absl::Span<const int32_t> tokens) {
  for (int32_t t : tokens) {
    h ^= static_cast<uint64_t>(static_cast<uint32_t>(t)) + 0x9e3779b97f4a7c15ull + (h << 6) +
         (h >> 2);
    h ^= h >> 30;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 27;
    h *= 0x94d049bb133111ebull;
    h ^= h >> 31;
  }
  return h;
}

}  // namespace

int64_t KvCachePool::cached_blocks() const {
  std::lock_guard<std::mutex> lock(mu_);
  return static_cast<int64_t>(lru_.size());
}

bool KvCachePool::TryAcquire(int n, std::vector<int32_t>* table) {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t never_used = total_blocks_ - static_cast<int64_t>(info_.size());
  if (static_cast<int64_t>(free_.size() + lru_.size()) + never_used < n) return false;
  for (int i = 0; i < n; ++i) {
    int32_t block;
    if (!free_.empty()) {
      block = free_.back();
      free_.pop_back();
    } else if (static_cast<int64_t>(info_.size()) < total_blocks_) {
      // Metadata grows with the blocks in use, not with the budget.
      block = static_cast<int32_t>(info_.size());
      info_.emplace_back();
    } else {  // evict the least recently used cached block
      block = lru_.front();
      lru_.pop_front();
      by_hash_.erase(info_[block].hash);
      info_[block].published = false;
    }
    info_[block].refs = 1;
    table->push_back(block);
  }
  used_blocks_.fetch_add(n);
  return true;
}

void KvCachePool::Release(const std::vector<int32_t>& blocks) {
  std::lock_guard<std::mutex> lock(mu_);
  // Last block first, so a prefix's deeper blocks are evicted before its
  // shallower ones, which more requests share.
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) {
    BlockInfo& b = info_[*it];
    if (--b.refs > 0) continue;
    used_blocks_.fetch_sub(1);
    if (b.published) {
      b.lru = lru_.insert(lru_.end(), *it);
    } else {
      free_.push_back(*it);
    }
  }
}

int32_t KvCachePool::Share(uint64_t hash) {
  std::lock_guard<std::mutex> lock(mu_);
  auto found = by_hash_.find(hash);
  if (found == by_hash_.end()) return -1;
  BlockInfo& b = info_[found->second];
  if (b.refs++ == 0) {
    lru_.erase(b.lru);
    used_blocks_.fetch_add(1);
  }
  return found->second;
}

void KvCachePool::Publish(int32_t block, uint64_t hash) {
  std::lock_guard<std::mutex> lock(mu_);
  BlockInfo& b = info_[block];
  if (b.published || !by_hash_.emplace(hash, block).second) return;
  b.published = true;
  b.hash = hash;
}

std::shared_ptr<void> KvCachePool::attachment() const {
  std::lock_guard<std::mutex> lock(mu_);
  return attachment_;
}

std::shared_ptr<void> KvCachePool::SetAttachmentIfUnset(std::shared_ptr<void> attachment) {
  std::lock_guard<std::mutex> lock(mu_);
  if (attachment_ == nullptr) attachment_ = std::move(attachment);
  return attachment_;
}

SequenceKv::SequenceKv(KvCachePool* pool)
    : pool_(pool),
      kv_dim_(pool->config().kv_dim()),
      contiguous_(pool->host_storage_ && pool->layout_ == KvLayout::kContiguous) {
  if (contiguous_) {
    keys_.resize(pool->config().num_hidden_layers);
    values_.resize(pool->config().num_hidden_layers);
  }
  pool_->live_sequences_.fetch_add(1);
}

SequenceKv::~SequenceKv() {
  attachment_.reset();  // device memory first, then the blocks
  pool_->Release(blocks_);
  pool_->live_sequences_.fetch_sub(1);
}

int SequenceKv::AttachCachedPrefix(absl::Span<const int32_t> tokens) {
  constexpr int kB = KvCachePool::kBlockTokens;
  if (!pool_->prefix_caching() || !blocks_.empty() || tokens.empty()) return length_;
  const int most = (static_cast<int>(tokens.size()) - 1) / kB;  // leave a token to compute
  uint64_t h = 0;
  for (int i = 0; i < most; ++i) {
    const uint64_t next = ChainHash(h, tokens.subspan(static_cast<size_t>(i) * kB, kB));
    const int32_t block = pool_->Share(next);
    if (block < 0) break;
    blocks_.push_back(block);
    h = next;
  }
  published_ = static_cast<int>(blocks_.size());
  chain_hash_ = h;
  length_ = published_ * kB;
  return length_;
}

void SequenceKv::Publish(absl::Span<const int32_t> tokens) {
  constexpr int kB = KvCachePool::kBlockTokens;
  if (!pool_->prefix_caching()) return;
  const int full = std::min(length_, static_cast<int>(tokens.size())) / kB;
  for (; published_ < full; ++published_) {
    chain_hash_ = ChainHash(chain_hash_, tokens.subspan(static_cast<size_t>(published_) * kB, kB));
    pool_->Publish(blocks_[published_], chain_hash_);
  }
}

absl::Status SequenceKv::Reserve(int new_length) {
  const int have = static_cast<int>(blocks_.size());
  const int want = static_cast<int>(KvCachePool::SlotsFor(new_length) / KvCachePool::kBlockTokens);
  if (want <= have) return absl::OkStatus();
  if (!pool_->TryAcquire(want - have, &blocks_)) {
    return absl::ResourceExhaustedError(
        absl::StrCat("KV cache full: ", pool_->used_tokens(), " of ", pool_->capacity_tokens(),
                     " token slots in use, sequence needs ",
                     (want - have) * KvCachePool::kBlockTokens, " more"));
  }
  if (contiguous_) {
    const size_t rows = static_cast<size_t>(reserved()) * kv_dim_ * pool_->elem_bytes_;
    for (size_t l = 0; l < keys_.size(); ++l) {
      keys_[l].resize(rows);
      values_[l].resize(rows);
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<int64_t> ParseByteSize(absl::string_view text, absl::string_view flag) {
  auto bad = [&](absl::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag,
                     " must be a size in bytes with an optional unit (B, KiB, MiB, GiB, TiB, KB, "
                     "MB, GB, TB), e.g. 2GiB or 512MiB; got '",
                     text, "'", why.empty() ? "" : ": ", why));
  };
  absl::string_view s = absl::StripAsciiWhitespace(text);
  size_t digits = 0;
  while (digits < s.size() && absl::ascii_isdigit(static_cast<unsigned char>(s[digits]))) ++digits;
  if (digits == 0) return bad("");
  uint64_t number = 0;
  if (!absl::SimpleAtoi(s.substr(0, digits), &number)) return bad("too large");
  const std::string unit = absl::AsciiStrToLower(absl::StripAsciiWhitespace(s.substr(digits)));
  static const std::pair<const char*, uint64_t> kUnits[] = {
      {"", 1},
      {"b", 1},
      {"kib", uint64_t{1} << 10},
      {"mib", uint64_t{1} << 20},
      {"gib", uint64_t{1} << 30},
      {"tib", uint64_t{1} << 40},
      {"kb", 1000},
      {"mb", 1000 * 1000},
      {"gb", uint64_t{1000} * 1000 * 1000},
      {"tb", uint64_t{1000} * 1000 * 1000 * 1000}};
  for (const auto& [name, scale] : kUnits) {
    if (unit != name) continue;
    if (number == 0) return bad("it must be more than 0");
    if (number > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / scale) {
      return bad("too large");
    }
    return static_cast<int64_t>(number * scale);
  }
  return bad(absl::StrCat("unknown unit '", unit, "'"));
}

namespace {

// The first number in `path`, or -1 (missing file, "max": no limit).
int64_t ReadNumber(const char* path) {
  std::ifstream in(path);
  int64_t v = -1;
  if (!(in >> v)) return -1;
  return v;
}

}  // namespace

absl::StatusOr<int64_t> HostMemAvailableBytes() {
  std::ifstream in("/proc/meminfo");
  std::string key, unit;
  int64_t kib = 0;
  int64_t available = -1;
  while (in >> key >> kib) {
    std::getline(in, unit);
    if (key == "MemAvailable:") {
      available = kib * 1024;
      break;
    }
  }
  if (available < 0) return absl::UnavailableError("cannot read MemAvailable from /proc/meminfo");
  // In a container /proc/meminfo is the node's: the cgroup's limit (v2, else
  // v1) less its usage is what this process may still take.
  int64_t limit = ReadNumber("/sys/fs/cgroup/memory.max");
  int64_t usage = ReadNumber("/sys/fs/cgroup/memory.current");
  if (limit < 0) {
    limit = ReadNumber("/sys/fs/cgroup/memory/memory.limit_in_bytes");
    usage = ReadNumber("/sys/fs/cgroup/memory/memory.usage_in_bytes");
  }
  if (limit > 0 && usage >= 0 && limit < (int64_t{1} << 60)) {
    available = std::min(available, std::max<int64_t>(limit - usage, 0));
  }
  return available;
}

std::string FormatBytes(int64_t bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  double v = static_cast<double>(bytes);
  int u = 0;
  while (v >= 1024 && u < 4) {
    v /= 1024;
    ++u;
  }
  char buf[32];
  std::snprintf(buf, sizeof(buf), u == 0 ? "%.0f %s" : "%.1f %s", v, units[u]);
  return buf;
}

}  // namespace switchyard
