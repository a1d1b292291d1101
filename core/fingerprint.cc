#include "core/fingerprint.h"

#include <algorithm>
#include <cstdint>

#include "absl/strings/str_format.h"
#include "core/status_macros.h"
#include "core/tensor_names.h"

namespace switchyard {
namespace {

constexpr size_t kEdgeBytes = 4096;
constexpr size_t kWindows = 64;
constexpr size_t kWindowBytes = 64;

class Fnv1a64 {
 public:
  void Add(const void* data, size_t size) {
    const auto* p = static_cast<const uint8_t*>(data);
    for (size_t i = 0; i < size; ++i) {
      h_ ^= p[i];
      h_ *= 1099511628211ull;
    }
  }
  void Add(const std::string& s) {
    Add(s.data(), s.size());
    AddInt(s.size());  // length-delimit so adjacent fields cannot run together
  }
  void AddInt(uint64_t v) { Add(&v, sizeof(v)); }
  uint64_t value() const { return h_; }

 private:
  uint64_t h_ = 1469598103934665603ull;
};

void AddSampledBytes(const TensorView& v, Fnv1a64& h) {
  if (v.nbytes <= 2 * kEdgeBytes + kWindows * kWindowBytes) {
    h.Add(v.data, v.nbytes);
    return;
  }
  h.Add(v.data, kEdgeBytes);
  h.Add(v.data + v.nbytes - kEdgeBytes, kEdgeBytes);
  // Windows evenly spaced over the middle part, first at its start, last at its end.
  const size_t begin = kEdgeBytes;
  const size_t span = v.nbytes - 2 * kEdgeBytes - kWindowBytes;
  for (size_t i = 0; i < kWindows; ++i) {
    const size_t offset = begin + span * i / (kWindows - 1);
    h.Add(v.data + offset, kWindowBytes);
  }
}

}  // namespace

absl::StatusOr<std::string> ExpertWeightsFingerprint(const Checkpoint& checkpoint, int expert) {
  const ModelConfig& config = checkpoint.config();
  Fnv1a64 h;
  h.Add(std::string("switchyard-expert-weights-v1"));
  h.Add(config.Fingerprint());
  h.AddInt(static_cast<uint64_t>(expert));
  for (int layer = 0; layer < config.num_hidden_layers; ++layer) {
    for (const char* which : {"w1", "w2", "w3"}) {
      const std::string name = names::Expert(layer, expert, which);
      SY_ASSIGN_OR_RETURN(const TensorView v, checkpoint.View(name));
      h.Add(name);
      h.Add(std::string(DTypeName(v.dtype)));
      h.AddInt(v.shape.size());
      for (int64_t d : v.shape) h.AddInt(static_cast<uint64_t>(d));
      h.AddInt(v.nbytes);
      AddSampledBytes(v, h);
    }
  }
  return absl::StrFormat("%016x", h.value());
}

absl::StatusOr<std::string> ExpertWeightsFingerprint(const std::string& checkpoint_dir,
                                                     int expert) {
  SY_ASSIGN_OR_RETURN(auto checkpoint,
                      Checkpoint::Open(checkpoint_dir, WeightSelection::ExpertsOnly({expert})));
  return ExpertWeightsFingerprint(*checkpoint, expert);
}

}  // namespace switchyard
