// Random-weight Mixtral checkpoints, for tests and benchmarks
// (`switchyard make-model`).
//
// MakeModel writes a Hugging Face-layout checkpoint folder: config.json,
// generation_config.json, either model.safetensors or
// model-0000i-of-0000N.safetensors shards plus model.safetensors.index.json,
// and optionally the tokenizer files. Tensor names and shapes come from
// ExpectedTensors (checkpoint.h), in that order.
//
// Weights are deterministic: every element is a hash of (seed, tensor name,
// element index), so the same seed gives bit-identical tensors whether the
// checkpoint is sharded or not, on any platform and thread count. Random
// init, with fan_in the number of input features (the second dimension):
//   linear weights (q/k/v/o, expert w1/w2/w3)   U(-a, a), a = sqrt(3) * 0.6 / sqrt(fan_in)
//   router gate                                 U(-a, a), a = sqrt(3) * 1.0 / sqrt(fan_in)
//   lm_head                                     U(-a, a), a = sqrt(3) * 4.0 / sqrt(fan_in)
//   embed_tokens                                U(-a, a), a = sqrt(3) * 0.08
//   RMSNorm weights                             1 + U(-0.15, 0.15)
// so activations keep unit scale through the layers, the router spreads
// tokens across experts and the logits (std about 4) have clear, varied
// argmaxes. Generation is multi-threaded and streamed to disk in chunks;
// memory stays bounded (a few tens of MB) whatever the model size.
//
// Thread-safety: the functions are thread-safe; concurrent MakeModel calls
// must use different output folders.
#ifndef SWITCHYARD_CORE_MAKE_MODEL_H_
#define SWITCHYARD_CORE_MAKE_MODEL_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "core/dtype.h"
#include "core/model_config.h"

namespace switchyard {

// Names PresetConfig accepts: "tiny", "bench", "mixtral-8x7b".
std::vector<std::string> PresetNames();

// The ModelConfig of a preset:
//   tiny          the shapes of tests/data/tiny-mixtral (vocab 32000, hidden 64, ffn 128,
//                 2 layers, 4 heads, 2 KV heads, head_dim 16, 8 experts, top-2)
//   bench         the CPU benchmark model (hidden 1024, ffn 3584, 8 layers, 16 heads,
//                 4 KV heads, head_dim 64, 8 experts, top-2)
//   mixtral-8x7b  mistralai/Mixtral-8x7B-v0.1 (hidden 4096, ffn 14336, 32 layers,
//                 32 heads, 8 KV heads, head_dim 128, 8 experts, top-2)
// All use vocab 32000 and rope_theta 1e6. InvalidArgument (listing the valid
// names) for an unknown name.
absl::StatusOr<ModelConfig> PresetConfig(std::string_view name);

struct MakeModelOptions {
  // Preset name (see PresetConfig). Required.
  std::string preset = "";
  // Output folder; created if missing. Required. Existing model files in it
  // (model.safetensors, model.safetensors.index.json, model-*-of-*.safetensors)
  // are replaced.
  std::string out_dir = "";
  // Overrides num_hidden_layers when > 0. Default -1: the preset's.
  int layers = -1;
  // Seed of the weights. Default 0.
  uint64_t seed = 0;
  // Stored dtype: kBF16 (default), kF16 or kF32.
  DType dtype = DType::kBF16;
  // Shard when the total size exceeds this many bytes, packing tensors in
  // order into shards of at most this size (a bigger tensor gets a shard of
  // its own). Default 2 GiB; 0 = never shard.
  uint64_t shard_bytes = 2ull << 30;
  // Folder holding tokenizer.json and tokenizer_config.json to copy into
  // out_dir. Default empty: no tokenizer files.
  std::string tokenizer_dir = "";
  // Generator threads. Default 0: std::thread::hardware_concurrency().
  int threads = 0;
};

// Writes the checkpoint. Errors name the offending file or option.
absl::Status MakeModel(const MakeModelOptions& options);

// The value MakeModel stores (before rounding to the dtype) at element
// `index` of tensor `name` with shape `shape`, for tests and tools.
float RandomWeightValue(uint64_t seed, const std::string& name, const std::vector<int64_t>& shape,
                        uint64_t index);

}  // namespace switchyard

#endif  // SWITCHYARD_CORE_MAKE_MODEL_H_
