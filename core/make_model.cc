#include "core/make_model.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <memory>
#include <regex>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/types/span.h"
#include "core/checkpoint.h"
#include "core/safetensors.h"
#include "core/status_macros.h"
#include "core/tensor_names.h"
#include "nlohmann/json.hpp"

namespace switchyard {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

// Elements generated per chunk (per pipeline stage).
constexpr uint64_t kChunkElements = uint64_t{8} << 20;
// Below this many elements a chunk is generated on the calling thread.
constexpr uint64_t kMinParallelElements = uint64_t{1} << 16;

inline uint64_t SplitMix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

uint64_t Fnv1a(std::string_view s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

// How one tensor's elements are drawn: offset + scale * u, u ~ U(-1, 1).
struct InitRule {
  uint64_t key = 0;  // per (seed, tensor) stream key
  float scale = 0;
  float offset = 0;
};

InitRule RuleFor(uint64_t seed, const std::string& name, const std::vector<int64_t>& shape) {
  InitRule r;
  r.key = SplitMix64(seed ^ SplitMix64(Fnv1a(name)));
  const double fan_in = shape.size() >= 2 ? static_cast<double>(shape[1]) : 1.0;
  const double sqrt3 = std::sqrt(3.0);
  auto ends_with = [&](std::string_view suffix) {
    return name.size() >= suffix.size() &&
           name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0;
  };
  if (shape.size() == 1 || ends_with("layernorm.weight") || name == names::FinalNorm()) {
    r.offset = 1.0f;
    r.scale = 0.15f;
  } else if (name == names::Embed()) {
    r.scale = static_cast<float>(sqrt3 * 0.08);
  } else if (name == names::LmHead()) {
    r.scale = static_cast<float>(sqrt3 * 4.0 / std::sqrt(fan_in));
  } else if (ends_with("block_sparse_moe.gate.weight")) {
    r.scale = static_cast<float>(sqrt3 * 1.0 / std::sqrt(fan_in));
  } else {
    r.scale = static_cast<float>(sqrt3 * 0.6 / std::sqrt(fan_in));
  }
  return r;
}

// Value from a 16-bit lane; exact arithmetic up to one final rounding, so
// the result does not depend on FMA contraction or the platform.
inline float LaneValue(const InitRule& r, uint32_t lane) {
  const float u = (static_cast<float>(lane) + 0.5f) * (1.0f / 32768.0f) - 1.0f;  // exact
  if (r.offset == 0.0f) return r.scale * u;
  return static_cast<float>(static_cast<double>(r.offset) +
                            static_cast<double>(r.scale) * static_cast<double>(u));
}

inline float ElementValue(const InitRule& r, uint64_t index) {
  const uint64_t h = SplitMix64(r.key + (index >> 2) * 0xd1b54a32d192ed03ull);
  return LaneValue(r, static_cast<uint32_t>(h >> (16 * (index & 3))) & 0xffffu);
}

template <DType kType>
inline void Store(float v, uint8_t* out) {
  if constexpr (kType == DType::kBF16) {
    const uint16_t b = F32ToBf16(v);
    std::memcpy(out, &b, 2);
  } else if constexpr (kType == DType::kF16) {
    const uint16_t b = F32ToF16(v);
    std::memcpy(out, &b, 2);
  } else {
    std::memcpy(out, &v, 4);
  }
}

// Writes elements [begin, begin + count) of the tensor to `out`.
template <DType kType>
void GenerateTyped(const InitRule& r, uint64_t begin, uint64_t count, uint8_t* out) {
  constexpr size_t kSize = kType == DType::kF32 ? 4 : 2;
  uint64_t i = begin;
  const uint64_t end = begin + count;
  for (; i < end && (i & 3) != 0; ++i, out += kSize) Store<kType>(ElementValue(r, i), out);
  for (; i + 4 <= end; i += 4, out += 4 * kSize) {
    const uint64_t h = SplitMix64(r.key + (i >> 2) * 0xd1b54a32d192ed03ull);
    Store<kType>(LaneValue(r, static_cast<uint32_t>(h) & 0xffffu), out);
    Store<kType>(LaneValue(r, static_cast<uint32_t>(h >> 16) & 0xffffu), out + kSize);
    Store<kType>(LaneValue(r, static_cast<uint32_t>(h >> 32) & 0xffffu), out + 2 * kSize);
    Store<kType>(LaneValue(r, static_cast<uint32_t>(h >> 48) & 0xffffu), out + 3 * kSize);
  }
  for (; i < end; ++i, out += kSize) Store<kType>(ElementValue(r, i), out);
}

void Generate(DType dtype, const InitRule& r, uint64_t begin, uint64_t count, uint8_t* out) {
  switch (dtype) {
    case DType::kBF16:
      return GenerateTyped<DType::kBF16>(r, begin, count, out);
    case DType::kF16:
      return GenerateTyped<DType::kF16>(r, begin, count, out);
    default:
      return GenerateTyped<DType::kF32>(r, begin, count, out);
  }
}

void GenerateParallel(DType dtype, const InitRule& r, uint64_t begin, uint64_t count, uint8_t* out,
                      int threads) {
  if (threads <= 1 || count < kMinParallelElements) {
    Generate(dtype, r, begin, count, out);
    return;
  }
  const size_t elem = DTypeSize(dtype);
  // Pieces are multiples of 4 elements so the fast path covers them.
  const uint64_t per = ((count + threads - 1) / threads + 3) & ~uint64_t{3};
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) {
    const uint64_t b = t * per;
    if (b >= count) break;
    const uint64_t n = std::min(per, count - b);
    pool.emplace_back([=] { Generate(dtype, r, begin + b, n, out + b * elem); });
  }
  Generate(dtype, r, begin, std::min(per, count), out);
  for (std::thread& th : pool) th.join();
}

// Double-buffered output: the caller fills one buffer while the previous one
// is written to its file on a background thread.
class ChunkPipeline {
 public:
  explicit ChunkPipeline(size_t buffer_bytes) {
    for (auto& b : buffers_) b.resize(buffer_bytes);
  }
  ~ChunkPipeline() { (void)Drain(); }

