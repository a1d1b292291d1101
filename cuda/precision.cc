#include "cuda/precision.h"

#include <string>

#include "absl/strings/str_cat.h"

namespace switchyard::cuda {

const char* PrecisionName(Precision precision) {
  return precision == Precision::kF32 ? "f32" : "bf16";
}

absl::StatusOr<Precision> ParsePrecision(std::string_view name) {
  if (name == "f32" || name == "fp32") return Precision::kF32;
  if (name == "bf16") return Precision::kBF16;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown precision '", std::string(name), "' (expected f32 or bf16)"));
}

}  // namespace switchyard::cuda
