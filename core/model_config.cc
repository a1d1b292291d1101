#include "core/model_config.h"

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"

namespace switchyard {
namespace {

using nlohmann::json;

absl::Status ReadInt(const json& j, const char* key, bool required, int* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required)
      return absl::InvalidArgumentError(absl::StrCat("config.json: missing '", key, "'"));
    return absl::OkStatus();
  }
  if (!it->is_number_integer()) {
    return absl::InvalidArgumentError(absl::StrCat("config.json: '", key, "' must be an integer"));
  }
  const int64_t v = it->get<int64_t>();
  if (v < 0 || v > (int64_t{1} << 31) - 1) {
    return absl::InvalidArgumentError(absl::StrCat("config.json: '", key, "' out of range: ", v));
  }
  *out = static_cast<int>(v);
  return absl::OkStatus();
}

absl::Status ReadDouble(const json& j, const char* key, double* out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_number()) {
    return absl::InvalidArgumentError(absl::StrCat("config.json: '", key, "' must be a number"));
  }
  *out = it->get<double>();
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text) {
  json j = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError("config.json: not a valid JSON object");
  }
  ModelConfig c;
  absl::Status s;
  for (auto [key, field] : {std::pair{"vocab_size", &c.vocab_size},
                            {"hidden_size", &c.hidden_size},
                            {"intermediate_size", &c.intermediate_size},
                            {"num_hidden_layers", &c.num_hidden_layers},
                            {"num_attention_heads", &c.num_attention_heads},
                            {"num_local_experts", &c.num_local_experts},
                            {"num_experts_per_tok", &c.num_experts_per_tok}}) {
    if (!(s = ReadInt(j, key, true, field)).ok()) return s;
  }
  c.num_key_value_heads = c.num_attention_heads;
  if (!(s = ReadInt(j, "num_key_value_heads", false, &c.num_key_value_heads)).ok()) return s;
  c.head_dim = 0;
  if (!(s = ReadInt(j, "head_dim", false, &c.head_dim)).ok()) return s;
  if (!(s = ReadInt(j, "max_position_embeddings", false, &c.max_position_embeddings)).ok())
    return s;
  if (!(s = ReadInt(j, "sliding_window", false, &c.sliding_window)).ok()) return s;
  if (!(s = ReadInt(j, "bos_token_id", false, &c.bos_token_id)).ok()) return s;
  if (!(s = ReadInt(j, "eos_token_id", false, &c.eos_token_id)).ok()) return s;
  if (!(s = ReadDouble(j, "rope_theta", &c.rope_theta)).ok()) return s;
  if (!(s = ReadDouble(j, "rms_norm_eps", &c.rms_norm_eps)).ok()) return s;
  if (auto it = j.find("tie_word_embeddings"); it != j.end() && it->is_boolean()) {
    c.tie_word_embeddings = it->get<bool>();
  }
  if (auto it = j.find("torch_dtype"); it != j.end() && it->is_string()) {
    c.torch_dtype = it->get<std::string>();
  }

  auto positive = [](const char* key, int v) -> absl::Status {
    if (v <= 0)
      return absl::InvalidArgumentError(absl::StrCat("config.json: '", key, "' must be positive"));
    return absl::OkStatus();
  };
  for (auto [key, v] : {std::pair{"vocab_size", c.vocab_size},
                        {"hidden_size", c.hidden_size},
                        {"intermediate_size", c.intermediate_size},
                        {"num_hidden_layers", c.num_hidden_layers},
                        {"num_attention_heads", c.num_attention_heads},
                        {"num_key_value_heads", c.num_key_value_heads},
                        {"num_local_experts", c.num_local_experts},
                        {"num_experts_per_tok", c.num_experts_per_tok}}) {
    if (!(s = positive(key, v)).ok()) return s;
  }
  if (c.head_dim == 0) {
    if (c.hidden_size % c.num_attention_heads != 0) {
      return absl::InvalidArgumentError(
          "config.json: hidden_size is not divisible by num_attention_heads and head_dim is "
          "absent");
    }
    c.head_dim = c.hidden_size / c.num_attention_heads;
  }
  if (c.head_dim % 2 != 0) {
    return absl::InvalidArgumentError("config.json: head_dim must be even for rotary embeddings");
  }
  if (c.num_attention_heads % c.num_key_value_heads != 0) {
    return absl::InvalidArgumentError(
        "config.json: num_attention_heads must be a multiple of num_key_value_heads");
  }
  if (c.num_experts_per_tok > c.num_local_experts) {
    return absl::InvalidArgumentError("config.json: num_experts_per_tok exceeds num_local_experts");
  }
  if (!(c.rope_theta > 0) || !(c.rms_norm_eps > 0)) {
    return absl::InvalidArgumentError("config.json: rope_theta and rms_norm_eps must be positive");
  }
  return c;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir) {
  const std::string path = dir + "/config.json";
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::stringstream ss;
  ss << in.rdbuf();
  auto c = ParseModelConfig(ss.str());
  if (!c.ok()) {
    return absl::Status(c.status().code(), absl::StrCat(path, ": ", c.status().message()));
  }
  return c;
}

std::string ModelConfig::ToJson() const {
  json j = {
      {"architectures", {"MixtralForCausalLM"}},
      {"model_type", "mixtral"},
      {"hidden_act", "silu"},
      {"vocab_size", vocab_size},
      {"hidden_size", hidden_size},
      {"intermediate_size", intermediate_size},
      {"num_hidden_layers", num_hidden_layers},
      {"num_attention_heads", num_attention_heads},
      {"num_key_value_heads", num_key_value_heads},
      {"head_dim", head_dim},
      {"num_local_experts", num_local_experts},
      {"num_experts_per_tok", num_experts_per_tok},
      {"rope_theta", rope_theta},
      {"rms_norm_eps", rms_norm_eps},
      {"max_position_embeddings", max_position_embeddings},
      {"sliding_window", sliding_window > 0 ? json(sliding_window) : json(nullptr)},
      {"tie_word_embeddings", tie_word_embeddings},
      {"bos_token_id", bos_token_id},
      {"eos_token_id", eos_token_id},
      {"torch_dtype", torch_dtype},
  };
  return j.dump(2) + "\n";
}

std::string ModelConfig::Fingerprint() const {
  const std::string canon =
      absl::StrFormat("v%d d%d f%d l%d h%d kv%d hd%d e%d k%d th%.9g eps%.9g sw%d tie%d", vocab_size,
                      hidden_size, intermediate_size, num_hidden_layers, num_attention_heads,
                      num_key_value_heads, head_dim, num_local_experts, num_experts_per_tok,
                      rope_theta, rms_norm_eps, sliding_window, tie_word_embeddings ? 1 : 0);
  uint64_t h = 1469598103934665603ull;  // FNV-1a
  for (unsigned char ch : canon) {
    h ^= ch;
    h *= 1099511628211ull;
  }
  return absl::StrFormat("%016x", h);
}

}  // namespace switchyard
