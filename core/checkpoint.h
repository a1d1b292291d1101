// Loading Hugging Face Mixtral checkpoint folders.
//
// A checkpoint folder holds config.json and either model.safetensors or the
// shards listed in model.safetensors.index.json, with the hub's tensor names
// (see tensor_names.h). Tensors are memory-mapped; a process loads only the
// tensors its WeightSelection asks for (the gateway loads no expert weights,
// an expert service only its experts), and shards holding none of them are
// never opened.
//
// Every selected tensor is validated at Open: present, a supported dtype
// (F32, F16, BF16), the shape config.json implies, data inside its file.
// Errors name the file and the tensor.
//
// Thread-safety: a Checkpoint is immutable after Open; all const methods may
// be called concurrently.
#ifndef SWITCHYARD_CORE_CHECKPOINT_H_
#define SWITCHYARD_CORE_CHECKPOINT_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "core/dtype.h"
#include "core/model_config.h"
#include "core/safetensors.h"

namespace switchyard {

// Which tensors a process loads.
struct WeightSelection {
  // Embeddings, attention, norms, router gate and LM head. Default: loaded.
  bool dense = true;
  // Expert FFN weights (w1, w2, w3) to load. nullopt (default): every expert;
  // an empty list: none.
  std::optional<std::vector<int>> experts;
  // Layers whose expert weights are loaded: [layer_begin, layer_end).
  // layer_end < 0 (default) means through the last layer.
  int layer_begin = 0;
  int layer_end = -1;

  static WeightSelection All() { return {}; }
  // What the gateway / attention side needs.
  static WeightSelection DenseOnly() { return {.dense = true, .experts = std::vector<int>{}}; }
  // What an expert service needs.
  static WeightSelection ExpertsOnly(std::vector<int> experts, int layer_begin = 0,
                                     int layer_end = -1) {
    return {.dense = false,
            .experts = std::move(experts),
            .layer_begin = layer_begin,
            .layer_end = layer_end};
  }

  bool IncludesExpert(int layer, int expert) const;
};

// One tensor the model expects: its hub name and shape.
struct ExpectedTensor {
  std::string name;
  std::vector<int64_t> shape;
  bool is_expert = false;  // an expert FFN weight (w1/w2/w3)
  int layer = -1;          // -1 for tensors outside the layers
  int expert = -1;         // -1 for non-expert tensors
};

// Every tensor a Mixtral checkpoint with `config` holds, in a stable order
// (embeddings, then per layer, then final norm and LM head). The single
// source of truth for names and shapes: the loader validates against it and
// make-model writes it.
std::vector<ExpectedTensor> ExpectedTensors(const ModelConfig& config);

// How far loading the weights has come: the stored bytes of the distinct
// selected tensors read so far, of all selected. `finished` on the last report.
struct LoadProgress {
  uint64_t bytes_done = 0;
  uint64_t bytes_total = 0;
  bool finished = false;
};
// Receives LoadProgress reports; the servers print them (core prints nothing).
using LoadProgressCallback = std::function<void(const LoadProgress&)>;

class Checkpoint {
 public:
  // Opens `dir`, parses config.json and the safetensors headers of the shards
  // that hold selected tensors, and validates every selected tensor.
  // Errors: NotFound (config.json, model file, shard or tensor missing),
  // InvalidArgument (bad selection; wrong shape or dtype; malformed file or
  // index), DataLoss (a truncated file); see also safetensors.h.
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(
      const std::string& dir, const WeightSelection& selection = WeightSelection::All());

  ~Checkpoint();
  Checkpoint(const Checkpoint&) = delete;
  Checkpoint& operator=(const Checkpoint&) = delete;

  const ModelConfig& config() const;
  const WeightSelection& selection() const;

  // The selected tensor `name` converted to FP32, row-major in its stored
  // shape. NotFound if it is not selected (or not in the checkpoint).
  absl::StatusOr<std::vector<float>> ReadF32(const std::string& name) const;
  // The selected tensor `name` as stored (dtype, shape, bytes in the
  // memory map), valid while the Checkpoint lives. NotFound as ReadF32. With
  // tied embeddings and no lm_head.weight stored, both ReadF32 and View of
  // lm_head.weight give the embedding matrix.
  absl::StatusOr<TensorView> View(const std::string& name) const;

  // While a callback is set, the first View or ReadF32 of each tensor adds its
  // stored bytes and reports them (on the reading thread, serialized: keep the
  // callback short). nullptr stops the reports. Const because reporting does
  // not change what the checkpoint holds; safe to call from any thread.
  void SetLoadProgressCallback(LoadProgressCallback callback) const;
  // Stored bytes of the distinct tensors read while a callback was set.
  uint64_t bytes_read() const;

  // Selected tensor names, in ExpectedTensors order.
  const std::vector<std::string>& selected_tensors() const;
  // Sum of the stored bytes of the selected tensors.
  uint64_t selected_bytes() const;
  // Paths of the safetensors files that were opened.
  std::vector<std::string> opened_files() const;

 private:
  struct Impl;
  explicit Checkpoint(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace switchyard

#endif  // SWITCHYARD_CORE_CHECKPOINT_H_
