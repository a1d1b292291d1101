#include "core/checkpoint.h"

#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <fstream>
#include <map>
#include <mutex>
#include <set>
#include <sstream>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/safetensors.h"
#include "core/status_macros.h"
#include "core/tensor_names.h"
#include "nlohmann/json.hpp"

namespace switchyard {
namespace {

using nlohmann::json;

constexpr char kSingleFile[] = "model.safetensors";
constexpr char kIndexFile[] = "model.safetensors.index.json";

bool IsRegularFile(const std::string& path) {
  struct stat st;
  return stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::string ShapeString(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// Parses model.safetensors.index.json into tensor name -> shard file name.
absl::StatusOr<std::map<std::string, std::string>> ReadIndex(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream ss;
  ss << in.rdbuf();
  json j = json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a valid JSON object"));
  }
  auto wm = j.find("weight_map");
  if (wm == j.end() || !wm->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": missing 'weight_map' object"));
  }
  std::map<std::string, std::string> out;
  for (const auto& [name, file] : wm->items()) {
    if (!file.is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ": weight_map entry for tensor '", name, "' is not a string"));
    }
    const std::string& f = file.get_ref<const std::string&>();
    if (f.empty() || f[0] == '/' || f == ".." || f.rfind("../", 0) == 0 ||
        f.find("/../") != std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": weight_map entry for tensor '", name,
                                                     "' names a file outside the folder: '", f,
                                                     "'"));
    }
    out[name] = f;
  }
  return out;
}

absl::Status ValidateSelection(const WeightSelection& s, const ModelConfig& c) {
  if (s.experts.has_value()) {
    for (int e : *s.experts) {
      if (e < 0 || e >= c.num_local_experts) {
        return absl::InvalidArgumentError(absl::StrCat(
            "weight selection: expert ", e, " out of range [0, ", c.num_local_experts, ")"));
      }
    }
  }
  const int end = s.layer_end < 0 ? c.num_hidden_layers : s.layer_end;
  if (s.layer_begin < 0 || s.layer_begin > end || end > c.num_hidden_layers) {
    return absl::InvalidArgumentError(absl::StrCat("weight selection: layer range [", s.layer_begin,
                                                   ", ", s.layer_end, ") invalid for a model with ",
                                                   c.num_hidden_layers, " layers"));
  }
  return absl::OkStatus();
}

// Converts `count` elements to FP32, splitting big tensors across threads.
void ConvertParallel(DType dtype, const uint8_t* src, size_t count, float* dst) {
  constexpr size_t kMinPerThread = size_t{1} << 22;
  const size_t hw = std::max(1u, std::thread::hardware_concurrency());
  const size_t threads = std::min({hw, size_t{8}, count / kMinPerThread});
  if (threads <= 1) {
    ConvertToF32(dtype, src, count, dst);
    return;
  }
  const size_t elem = DTypeSize(dtype);
  const size_t per = (count + threads - 1) / threads;
  std::vector<std::thread> pool;
  for (size_t t = 1; t < threads; ++t) {
    const size_t b = t * per, e = std::min(count, b + per);
    if (b >= e) break;
    pool.emplace_back([=] { ConvertToF32(dtype, src + b * elem, e - b, dst + b); });
  }
  ConvertToF32(dtype, src, std::min(count, per), dst);
  for (std::thread& th : pool) th.join();
}

}  // namespace

bool WeightSelection::IncludesExpert(int layer, int expert) const {
  if (layer < layer_begin) return false;
  if (layer_end >= 0 && layer >= layer_end) return false;
  if (!experts.has_value()) return true;
  return std::find(experts->begin(), experts->end(), expert) != experts->end();
}