  uint8_t* buffer() { return buffers_[current_].data(); }

  // Queues the first `nbytes` of buffer() for `writer` and switches buffers.
  absl::Status Submit(SafetensorsWriter* writer, size_t nbytes) {
    SY_RETURN_IF_ERROR(Drain());
    const uint8_t* data = buffers_[current_].data();
    io_ = std::thread([this, writer, data, nbytes] {
      io_status_ = writer->Append(absl::MakeConstSpan(data, nbytes));
    });
    current_ ^= 1;
    return absl::OkStatus();
  }

  // Waits for the pending write; its status.
  absl::Status Drain() {
    if (io_.joinable()) io_.join();
    absl::Status s = std::move(io_status_);
    io_status_ = absl::OkStatus();
    return s;
  }

 private:
  std::vector<uint8_t> buffers_[2];
  int current_ = 0;
  std::thread io_;
  absl::Status io_status_;
};

absl::Status WriteTextFile(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::PermissionDeniedError(absl::StrCat(path, ": cannot create"));
  out << text;
  out.close();
  if (!out) return absl::InternalError(absl::StrCat(path, ": write failed"));
  return absl::OkStatus();
}

// Removes model files a previous run may have left in `dir`.
absl::Status RemoveStaleModelFiles(const std::string& dir) {
  static const std::regex kShard(R"(model-\d+-of-\d+\.safetensors)");
  std::error_code ec;
  std::vector<fs::path> doomed;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (name == "model.safetensors" || name == "model.safetensors.index.json" ||
        std::regex_match(name, kShard)) {
      doomed.push_back(it->path());
    }
  }
  if (ec) return absl::InternalError(absl::StrCat(dir, ": cannot list: ", ec.message()));
  for (const fs::path& p : doomed) {
    if (!fs::remove(p, ec) && ec) {
      return absl::InternalError(absl::StrCat(p.string(), ": cannot remove: ", ec.message()));
    }
  }
  return absl::OkStatus();
}

