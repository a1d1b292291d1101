// Chat templates: the Jinja `chat_template` of a Hugging Face
// tokenizer_config.json, rendered exactly as transformers'
// apply_chat_template renders it (jinja2's sandboxed environment with
// trim_blocks=True, lstrip_blocks=True, the loopcontrols extension, a global
// raise_exception(message) and transformers' tojson filter).
//
// No C++ Jinja library is packaged in Debian, so this is a Jinja subset that
// covers what real chat templates use:
//   * tags: {{ expr }}, {% if/elif/else/endif %}, {% for x in xs [if cond] %}
//     ... {% else %} ... {% endfor %} (targets may unpack: `for k, v in
//     d.items()`), {% break %}, {% continue %}, {% set x = expr %},
//     {% set ns.attr = expr %}, {% set x %}...{% endset %},
//     {% macro name(a, b='default') %}...{% endmacro %},
//     {% generation %}...{% endgeneration %} (transformers' marker; rendered
//     as its body), {# comments #};
//   * whitespace: {%- -%} {{- -}} {#- -#}, `+` to keep it, trim_blocks,
//     lstrip_blocks, and the lexer's newline normalisation and dropped final
//     newline (keep_trailing_newline=False);
//   * loop variables: loop.index0, index, revindex, revindex0, first, last,
//     length, previtem, nextitem;
//   * expressions: literals (strings with Python escapes, ints, floats,
//     true/false/none in either case, lists, tuples, dicts), `a if c else b`,
//     and/or/not, == != < <= > >= (chained), in / not in, + - * / // % **,
//     ~, unary -, attribute and item access (dict.key falls back to the key),
//     slicing [a:b:c] on lists and strings (by code point), calls with
//     positional and keyword arguments;
//   * globals: raise_exception(msg), namespace(...), range(...), dict(...);
//   * tests (`is` / `is not`): defined, undefined, none, string, number,
//     integer, float, boolean, true, false, mapping, sequence, iterable,
//     callable, even, odd, divisibleby, eq/equalto/==, ne/!=, lt/<, le/<=,
//     gt/>, ge/>=, in, sameas;
//   * filters: trim, tojson(indent), length/count, upper, lower, capitalize,
//     title, default/d(value, boolean), join(sep), first, last, string, int,
//     float, abs, items, list, reverse, replace, safe, unique, round,
//     map(attribute=)/map(filter), select/reject(test), selectattr/
//     rejectattr(attr, test, ...), sort(attribute=, reverse=);
//   * methods: str.strip/lstrip/rstrip(chars), upper, lower, title,
//     capitalize, startswith, endswith, split(sep, maxsplit), replace(old,
//     new, count), find, count, join; dict.get/items/keys/values.
// Values print as Python's str() does (None, True, 1.5, ['a'] ...). Case
// mapping (upper/lower/title) covers the characters glibc's C.UTF-8 locale
// maps one to one (so "ß".upper() stays "ß"; Python gives "SS").
// Anything outside the subset is a compile or render error naming it. Known
// differences from jinja2, all in constructs chat templates do not use: a
// namespace cannot hold a namespace (cycles), dict keys are strings,
// integers are 64-bit (overflow is an error), lists and dicts nest at most
// 64 deep, and a macro defined inside a loop cannot be called once that
// iteration ended.
//
// Errors are absl::Status: InvalidArgument for syntax errors (with line
// number) and for render errors such as calling something undefined, with
// jinja2's wording where it has one; raise_exception(msg) fails with exactly
// `msg` as the status message (InvalidArgument); ResourceExhausted when a
// render exceeds ChatTemplateLimits.
//
// Thread-safety: set the special tokens before sharing a ChatTemplate; after
// that it is immutable, and Render/RenderChat may be called from many threads
// at once (each render has its own state).
#ifndef SWITCHYARD_CORE_CHAT_TEMPLATE_H_
#define SWITCHYARD_CORE_CHAT_TEMPLATE_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"

