// The model hyper-parameters, read from a Hugging Face config.json.
// A plain value type; thread-compatible.
#ifndef SWITCHYARD_CORE_MODEL_CONFIG_H_
#define SWITCHYARD_CORE_MODEL_CONFIG_H_

#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"

namespace switchyard {

struct ModelConfig {
  int vocab_size = 32000;
  int hidden_size = 4096;         // D
  int intermediate_size = 14336;  // F, per expert
  int num_hidden_layers = 32;     // L
  int num_attention_heads = 32;   // H
  int num_key_value_heads = 8;    // Hkv
  int head_dim = 128;             // hidden_size / heads when config.json omits it
  int num_local_experts = 8;      // E
  int num_experts_per_tok = 2;    // K
  double rope_theta = 1e6;
  double rms_norm_eps = 1e-5;
  int max_position_embeddings = 32768;
  int sliding_window = 0;  // 0: full attention; else attend to the last N positions
  bool tie_word_embeddings = false;
  int bos_token_id = 1;
  int eos_token_id = 2;
  std::string torch_dtype = "bfloat16";

  int q_dim() const { return num_attention_heads * head_dim; }
  int kv_dim() const { return num_key_value_heads * head_dim; }

  // A short stable digest of every field that changes the math, used by the
  // services to check that gateway and experts serve the same model.
  std::string Fingerprint() const;
  // config.json text (HF key names) for this config.
  std::string ToJson() const;
};

// Parses config.json text. Errors name the offending key.
absl::StatusOr<ModelConfig> ParseModelConfig(std::string_view json_text);
// Reads and parses `dir`/config.json; errors name the file.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir);

}  // namespace switchyard

#endif  // SWITCHYARD_CORE_MODEL_CONFIG_H_