std::string TorchDtype(DType d) {
  switch (d) {
    case DType::kF16:
      return "float16";
    case DType::kF32:
      return "float32";
    default:
      return "bfloat16";
  }
}

}  // namespace

std::vector<std::string> PresetNames() { return {"tiny", "bench", "mixtral-8x7b"}; }

absl::StatusOr<ModelConfig> PresetConfig(std::string_view name) {
  ModelConfig c;  // defaults are Mixtral-8x7B's
  c.vocab_size = 32000;
  c.num_local_experts = 8;
  c.num_experts_per_tok = 2;
  c.rope_theta = 1e6;
  c.rms_norm_eps = 1e-5;
  c.max_position_embeddings = 32768;
  c.sliding_window = 0;
  c.tie_word_embeddings = false;
  c.bos_token_id = 1;
  c.eos_token_id = 2;
  c.torch_dtype = "bfloat16";
  if (name == "tiny") {
    c.hidden_size = 64;
    c.intermediate_size = 128;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.head_dim = 16;
    c.max_position_embeddings = 4096;
  } else if (name == "bench") {
    c.hidden_size = 1024;
    c.intermediate_size = 3584;
    c.num_hidden_layers = 8;
    c.num_attention_heads = 16;
    c.num_key_value_heads = 4;
    c.head_dim = 64;
  } else if (name == "mixtral-8x7b") {
    c.hidden_size = 4096;
    c.intermediate_size = 14336;
    c.num_hidden_layers = 32;
    c.num_attention_heads = 32;
    c.num_key_value_heads = 8;
    c.head_dim = 128;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("unknown model preset '", std::string(name),
                     "'; valid presets: ", absl::StrJoin(PresetNames(), ", ")));
  }
  return c;
}

float RandomWeightValue(uint64_t seed, const std::string& name, const std::vector<int64_t>& shape,
                        uint64_t index) {
  return ElementValue(RuleFor(seed, name, shape), index);
}