namespace switchyard {

// Bounds on one render, so a hostile template cannot hang or exhaust a
// server. Exceeding one fails the render with ResourceExhausted.
struct ChatTemplateLimits {
  int64_t max_source_bytes = 1 << 20;     // template text accepted by Compile
  int max_nesting = 100;                  // nesting of tags and expressions (Compile)
  int64_t max_output_bytes = 4 << 20;     // rendered text, and any one string value
  int64_t max_work_bytes = 64 << 20;      // bytes of all strings built during a render
  int64_t max_steps = 2'000'000;          // evaluated expressions and statements
  int64_t max_loop_iterations = 200'000;  // for-loop iterations, all loops together
  int64_t max_range = 100'000;            // longest range(...)
  int64_t max_render_ms = 1000;           // wall-clock time of one render
  int max_call_depth = 64;                // nested macro calls
  // Nested statement bodies and expressions being evaluated at once, macro
  // calls included: bounds the stack a render uses (roughly 1 KiB a level).
  int max_render_depth = 400;
};

struct ChatTemplateImpl;

class ChatTemplate {
 public:
  // Parses `source` once. InvalidArgument (with the line) on a syntax error or
  // a construct outside the subset.
  static absl::StatusOr<std::unique_ptr<ChatTemplate>> Compile(std::string_view source,
                                                               ChatTemplateLimits limits = {});
  ~ChatTemplate();

  // Renders with `variables` (a JSON object: messages, add_generation_prompt,
  // bos_token, ...) as the template's globals.
  absl::StatusOr<std::string> Render(const nlohmann::ordered_json& variables) const;

  // The special tokens RenderChat passes (transformers passes the tokenizer's
  // special tokens). Unset (default): the variable is undefined.
  void set_bos_token(std::string token) { bos_token_ = std::move(token); }
  void set_eos_token(std::string token) { eos_token_ = std::move(token); }
  const std::optional<std::string>& bos_token() const { return bos_token_; }
  const std::optional<std::string>& eos_token() const { return eos_token_; }

  // Renders a conversation as apply_chat_template does: `messages` is a JSON
  // array of {"role": ..., "content": ...} objects (other fields pass
  // through), plus add_generation_prompt and the special tokens.
  absl::StatusOr<std::string> RenderChat(const nlohmann::ordered_json& messages,
                                         bool add_generation_prompt) const;

 private:
  explicit ChatTemplate(std::unique_ptr<ChatTemplateImpl> impl);
  std::unique_ptr<ChatTemplateImpl> impl_;
  std::optional<std::string> bos_token_;
  std::optional<std::string> eos_token_;
};

// What a tokenizer_config.json says about chat.
struct TokenizerChatConfig {
  // The template: `chat_template` as a string, or the entry named "default"
  // of the named-list form [{"name": ..., "template": ...}, ...]. Empty when
  // the file has none.
  std::string chat_template;
  // bos_token / eos_token, given as strings or {"content": ...} objects.
  std::optional<std::string> bos_token;
  std::optional<std::string> eos_token;
};

// Parses tokenizer_config.json text; InvalidArgument names the bad field.
absl::StatusOr<TokenizerChatConfig> ParseTokenizerChatConfig(std::string_view json_text);

// The chat template of a model: `template_file` when non-empty (its whole
// text is the template), else `model_dir`/tokenizer_config.json's
// chat_template. Special tokens come from `model_dir`'s tokenizer_config.json
// when `model_dir` is non-empty. NotFound when there is no template (naming
// where it looked); InvalidArgument when a file is malformed or the template
// does not compile.
absl::StatusOr<std::unique_ptr<ChatTemplate>> LoadChatTemplate(const std::string& model_dir,
                                                               const std::string& template_file,
                                                               ChatTemplateLimits limits = {});

}  // namespace switchyard

#endif  // SWITCHYARD_CORE_CHAT_TEMPLATE_H_
