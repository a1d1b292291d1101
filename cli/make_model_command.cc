// `switchyard make-model`: a random-weight checkpoint in the hub layout.
#include <cstdio>

#include "absl/strings/ascii.h"
#include "cli/command_specs.h"
#include "cli/commands.h"
#include "core/flags.h"
#include "core/make_model.h"
#include "core/status_macros.h"

namespace switchyard::cli {
namespace {

absl::StatusOr<MakeModelOptions> ParseOptions(const Flags& f) {
  MakeModelOptions o;
  SY_ASSIGN_OR_RETURN(o.preset, f.Required("preset"));
  SY_ASSIGN_OR_RETURN(o.out_dir, f.Required("out"));
  SY_ASSIGN_OR_RETURN(int64_t layers, f.Int("layers", -1));
  o.layers = static_cast<int>(layers);
  SY_ASSIGN_OR_RETURN(int64_t seed, f.Int("seed", 0));
  o.seed = static_cast<uint64_t>(seed);
  SY_ASSIGN_OR_RETURN(int64_t shard_mb, f.Int("shard-size-mb", 2048));
  if (shard_mb < 0) return absl::InvalidArgumentError("--shard-size-mb must be >= 0");
  o.shard_bytes = static_cast<uint64_t>(shard_mb) << 20;
  const std::string dtype = absl::AsciiStrToLower(f.GetOr("dtype", "bf16"));
  if (dtype == "bf16") {
    o.dtype = DType::kBF16;
  } else if (dtype == "f16") {
    o.dtype = DType::kF16;
  } else if (dtype == "f32") {
    o.dtype = DType::kF32;
  } else {
    return absl::InvalidArgumentError("--dtype must be bf16, f16 or f32, got '" + dtype + "'");
  }
  o.tokenizer_dir = f.GetOr("tokenizer-dir", "");
  return o;
}

}  // namespace

int RunMakeModel(const std::vector<std::string>& args) {
  auto flags = Flags::Parse(args, FormFlags("make-model", false));
  absl::StatusOr<MakeModelOptions> options =
      flags.ok() ? ParseOptions(*flags) : absl::StatusOr<MakeModelOptions>(flags.status());
  absl::Status status = options.ok() ? MakeModel(*options) : options.status();
  if (!status.ok()) {
    std::fprintf(stderr, "switchyard make-model: %s\n", status.ToString().c_str());
    return 1;
  }
  std::printf("wrote %s (preset %s)\n", options->out_dir.c_str(), options->preset.c_str());
  return 0;
}

}  // namespace switchyard::cli