absl::Status MakeModel(const MakeModelOptions& options) {
  SY_ASSIGN_OR_RETURN(ModelConfig config, PresetConfig(options.preset));
  if (options.out_dir.empty()) return absl::InvalidArgumentError("make-model: --out is required");
  if (options.layers == 0 || options.layers < -1) {
    return absl::InvalidArgumentError(
        absl::StrCat("make-model: --layers must be positive, got ", options.layers));
  }
  if (options.layers > 0) config.num_hidden_layers = options.layers;
  const DType dtype = options.dtype;
  if (dtype != DType::kBF16 && dtype != DType::kF16 && dtype != DType::kF32) {
    return absl::InvalidArgumentError(absl::StrCat(
        "make-model: unsupported dtype ", std::string(DTypeName(dtype)), "; use bf16, f16 or f32"));
  }
  config.torch_dtype = TorchDtype(dtype);
  const std::string& dir = options.out_dir;

  std::error_code ec;
  // Check the tokenizer files before spending time on the weights.
  if (!options.tokenizer_dir.empty()) {
    for (const char* name : {"tokenizer.json", "tokenizer_config.json"}) {
      const fs::path src = fs::path(options.tokenizer_dir) / name;
      if (!fs::is_regular_file(src, ec)) {
        return absl::NotFoundError(absl::StrCat(src.string(), ": tokenizer file not found"));
      }
    }
  }
  fs::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat(dir, ": cannot create: ", ec.message()));
  SY_RETURN_IF_ERROR(RemoveStaleModelFiles(dir));

  // Plan the shards.
  const std::vector<ExpectedTensor> tensors = ExpectedTensors(config);
  std::vector<uint64_t> sizes;
  uint64_t total = 0;
  for (const ExpectedTensor& t : tensors) {
    SY_ASSIGN_OR_RETURN(uint64_t n, TensorByteSize(dtype, t.shape));
    sizes.push_back(n);
    total += n;
  }
  std::vector<std::vector<size_t>> shards(1);
  if (options.shard_bytes > 0 && total > options.shard_bytes) {
    uint64_t in_shard = 0;
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (!shards.back().empty() && in_shard + sizes[i] > options.shard_bytes) {
        shards.emplace_back();
        in_shard = 0;
      }
      shards.back().push_back(i);
      in_shard += sizes[i];
    }
  } else {
    for (size_t i = 0; i < tensors.size(); ++i) shards[0].push_back(i);
  }
  const size_t num_shards = shards.size();
  auto shard_name = [&](size_t s) {
    return num_shards == 1 ? std::string("model.safetensors")
                           : absl::StrFormat("model-%05d-of-%05d.safetensors", s + 1, num_shards);
  };

  const int threads = options.threads > 0
                          ? options.threads
                          : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  ChunkPipeline pipeline(kChunkElements * DTypeSize(dtype));
  json weight_map = json::object();
  for (size_t s = 0; s < num_shards; ++s) {
    const std::string file = shard_name(s);
    const std::string path = absl::StrCat(dir, "/", file);
    std::vector<SafetensorsTensorInfo> infos;
    for (size_t i : shards[s]) {
      infos.push_back({tensors[i].name, dtype, tensors[i].shape});
      weight_map[tensors[i].name] = file;
    }
    SY_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsWriter> writer,
                        SafetensorsWriter::Create(path, std::move(infos)));
    for (size_t i : shards[s]) {
      const ExpectedTensor& t = tensors[i];
      const InitRule rule = RuleFor(options.seed, t.name, t.shape);
      const uint64_t count = sizes[i] / DTypeSize(dtype);
      for (uint64_t begin = 0; begin < count; begin += kChunkElements) {
        const uint64_t n = std::min(kChunkElements, count - begin);
        GenerateParallel(dtype, rule, begin, n, pipeline.buffer(), threads);
        SY_RETURN_IF_ERROR(pipeline.Submit(writer.get(), n * DTypeSize(dtype)));
      }
    }
    SY_RETURN_IF_ERROR(pipeline.Drain());
    SY_RETURN_IF_ERROR(writer->Finish());
  }
  if (num_shards > 1) {
    json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    SY_RETURN_IF_ERROR(
        WriteTextFile(absl::StrCat(dir, "/model.safetensors.index.json"), index.dump(2) + "\n"));
  }

  SY_RETURN_IF_ERROR(WriteTextFile(absl::StrCat(dir, "/config.json"), config.ToJson()));
  const json gen = {{"bos_token_id", config.bos_token_id},
                    {"eos_token_id", config.eos_token_id},
                    {"pad_token_id", nullptr}};
  SY_RETURN_IF_ERROR(
      WriteTextFile(absl::StrCat(dir, "/generation_config.json"), gen.dump(2) + "\n"));

  if (!options.tokenizer_dir.empty()) {
    for (const char* name : {"tokenizer.json", "tokenizer_config.json"}) {
      const fs::path src = fs::path(options.tokenizer_dir) / name;
      const fs::path dst = fs::path(dir) / name;
      if (!fs::is_regular_file(src, ec)) {
        return absl::NotFoundError(absl::StrCat(src.string(), ": tokenizer file not found"));
      }
      fs::copy_file(src, dst, fs::copy_options::overwrite_existing, ec);
      if (ec) {
        return absl::InternalError(
            absl::StrCat("cannot copy ", src.string(), " to ", dst.string(), ": ", ec.message()));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace switchyard