std::vector<ExpectedTensor> ExpectedTensors(const ModelConfig& c) {
  const int64_t V = c.vocab_size, D = c.hidden_size, F = c.intermediate_size;
  const int64_t Q = c.q_dim(), KV = c.kv_dim(), E = c.num_local_experts;
  std::vector<ExpectedTensor> out;
  out.reserve(4 + static_cast<size_t>(c.num_hidden_layers) * (7 + 3 * E));
  out.push_back({names::Embed(), {V, D}});
  for (int i = 0; i < c.num_hidden_layers; ++i) {
    auto dense = [&](std::string name, std::vector<int64_t> shape) {
      out.push_back({std::move(name), std::move(shape), false, i, -1});
    };
    dense(names::InputNorm(i), {D});
    dense(names::QProj(i), {Q, D});
    dense(names::KProj(i), {KV, D});
    dense(names::VProj(i), {KV, D});
    dense(names::OProj(i), {D, Q});
    dense(names::PostAttnNorm(i), {D});
    dense(names::Gate(i), {E, D});
    for (int e = 0; e < E; ++e) {
      out.push_back({names::Expert(i, e, "w1"), {F, D}, true, i, e});
      out.push_back({names::Expert(i, e, "w2"), {D, F}, true, i, e});
      out.push_back({names::Expert(i, e, "w3"), {F, D}, true, i, e});
    }
  }
  out.push_back({names::FinalNorm(), {D}});
  out.push_back({names::LmHead(), {V, D}});
  return out;
}

struct Checkpoint::Impl {
  std::string dir;
  ModelConfig config;
  WeightSelection selection;
  std::vector<std::unique_ptr<SafetensorsFile>> files;   // in the order opened
  std::map<std::string, TensorView, std::less<>> views;  // every selected tensor
  std::vector<std::string> selected;
  uint64_t selected_bytes = 0;

  // Load progress (SetLoadProgressCallback); `reporting` keeps View lock-free
  // when nobody listens.
  std::atomic<bool> reporting{false};
  std::mutex progress_mu;
  std::set<std::string, std::less<>> read;  // guarded by progress_mu
  uint64_t bytes_read = 0;                  // guarded by progress_mu
  LoadProgressCallback progress;            // guarded by progress_mu

  void CountRead(const std::string& name, uint64_t nbytes) {
    std::lock_guard<std::mutex> lock(progress_mu);
    if (!progress || !read.insert(name).second) return;
    bytes_read += nbytes;
    progress({std::min(bytes_read, selected_bytes), selected_bytes, false});
  }
};

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& dir,
                                                             const WeightSelection& selection) {
  auto impl = std::make_unique<Impl>();
  impl->dir = dir;
  impl->selection = selection;
  SY_ASSIGN_OR_RETURN(impl->config, LoadModelConfig(dir));
  const ModelConfig& config = impl->config;
  SY_RETURN_IF_ERROR(ValidateSelection(selection, config));

  std::vector<ExpectedTensor> wanted;
  for (ExpectedTensor& t : ExpectedTensors(config)) {
    if (t.is_expert ? selection.IncludesExpert(t.layer, t.expert) : selection.dense) {
      wanted.push_back(std::move(t));
    }
  }

  // Which file holds each wanted tensor.
  const std::string single_path = absl::StrCat(dir, "/", kSingleFile);
  const std::string index_path = absl::StrCat(dir, "/", kIndexFile);
  std::map<std::string, std::string> weight_map;
  const bool single = IsRegularFile(single_path);
  if (!single) {
    if (!IsRegularFile(index_path)) {
      return absl::NotFoundError(absl::StrCat(dir, ": no ", kSingleFile, " or ", kIndexFile));
    }
    SY_ASSIGN_OR_RETURN(weight_map, ReadIndex(index_path));
  }
  const bool tied = config.tie_word_embeddings;
  const std::string lm_head = names::LmHead();
  std::vector<std::pair<const ExpectedTensor*, std::string>> placed;  // tensor, file path
  bool alias_lm_head = false;
  for (const ExpectedTensor& t : wanted) {
    if (single) {
      placed.emplace_back(&t, single_path);
      continue;
    }
    auto it = weight_map.find(t.name);
    if (it == weight_map.end()) {
      if (tied && t.name == lm_head) {
        alias_lm_head = true;
        continue;
      }
      return absl::NotFoundError(
          absl::StrCat(index_path, ": tensor '", t.name, "' is not in the weight_map"));
    }
    placed.emplace_back(&t, absl::StrCat(dir, "/", it->second));
  }

  std::map<std::string, const SafetensorsFile*> opened;
  for (const auto& [t, path] : placed) {
    const SafetensorsFile* file;
    if (auto it = opened.find(path); it != opened.end()) {
      file = it->second;
    } else {
      absl::StatusOr<std::unique_ptr<SafetensorsFile>> f = SafetensorsFile::Open(path);
      if (!f.ok()) {
        const absl::Status& s = f.status();
        if (s.code() != absl::StatusCode::kNotFound) return s;  // the message names the tensor
        // A missing shard: name the tensor that needs it, too.
        return absl::NotFoundError(
            absl::StrCat(s.message(), " (needed for tensor '", t->name, "')"));
      }
      file = f->get();
      impl->files.push_back(*std::move(f));
      opened[path] = file;
    }
    const SafetensorsEntry* e = file->Find(t->name);
    if (e == nullptr) {
      if (tied && t->name == lm_head) {
        alias_lm_head = true;
        continue;
      }
      return absl::NotFoundError(absl::StrCat(path, ": tensor '", t->name, "' not found"));
    }
    if (e->dtype != DType::kF32 && e->dtype != DType::kF16 && e->dtype != DType::kBF16) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", t->name, "' has dtype ",
                                                     std::string(DTypeName(e->dtype)),
                                                     "; weights must be F32, F16 or BF16"));
    }
    if (e->shape != t->shape) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", t->name, "' has shape ",
                                                     ShapeString(e->shape), " but config.json",
                                                     " implies ", ShapeString(t->shape)));
    }
    impl->views[t->name] = file->View(*e);
    impl->selected_bytes += e->nbytes();
  }
  if (alias_lm_head) {
    // Tied embeddings: the LM head is the embedding matrix.
    auto it = impl->views.find(names::Embed());
    if (it == impl->views.end()) {
      return absl::NotFoundError(absl::StrCat(dir, ": tensor '", lm_head, "' is absent and '",
                                              names::Embed(), "' is not loaded"));
    }
    TensorView v = it->second;
    impl->views[lm_head] = std::move(v);
  }
  for (const ExpectedTensor& t : wanted) impl->selected.push_back(t.name);
  return std::unique_ptr<Checkpoint>(new Checkpoint(std::move(impl)));
}

