// The Hugging Face hub tensor names of a Mixtral checkpoint.
#ifndef SWITCHYARD_CORE_TENSOR_NAMES_H_
#define SWITCHYARD_CORE_TENSOR_NAMES_H_

#include <string>

#include "absl/strings/str_cat.h"

namespace switchyard::names {

inline std::string Embed() { return "model.embed_tokens.weight"; }
inline std::string FinalNorm() { return "model.norm.weight"; }
inline std::string LmHead() { return "lm_head.weight"; }
inline std::string Layer(int i, const char* rest) {
  return absl::StrCat("model.layers.", i, ".", rest);
}
inline std::string InputNorm(int i) { return Layer(i, "input_layernorm.weight"); }
inline std::string PostAttnNorm(int i) { return Layer(i, "post_attention_layernorm.weight"); }
inline std::string QProj(int i) { return Layer(i, "self_attn.q_proj.weight"); }
inline std::string KProj(int i) { return Layer(i, "self_attn.k_proj.weight"); }
inline std::string VProj(int i) { return Layer(i, "self_attn.v_proj.weight"); }
inline std::string OProj(int i) { return Layer(i, "self_attn.o_proj.weight"); }
inline std::string Gate(int i) { return Layer(i, "block_sparse_moe.gate.weight"); }
// which: "w1" (gate proj, [F, D]), "w3" (up proj, [F, D]), "w2" (down proj, [D, F]).
inline std::string Expert(int i, int e, const char* which) {
  return absl::StrCat("model.layers.", i, ".block_sparse_moe.experts.", e, ".", which, ".weight");
}

}  // namespace switchyard::names

#endif  // SWITCHYARD_CORE_TENSOR_NAMES_H_
