// Cheap digests of expert weights, so a gateway can check that a remote
// expert shard was loaded from the same checkpoint as its own copy.
//
// The digest covers the model's config fingerprint and, for every layer's
// w1/w2/w3 of one expert: the tensor name, stored dtype and shape, and a
// sample of the stored bytes (first and last 4 KiB plus 64 evenly spaced
// 64-byte windows; small tensors are hashed whole). Sampling keeps it cheap
// (a few page faults per tensor) even for many GB of weights; it detects a
// different checkpoint or dtype, not a single flipped byte in the middle.
// It does not depend on how the checkpoint is split into shard files.
//
// Thread-safety: pure function (opens its own memory map).
#ifndef SWITCHYARD_CORE_FINGERPRINT_H_
#define SWITCHYARD_CORE_FINGERPRINT_H_

#include <string>

#include "absl/status/statusor.h"
#include "core/checkpoint.h"

namespace switchyard {

// 16 lowercase hex digits (FNV-1a 64) for `expert` of the checkpoint in
// `checkpoint_dir`, over all layers. Opens the folder with
// WeightSelection::ExpertsOnly({expert}); errors are Checkpoint::Open's
// (InvalidArgument for an expert out of range).
absl::StatusOr<std::string> ExpertWeightsFingerprint(const std::string& checkpoint_dir, int expert);

// The same digest from an already open checkpoint whose selection includes
// `expert` for every layer (NotFound otherwise).
absl::StatusOr<std::string> ExpertWeightsFingerprint(const Checkpoint& checkpoint, int expert);

}  // namespace switchyard

#endif  // SWITCHYARD_CORE_FINGERPRINT_H_