Checkpoint::Checkpoint(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Checkpoint::~Checkpoint() = default;

const ModelConfig& Checkpoint::config() const { return impl_->config; }
const WeightSelection& Checkpoint::selection() const { return impl_->selection; }
const std::vector<std::string>& Checkpoint::selected_tensors() const { return impl_->selected; }
uint64_t Checkpoint::selected_bytes() const { return impl_->selected_bytes; }

std::vector<std::string> Checkpoint::opened_files() const {
  std::vector<std::string> out;
  out.reserve(impl_->files.size());
  for (const auto& f : impl_->files) out.push_back(f->path());
  return out;
}

void Checkpoint::SetLoadProgressCallback(LoadProgressCallback callback) const {
  std::lock_guard<std::mutex> lock(impl_->progress_mu);
  impl_->reporting.store(static_cast<bool>(callback));
  impl_->progress = std::move(callback);
}

uint64_t Checkpoint::bytes_read() const {
  std::lock_guard<std::mutex> lock(impl_->progress_mu);
  return std::min(impl_->bytes_read, impl_->selected_bytes);
}

absl::StatusOr<TensorView> Checkpoint::View(const std::string& name) const {
  auto it = impl_->views.find(name);
  if (it == impl_->views.end()) {
    return absl::NotFoundError(
        absl::StrCat(impl_->dir, ": tensor '", name, "' is not selected or not in the checkpoint"));
  }
  if (impl_->reporting.load(std::memory_order_relaxed)) {
    impl_->CountRead(it->first, it->second.nbytes);
  }
  return it->second;
}

absl::StatusOr<std::vector<float>> Checkpoint::ReadF32(const std::string& name) const {
  SY_ASSIGN_OR_RETURN(const TensorView v, View(name));
  const size_t count = v.nbytes / DTypeSize(v.dtype);
  std::vector<float> out(count);
  ConvertParallel(v.dtype, v.data, count, out.data());
  return out;
}

}  // namespace switchyard
