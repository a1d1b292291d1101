#include "core/chat_template.h"

#include <locale.h>
#include <wctype.h>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <functional>
#include <sstream>
#include <unordered_map>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/status_macros.h"
#include "core/utf8.h"

namespace switchyard {
namespace {

// ---------------------------------------------------------------- text ----

// Code points; an invalid byte b becomes U+DC00+b (Python's surrogateescape)
// so that it round-trips through Encode.
std::u32string Decode(std::string_view s) {
  std::u32string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const size_t n = ValidUtf8Len(s, i);
    const auto b = [&](size_t k) { return static_cast<unsigned char>(s[i + k]); };
    if (n == 0) {
      out.push_back(0xDC00 + b(0));
      ++i;
      continue;
    }
    char32_t c;
    if (n == 1) {
      c = b(0);
    } else if (n == 2) {
      c = ((b(0) & 0x1F) << 6) | (b(1) & 0x3F);
    } else if (n == 3) {
      c = ((b(0) & 0x0F) << 12) | ((b(1) & 0x3F) << 6) | (b(2) & 0x3F);
    } else {
      c = ((b(0) & 0x07) << 18) | ((b(1) & 0x3F) << 12) | ((b(2) & 0x3F) << 6) | (b(3) & 0x3F);
    }
    out.push_back(c);
    i += n;
  }
  return out;
}

void AppendUtf8(char32_t c, std::string* out) {
  if (c >= 0xDC80 && c <= 0xDCFF) {
    out->push_back(static_cast<char>(c - 0xDC00));
  } else if (c < 0x80) {
    out->push_back(static_cast<char>(c));
  } else if (c < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (c >> 6)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else if (c < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (c >> 12)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (c >> 18)));
    out->push_back(static_cast<char>(0x80 | ((c >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((c >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (c & 0x3F)));
  }
}

std::string Encode(std::u32string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char32_t c : s) AppendUtf8(c, &out);
  return out;
}

// Python's str.isspace().
bool IsPySpace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

locale_t Utf8Locale() {
  static locale_t loc = newlocale(LC_CTYPE_MASK, "C.UTF-8", static_cast<locale_t>(0));
  return loc;
}

char32_t ToUpper(char32_t c) {
  if (c < 0x80) return (c >= 'a' && c <= 'z') ? c - 32 : c;
  locale_t loc = Utf8Locale();
  return loc ? static_cast<char32_t>(towupper_l(static_cast<wint_t>(c), loc)) : c;
}
char32_t ToLower(char32_t c) {
  if (c < 0x80) return (c >= 'A' && c <= 'Z') ? c + 32 : c;
  locale_t loc = Utf8Locale();
  return loc ? static_cast<char32_t>(towlower_l(static_cast<wint_t>(c), loc)) : c;
}
bool IsCased(char32_t c) { return ToUpper(c) != c || ToLower(c) != c; }

std::string MapCase(std::string_view s, bool upper) {
  std::u32string u = Decode(s);
  for (char32_t& c : u) c = upper ? ToUpper(c) : ToLower(c);
  return Encode(u);
}

// Python's str.title(): a cased character after an uncased one is upper.
std::string PyTitle(std::string_view s) {
  std::u32string u = Decode(s);
  bool prev_cased = false;
  for (char32_t& c : u) {
    const bool cased = IsCased(c);
    c = prev_cased ? ToLower(c) : ToUpper(c);
    prev_cased = cased;
  }
  return Encode(u);
}

std::string PyCapitalize(std::string_view s) {
  std::u32string u = Decode(s);
  for (size_t i = 0; i < u.size(); ++i) u[i] = i == 0 ? ToUpper(u[i]) : ToLower(u[i]);
  return Encode(u);
}

// Jinja's `title` filter: words start after runs of - whitespace ( { [ <.
std::string JinjaTitle(std::string_view s) {
  std::u32string u = Decode(s);
  bool start = true;
  for (char32_t& c : u) {
    const bool sep = IsPySpace(c) || c == '-' || c == '(' || c == '{' || c == '[' || c == '<';
    if (sep) {
      start = true;
      continue;
    }
    c = start ? ToUpper(c) : ToLower(c);
    start = false;
  }
  return Encode(u);
}

// Python's strip family; `chars` nullopt strips whitespace.
std::string PyStrip(std::string_view s, const std::optional<std::string>& chars, bool left,
                    bool right) {
  std::u32string u = Decode(s);
  std::u32string set = chars ? Decode(*chars) : std::u32string();
  auto strip = [&](char32_t c) {
    return chars ? set.find(c) != std::u32string::npos : IsPySpace(c);
  };
  size_t b = 0, e = u.size();
  if (left) {
    while (b < e && strip(u[b])) ++b;
  }
  if (right) {
    while (e > b && strip(u[e - 1])) --e;
  }
  return Encode(std::u32string_view(u).substr(b, e - b));
}

std::string Hex(uint32_t v, int digits) {
  static const char kDigits[] = "0123456789abcdef";
  std::string out(digits, '0');
  for (int i = digits - 1; i >= 0; --i, v >>= 4) out[i] = kDigits[v & 15];
  return out;
}

// Python's repr() of a str.
std::string PyReprString(std::string_view s) {
  const bool has_single = s.find('\'') != std::string_view::npos;
  const bool has_double = s.find('"') != std::string_view::npos;
  const char quote = has_single && !has_double ? '"' : '\'';
  std::string out(1, quote);
  for (char32_t c : Decode(s)) {
    if (c == static_cast<char32_t>(quote) || c == '\\') {
      out.push_back('\\');
      out.push_back(static_cast<char>(c));
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || (c >= 0x7F && c <= 0xA0) || c == 0xAD) {
      out += "\\x" + Hex(c, 2);
    } else if ((c >= 0xDC80 && c <= 0xDCFF) || (c >= 0x2000 && c <= 0x200F) ||
               (c >= 0x2028 && c <= 0x202F) || (c >= 0x205F && c <= 0x206F) || c == 0x3000 ||
               c == 0xFEFF) {
      out += "\\u" + Hex(c, 4);
    } else {
      AppendUtf8(c, &out);
    }
  }
  out.push_back(quote);
  return out;
}

// Python's repr() of a float.
std::string PyFloat(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::scientific);
  std::string sci(buf, r.ptr);
  // sci: [-]d[.ddd]e[+-]xx
  bool neg = sci[0] == '-';
  if (neg) sci.erase(0, 1);
  const size_t e = sci.find('e');
  std::string digits = sci.substr(0, e);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  const int exp = std::stoi(sci.substr(e + 1));
  std::string out = neg ? "-" : "";
  if (exp >= -5 + 1 && exp < 16) {
    if (exp >= 0) {
      if (static_cast<int>(digits.size()) <= exp + 1) {
        out += digits + std::string(exp + 1 - digits.size(), '0') + ".0";
      } else {
        out += digits.substr(0, exp + 1) + "." + digits.substr(exp + 1);
      }
    } else {
      out += "0." + std::string(-exp - 1, '0') + digits;
    }
  } else {
    out += digits.substr(0, 1);
    if (digits.size() > 1) out += "." + digits.substr(1);
    out += exp < 0 ? "e-" : "e+";
    const int a = std::abs(exp);
    out += (a < 10 ? "0" : "") + std::to_string(a);
  }
  return out;
}

// ---------------------------------------------------------------- values --

struct Value;
using ValueList = std::vector<Value>;
struct Dict;
class Context;
struct Args;
using Fn = std::function<absl::StatusOr<Value>(Context&, Args&)>;
struct Callable {
  std::string name;
  Fn fn;
};

struct Value {
  enum Kind { kUndefined, kNone, kBool, kInt, kFloat, kString, kList, kDict, kCallable };
  Kind kind = kUndefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;  // kString; for kUndefined the error to give when it is used
  std::shared_ptr<ValueList> list;
  bool tuple = false;
  std::shared_ptr<Dict> dict;
  bool is_namespace = false;
  std::shared_ptr<Callable> fn;
  int nest = 0;  // kList: how deeply lists and dicts nest inside it, itself included

  static Value Undef(std::string why) {
    Value v;
    v.s = std::move(why);
    return v;
  }
  static Value None() {
    Value v;
    v.kind = kNone;
    return v;
  }
  static Value Bool(bool x) {
    Value v;
    v.kind = kBool;
    v.b = x;
    return v;
  }
  static Value Int(int64_t x) {
    Value v;
    v.kind = kInt;
    v.i = x;
    return v;
  }
  static Value Float(double x) {
    Value v;
    v.kind = kFloat;
    v.f = x;
    return v;
  }
  static Value Str(std::string x) {
    Value v;
    v.kind = kString;
    v.s = std::move(x);
    return v;
  }
  static Value List(ValueList items, bool tuple = false);
  static Value MakeDict(std::shared_ptr<Dict> d) {
    Value v;
    v.kind = kDict;
    v.dict = std::move(d);
    return v;
  }
  static Value Func(std::string name, Fn fn) {
    Value v;
    v.kind = kCallable;
    v.fn = std::make_shared<Callable>(Callable{std::move(name), std::move(fn)});
    return v;
  }
  bool undefined() const { return kind == kUndefined; }
  bool numeric() const { return kind == kBool || kind == kInt || kind == kFloat; }
  double AsDouble() const { return kind == kFloat ? f : kind == kBool ? (b ? 1 : 0) : i; }
  int64_t AsInt() const { return kind == kBool ? (b ? 1 : 0) : i; }
};

// How deeply lists and dicts nest in `v` (0 for scalars). Bounded
// (CheckNest) so that printing, comparing and freeing values cannot recurse
// without limit.
int Nest(const Value& v);

struct Dict {
  std::vector<std::pair<std::string, Value>> items;
  int nest = 1;  // grows only, an upper bound after replacements
  const Value* Find(std::string_view key) const {
    for (const auto& [k, v] : items) {
      if (k == key) return &v;
    }
    return nullptr;
  }
  void Set(const std::string& key, Value v) {
    nest = std::max(nest, 1 + Nest(v));
    for (auto& [k, old] : items) {
      if (k == key) {
        old = std::move(v);
        return;
      }
    }
    items.emplace_back(key, std::move(v));
  }
};

Value NewDict() { return Value::MakeDict(std::make_shared<Dict>()); }

int Nest(const Value& v) {
  if (v.kind == Value::kDict) return v.dict->nest;
  return v.kind == Value::kList ? v.nest : 0;
}

Value Value::List(ValueList items, bool tuple) {
  Value v;
  v.kind = kList;
  v.nest = 1;
  for (const Value& x : items) v.nest = std::max(v.nest, 1 + Nest(x));
  v.list = std::make_shared<ValueList>(std::move(items));
  v.tuple = tuple;
  return v;
}

constexpr int kMaxValueNest = 64;

absl::Status CheckNest(const Value& v) {
  if (Nest(v) > kMaxValueNest) {
    return absl::ResourceExhaustedError(absl::StrCat("chat template exceeded its limit of ",
                                                     kMaxValueNest, " nested lists and dicts"));
  }
  return absl::OkStatus();
}

struct Args {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
  // Positional `i` or keyword `name`, else nullptr.
  const Value* Get(size_t i, std::string_view name) const {
    if (i < pos.size()) return &pos[i];
    for (const auto& [k, v] : kw) {
      if (k == name) return &v;
    }
    return nullptr;
  }
};

std::string TypeName(const Value& v) {
  switch (v.kind) {
    case Value::kUndefined:
      return "Undefined";
    case Value::kNone:
      return "NoneType";
    case Value::kBool:
      return "bool";
    case Value::kInt:
      return "int";
    case Value::kFloat:
      return "float";
    case Value::kString:
      return "str";
    case Value::kList:
      return v.tuple ? "tuple" : "list";
    case Value::kDict:
      return v.is_namespace ? "Namespace" : "dict";
    case Value::kCallable:
      return "function";
  }
  return "object";
}

// jinja2's object_type_repr: "None" or "dict object".
std::string ObjectRepr(const Value& v) {
  return v.kind == Value::kNone ? "None" : TypeName(v) + " object";
}

absl::Status RenderError(std::string message) {
  return absl::InvalidArgumentError(std::move(message));
}

// Python's integers are unbounded; these are 64-bit.
absl::Status IntegerOverflow() {
  return RenderError("integer overflow (integers are 64-bit here)");
}

absl::StatusOr<Value> FloatToInt(double d) {
  const double t = std::trunc(d);
  if (!(t >= -9223372036854775808.0 && t < 9223372036854775808.0)) return IntegerOverflow();
  return Value::Int(static_cast<int64_t>(t));
}

absl::Status UndefinedError(const Value& v) {
  return RenderError(v.s.empty() ? "undefined value" : v.s);
}

bool Truthy(const Value& v) {
  switch (v.kind) {
    case Value::kUndefined:
    case Value::kNone:
      return false;
    case Value::kBool:
      return v.b;
    case Value::kInt:
      return v.i != 0;
    case Value::kFloat:
      return v.f != 0;
    case Value::kString:
      return !v.s.empty();
    case Value::kList:
      return !v.list->empty();
    case Value::kDict:
      return v.is_namespace || !v.dict->items.empty();
    case Value::kCallable:
      return true;
  }
  return false;
}

std::string Repr(const Value& v);

// Python's str().
std::string Str(const Value& v) {
  switch (v.kind) {
    case Value::kUndefined:
      return "";
    case Value::kString:
      return v.s;
    default:
      return Repr(v);
  }
}

std::string Repr(const Value& v) {
  switch (v.kind) {
    case Value::kUndefined:
      return "";
    case Value::kNone:
      return "None";
    case Value::kBool:
      return v.b ? "True" : "False";
    case Value::kInt:
      return std::to_string(v.i);
    case Value::kFloat:
      return PyFloat(v.f);
    case Value::kString:
      return PyReprString(v.s);
    case Value::kList: {
      std::string out = v.tuple ? "(" : "[";
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k) out += ", ";
        out += Repr((*v.list)[k]);
      }
      if (v.tuple && v.list->size() == 1) out += ",";
      out += v.tuple ? ")" : "]";
      return out;
    }
    case Value::kDict: {
      if (v.is_namespace) return "<Namespace>";
      std::string out = "{";
      bool first = true;
      for (const auto& [k, x] : v.dict->items) {
        if (!first) out += ", ";
        first = false;
        out += PyReprString(k) + ": " + Repr(x);
      }
      return out + "}";
    }
    case Value::kCallable:
      return "<function " + v.fn->name + ">";
  }
  return "";
}

bool Equal(const Value& a, const Value& b) {
  if (a.numeric() && b.numeric()) {
    if (a.kind == Value::kFloat || b.kind == Value::kFloat) return a.AsDouble() == b.AsDouble();
    return a.AsInt() == b.AsInt();
  }
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Value::kUndefined:
    case Value::kNone:
      return true;
    case Value::kString:
      return a.s == b.s;
    case Value::kList:
      if (a.tuple != b.tuple || a.list->size() != b.list->size()) return false;
      for (size_t k = 0; k < a.list->size(); ++k) {
        if (!Equal((*a.list)[k], (*b.list)[k])) return false;
      }
      return true;
    case Value::kDict:
      if (a.dict == b.dict) return true;
      if (a.is_namespace || b.is_namespace) return false;
      if (a.dict->items.size() != b.dict->items.size()) return false;
      for (const auto& [k, x] : a.dict->items) {
        const Value* y = b.dict->Find(k);
        if (y == nullptr || !Equal(x, *y)) return false;
      }
      return true;
    case Value::kCallable:
      return a.fn == b.fn;
    default:
      return false;
  }
}

// Python's ordering; TypeError wording for incomparable types.
absl::StatusOr<int> Compare(const Value& a, const Value& b, std::string_view op) {
  if (a.undefined()) return UndefinedError(a);
  if (b.undefined()) return UndefinedError(b);
  if (a.numeric() && b.numeric()) {
    const double x = a.AsDouble(), y = b.AsDouble();
    if (a.kind != Value::kFloat && b.kind != Value::kFloat) {
      return a.AsInt() < b.AsInt() ? -1 : a.AsInt() > b.AsInt() ? 1 : 0;
    }
    return x < y ? -1 : x > y ? 1 : 0;
  }
  if (a.kind == Value::kString && b.kind == Value::kString) {
    // Byte order of UTF-8 equals code point order.
    return a.s < b.s ? -1 : a.s > b.s ? 1 : 0;
  }
  if (a.kind == Value::kList && b.kind == Value::kList && a.tuple == b.tuple) {
    const size_t n = std::min(a.list->size(), b.list->size());
    for (size_t k = 0; k < n; ++k) {
      if (Equal((*a.list)[k], (*b.list)[k])) continue;
      return Compare((*a.list)[k], (*b.list)[k], op);
    }
    return a.list->size() < b.list->size() ? -1 : a.list->size() > b.list->size() ? 1 : 0;
  }
  return RenderError(absl::StrCat("'", std::string(op), "' not supported between instances of '",
                                  TypeName(a), "' and '", TypeName(b), "'"));
}

// Python's json.dumps(ensure_ascii=False), as transformers' tojson filter.
absl::Status ToJson(const Value& v, int indent, int level, int64_t limit, std::string* out) {
  if (static_cast<int64_t>(out->size()) > limit) {
    return absl::ResourceExhaustedError(
        absl::StrCat("chat template exceeded its limit of ", limit, " bytes in one value"));
  }
  auto newline = [&](int lvl) {
    if (indent >= 0) {
      out->push_back('\n');
      out->append(static_cast<size_t>(indent) * lvl, ' ');
    }
  };
  switch (v.kind) {
    case Value::kUndefined:
      return RenderError("Object of type Undefined is not JSON serializable");
    case Value::kNone:
      *out += "null";
      return absl::OkStatus();
    case Value::kBool:
      *out += v.b ? "true" : "false";
      return absl::OkStatus();
    case Value::kInt:
      *out += std::to_string(v.i);
      return absl::OkStatus();
    case Value::kFloat:
      if (std::isnan(v.f)) {
        *out += "NaN";
      } else if (std::isinf(v.f)) {
        *out += v.f > 0 ? "Infinity" : "-Infinity";
      } else {
        *out += PyFloat(v.f);
      }
      return absl::OkStatus();
    case Value::kString: {
      out->push_back('"');
      for (unsigned char c : v.s) {
        switch (c) {
          case '"':
            *out += "\\\"";
            break;
          case '\\':
            *out += "\\\\";
            break;
          case '\n':
            *out += "\\n";
            break;
          case '\r':
            *out += "\\r";
            break;
          case '\t':
            *out += "\\t";
            break;
          case '\b':
            *out += "\\b";
            break;
          case '\f':
            *out += "\\f";
            break;
          default:
            if (c < 0x20) {
              *out += "\\u" + Hex(c, 4);
            } else {
              out->push_back(static_cast<char>(c));
            }
        }
      }
      out->push_back('"');
      return absl::OkStatus();
    }
    case Value::kList: {
      if (v.list->empty()) {
        *out += "[]";
        return absl::OkStatus();
      }
      out->push_back('[');
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k) *out += indent >= 0 ? "," : ", ";
        newline(level + 1);
        SY_RETURN_IF_ERROR(ToJson((*v.list)[k], indent, level + 1, limit, out));
      }
      newline(level);
      out->push_back(']');
      return absl::OkStatus();
    }
    case Value::kDict: {
      if (v.is_namespace) return RenderError("Object of type Namespace is not JSON serializable");
      if (v.dict->items.empty()) {
        *out += "{}";
        return absl::OkStatus();
      }
      out->push_back('{');
      bool first = true;
      for (const auto& [k, x] : v.dict->items) {
        if (!first) *out += indent >= 0 ? "," : ", ";
        first = false;
        newline(level + 1);
        SY_RETURN_IF_ERROR(ToJson(Value::Str(k), indent, level + 1, limit, out));
        *out += ": ";
        SY_RETURN_IF_ERROR(ToJson(x, indent, level + 1, limit, out));
      }
      newline(level);
      out->push_back('}');
      return absl::OkStatus();
    }
    case Value::kCallable:
      return RenderError("Object of type function is not JSON serializable");
  }
  return absl::OkStatus();
}

Value FromJson(const nlohmann::ordered_json& j) {
  switch (j.type()) {
    case nlohmann::ordered_json::value_t::null:
      return Value::None();
    case nlohmann::ordered_json::value_t::boolean:
      return Value::Bool(j.get<bool>());
    case nlohmann::ordered_json::value_t::number_integer:
      return Value::Int(j.get<int64_t>());
    case nlohmann::ordered_json::value_t::number_unsigned:
      return j.get<uint64_t>() > static_cast<uint64_t>(INT64_MAX)
                 ? Value::Float(j.get<double>())
                 : Value::Int(static_cast<int64_t>(j.get<uint64_t>()));
    case nlohmann::ordered_json::value_t::number_float:
      return Value::Float(j.get<double>());
    case nlohmann::ordered_json::value_t::string:
      return Value::Str(j.get<std::string>());
    case nlohmann::ordered_json::value_t::array: {
      ValueList items;
      for (const auto& x : j) items.push_back(FromJson(x));
      return Value::List(std::move(items));
    }
    case nlohmann::ordered_json::value_t::object: {
      auto d = std::make_shared<Dict>();
      for (auto it = j.begin(); it != j.end(); ++it) d->Set(it.key(), FromJson(it.value()));
      return Value::MakeDict(d);
    }
    default:
      return Value::None();
  }
}

// Whether `v` is or contains a namespace (or loop object); counts the values
// it looks at in `visited`. Values nest at most kMaxValueNest deep, and
// namespaces hold none, so this ends.
bool HoldsNamespace(const Value& v, int64_t* visited) {
  ++*visited;
  if (v.kind == Value::kDict) {
    if (v.is_namespace) return true;
    for (const auto& [k, x] : v.dict->items) {
      if (HoldsNamespace(x, visited)) return true;
    }
  } else if (v.kind == Value::kList) {
    for (const Value& x : *v.list) {
      if (HoldsNamespace(x, visited)) return true;
    }
  }
  return false;
}

// ---------------------------------------------------------------- lexer ---

struct Tok {
  enum Kind { kName, kInt, kFloat, kString, kOp, kEnd };
  Kind kind = kEnd;
  std::string text;  // name, operator, or decoded string
  int64_t i = 0;
  double f = 0;
  int line = 1;
};

struct Piece {
  enum Kind { kText, kVar, kBlock };
  Kind kind;
  std::string text;
  std::vector<Tok> toks;
  int line;
};

absl::Status SyntaxError(int line, std::string_view what) {
  return absl::InvalidArgumentError(
      absl::StrCat("chat template syntax error (line ", line, "): ", std::string(what)));
}

// jinja2 lexes string literals with Python's unicode-escape.
absl::StatusOr<std::string> Unescape(std::string_view raw, int line) {
  std::string out;
  for (size_t k = 0; k < raw.size(); ++k) {
    if (raw[k] != '\\' || k + 1 == raw.size()) {
      out.push_back(raw[k]);
      continue;
    }
    const char c = raw[++k];
    auto hex = [&](int n) -> absl::StatusOr<uint32_t> {
      if (k + n >= raw.size()) return SyntaxError(line, "truncated \\x/\\u escape");
      uint32_t v = 0;
      for (int d = 1; d <= n; ++d) {
        const char h = raw[k + d];
        v <<= 4;
        if (h >= '0' && h <= '9') {
          v |= h - '0';
        } else if (h >= 'a' && h <= 'f') {
          v |= h - 'a' + 10;
        } else if (h >= 'A' && h <= 'F') {
          v |= h - 'A' + 10;
        } else {
          return SyntaxError(line, "bad \\x/\\u escape");
        }
      }
      k += n;
      return v;
    };
    // Python's one-character escapes: \\ \' \" \a \b \f \n \r \t \v.
    static constexpr std::string_view kEscaped = "\\'\"abfnrtv";
    static constexpr std::string_view kMeaning = "\\'\"\a\b\f\n\r\t\v";
    if (const size_t simple = kEscaped.find(c); simple != std::string_view::npos) {
      out.push_back(kMeaning[simple]);
      continue;
    }
    switch (c) {
      case '\n':  // a line continuation
        break;
      case 'x':
      case 'u':
      case 'U': {
        SY_ASSIGN_OR_RETURN(uint32_t v, hex(c == 'x' ? 2 : c == 'u' ? 4 : 8));
        if (v > 0x10FFFF) return SyntaxError(line, "\\U escape out of range");
        AppendUtf8(v, &out);
        break;
      }
      default:
        if (c >= '0' && c <= '7') {
          uint32_t v = c - '0';
          for (int d = 0; d < 2 && k + 1 < raw.size() && raw[k + 1] >= '0' && raw[k + 1] <= '7';
               ++d) {
            v = v * 8 + (raw[++k] - '0');
          }
          AppendUtf8(v, &out);
        } else {
          out.push_back('\\');
          out.push_back(c);
        }
    }
  }
  return out;
}

// Splits the normalized source into text and tags, applying whitespace
// control, trim_blocks and lstrip_blocks the way jinja2's lexer does.
class Lexer {
 public:
  explicit Lexer(std::string src) : src_(std::move(src)) {}

  absl::StatusOr<std::vector<Piece>> Run() {
    std::vector<Piece> out;
    bool line_starting = true;
    while (pos_ < src_.size()) {
      size_t tag = pos_;
      while (true) {
        tag = src_.find('{', tag);
        if (tag == std::string::npos || tag + 1 >= src_.size()) {
          tag = std::string::npos;
          break;
        }
        const char c = src_[tag + 1];
        if (c == '{' || c == '%' || c == '#') break;
        ++tag;
      }
      if (tag == std::string::npos) {
        AddText(src_.substr(pos_), &out);
        break;
      }
      std::string text = src_.substr(pos_, tag - pos_);
      CountLines(pos_, tag);
      const char type = src_[tag + 1];
      char sign = tag + 2 < src_.size() ? src_[tag + 2] : 0;
      if (sign != '-' && sign != '+') sign = 0;
      if (sign == '-') {
        text = PyStrip(text, std::nullopt, false, true);
      } else if (sign != '+' && type != '{') {
        const size_t nl = text.rfind('\n');
        const size_t l_pos = nl == std::string::npos ? 0 : nl + 1;
        if (l_pos > 0 || line_starting) {
          const std::string tail = text.substr(l_pos);
          if (!tail.empty() && PyStrip(tail, std::nullopt, true, true).empty()) {
            text.resize(l_pos);
          }
        }
      }
      AddText(std::move(text), &out);
      pos_ = tag + 2 + (sign ? 1 : 0);
      if (type == '#') {
        SY_RETURN_IF_ERROR(SkipComment());
      } else {
        SY_RETURN_IF_ERROR(LexTag(type == '{' ? Piece::kVar : Piece::kBlock, &out));
      }
      line_starting = pos_ > 0 && src_[pos_ - 1] == '\n' && last_end_consumed_newline_;
    }
    return out;
  }

 private:
  void CountLines(size_t from, size_t to) {
    line_ += static_cast<int>(std::count(src_.begin() + from, src_.begin() + to, '\n'));
  }
  void AddText(std::string text, std::vector<Piece>* out) {
    if (text.empty()) return;
    out->push_back(Piece{Piece::kText, std::move(text), {}, line_});
  }
  // After a tag's closing delimiter: `-` strips all whitespace, a plain block
  // or comment end drops one newline (trim_blocks), `+` keeps everything.
  void AfterEnd(char sign, bool block_like) {
    const size_t start = pos_;
    if (sign == '-') {
      while (pos_ < src_.size()) {
        const size_t n = std::max<size_t>(ValidUtf8Len(src_, pos_), 1);
        std::u32string c = Decode(std::string_view(src_).substr(pos_, n));
        if (c.size() != 1 || !IsPySpace(c[0])) break;
        pos_ += n;
      }
    } else if (sign != '+' && block_like && pos_ < src_.size() && src_[pos_] == '\n') {
      ++pos_;
    }
    last_end_consumed_newline_ = pos_ > start;
    CountLines(start, pos_);
  }

  absl::Status SkipComment() {
    const int line = line_;
    const size_t end = src_.find("#}", pos_);
    if (end == std::string::npos) return SyntaxError(line, "missing end of comment tag");
    const char sign =
        end > pos_ && (src_[end - 1] == '-' || src_[end - 1] == '+') ? src_[end - 1] : 0;
    CountLines(pos_, end);
    pos_ = end + 2;
    AfterEnd(sign, true);
    return absl::OkStatus();
  }

  absl::Status LexTag(Piece::Kind kind, std::vector<Piece>* out) {
    Piece piece{kind, "", {}, line_};
    int depth = 0;
    const char close = kind == Piece::kVar ? '}' : '%';
    while (true) {
      while (pos_ < src_.size() && (src_[pos_] == ' ' || src_[pos_] == '\t' || src_[pos_] == '\n' ||
                                    src_[pos_] == '\r')) {
        if (src_[pos_] == '\n') ++line_;
        ++pos_;
      }
      if (pos_ >= src_.size()) {
        return SyntaxError(piece.line, kind == Piece::kVar ? "unexpected end of template, "
                                                             "expected '}}'"
                                                           : "unexpected end of template, "
                                                             "expected '%}'");
      }
      if (depth == 0) {
        char sign = 0;
        size_t at = pos_;
        if ((src_[at] == '-' || src_[at] == '+') && at + 2 < src_.size() + 0 &&
            src_[at + 1] == close && src_[at + 2] == '}') {
          sign = src_[at];
          ++at;
        }
        if (at + 1 < src_.size() && src_[at] == close && src_[at + 1] == '}') {
          pos_ = at + 2;
          AfterEnd(sign, kind == Piece::kBlock);
          Tok end;
          end.line = line_;
          piece.toks.push_back(end);
          out->push_back(std::move(piece));
          return absl::OkStatus();
        }
      }
      Tok t;
      t.line = line_;
      const char c = src_[pos_];
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t e = pos_;
        while (e < src_.size() &&
               (std::isalnum(static_cast<unsigned char>(src_[e])) || src_[e] == '_')) {
          ++e;
        }
        t.kind = Tok::kName;
        t.text = src_.substr(pos_, e - pos_);
        pos_ = e;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        size_t e = pos_;
        while (e < src_.size() &&
               (std::isdigit(static_cast<unsigned char>(src_[e])) || src_[e] == '_')) {
          ++e;
        }
        bool is_float = false;
        if (e + 1 < src_.size() && src_[e] == '.' &&
            std::isdigit(static_cast<unsigned char>(src_[e + 1]))) {
          is_float = true;
          ++e;
          while (e < src_.size() &&
                 (std::isdigit(static_cast<unsigned char>(src_[e])) || src_[e] == '_')) {
            ++e;
          }
        }
        if (e < src_.size() && (src_[e] == 'e' || src_[e] == 'E')) {
          size_t x = e + 1;
          if (x < src_.size() && (src_[x] == '+' || src_[x] == '-')) ++x;
          if (x < src_.size() && std::isdigit(static_cast<unsigned char>(src_[x]))) {
            is_float = true;
            e = x;
            while (e < src_.size() && std::isdigit(static_cast<unsigned char>(src_[e]))) ++e;
          }
        }
        std::string digits = src_.substr(pos_, e - pos_);
        digits.erase(std::remove(digits.begin(), digits.end(), '_'), digits.end());
        if (is_float) {
          t.kind = Tok::kFloat;
          t.f = std::strtod(digits.c_str(), nullptr);
        } else {
          t.kind = Tok::kInt;
          auto r = std::from_chars(digits.data(), digits.data() + digits.size(), t.i);
          if (r.ec != std::errc()) return SyntaxError(line_, "integer literal too large");
        }
        pos_ = e;
      } else if (c == '\'' || c == '"') {
        size_t e = pos_ + 1;
        while (e < src_.size() && src_[e] != c) {
          if (src_[e] == '\\') ++e;
          ++e;
        }
        if (e >= src_.size()) return SyntaxError(line_, "unterminated string literal");
        t.kind = Tok::kString;
        SY_ASSIGN_OR_RETURN(t.text,
                            Unescape(std::string_view(src_).substr(pos_ + 1, e - pos_ - 1), line_));
        CountLines(pos_, e);
        pos_ = e + 1;
      } else {
        static const char* const kOps[] = {"//", "**", "==", "!=", "<=", ">=", "+", "-", "*",
                                           "/",  "%",  "~",  "(",  ")",  "[",  "]", "{", "}",
                                           ",",  ".",  ":",  "|",  "=",  "<",  ">"};
        bool found = false;
        for (const char* op : kOps) {
          const size_t n = std::char_traits<char>::length(op);
          if (src_.compare(pos_, n, op) == 0) {
            t.kind = Tok::kOp;
            t.text = op;
            pos_ += n;
            found = true;
            break;
          }
        }
        if (!found)
          return SyntaxError(line_, absl::StrCat("unexpected char '", std::string(1, c), "'"));
        if (t.text == "(" || t.text == "[" || t.text == "{") ++depth;
        if (t.text == ")" || t.text == "]" || t.text == "}") {
          if (depth == 0) return SyntaxError(line_, absl::StrCat("unexpected '", t.text, "'"));
          --depth;
        }
      }
      piece.toks.push_back(std::move(t));
    }
  }

  std::string src_;
  size_t pos_ = 0;
  int line_ = 1;
  bool last_end_consumed_newline_ = false;
};

// ---------------------------------------------------------------- AST -----

struct Expr {
  enum Kind {
    kLiteral,
    kName,
    kList,
    kTuple,
    kDict,
    kAttr,
    kItem,
    kSlice,
    kCall,
    kFilter,
    kTest,
    kNeg,
    kPos,
    kNot,
    kAnd,
    kOr,
    kBinary,
    kCompare,
    kCond,
    kConcat
  };
  Kind kind;
  int line = 1;
  Value literal;
  std::string name;                         // name, attribute, filter, test, operator
  std::vector<std::unique_ptr<Expr>> kids;  // operands; nullptr for absent slice parts
  std::vector<std::pair<std::string, std::unique_ptr<Expr>>> kwargs;
  std::vector<std::string> ops;  // kCompare
  bool negated = false;          // kTest
};
using ExprPtr = std::unique_ptr<Expr>;

struct Stmt;
using Body = std::vector<Stmt>;

struct Stmt {
  enum Kind { kText, kOutput, kIf, kFor, kSet, kSetBlock, kMacro, kBreak, kContinue, kBlock };
  Kind kind;
  int line = 1;
  std::string text;  // kText; macro name
  ExprPtr expr;      // output, for iterable, set value
  std::vector<ExprPtr> conds;
  std::vector<Body> bodies;  // if branches; for/set-block/macro/block body at [0]
  Body else_body;
  std::vector<std::string> targets;  // for / set names
  ExprPtr target_obj;                // set ns.attr: the object
  std::string target_attr;
  ExprPtr filter;  // for ... if filter
  std::vector<std::string> params;
  std::vector<ExprPtr> defaults;  // per param, nullptr when none
};

Stmt NewStmt(Stmt::Kind kind) {
  Stmt s;
  s.kind = kind;
  return s;
}

// ---------------------------------------------------------------- parser --

class Parser {
 public:
  Parser(std::vector<Piece> pieces, int max_nesting)
      : pieces_(std::move(pieces)), max_nesting_(max_nesting) {}

  absl::StatusOr<Body> ParseTemplate() {
    std::string ended_by;
    SY_ASSIGN_OR_RETURN(Body body, ParseBody({}, &ended_by));
    return body;
  }

 private:
  // --- statements ---
  const Tok& Cur() const { return (*toks_)[ti_]; }
  const Tok& Peek(size_t k = 1) const {
    return ti_ + k < toks_->size() ? (*toks_)[ti_ + k] : toks_->back();
  }
  bool IsOp(std::string_view op) const { return Cur().kind == Tok::kOp && Cur().text == op; }
  bool IsName(std::string_view n) const { return Cur().kind == Tok::kName && Cur().text == n; }
  // == != < <= > >= (comparisons, and tests spelled as operators).
  bool IsCompareOp() const {
    return IsOp("==") || IsOp("!=") || IsOp("<") || IsOp("<=") || IsOp(">") || IsOp(">=");
  }
  bool AtEnd() const { return Cur().kind == Tok::kEnd; }
  absl::Status Expect(std::string_view op) {
    if (!IsOp(op)) return Unexpected(absl::StrCat("expected '", std::string(op), "'"));
    ++ti_;
    return absl::OkStatus();
  }
  absl::Status Unexpected(std::string_view expected) const {
    const Tok& t = Cur();
    std::string got = t.kind == Tok::kEnd      ? "end of statement block"
                      : t.kind == Tok::kString ? "string"
                      : t.kind == Tok::kInt || t.kind == Tok::kFloat
                          ? "number"
                          : absl::StrCat("'", t.text, "'");
    return SyntaxError(t.line, absl::StrCat("unexpected ", got, ", ", std::string(expected)));
  }
  absl::Status ExpectEnd() {
    if (!AtEnd()) return Unexpected("expected end of statement block");
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> ExpectName() {
    if (Cur().kind != Tok::kName) return Unexpected("expected a name");
    return (*toks_)[ti_++].text;
  }

  // Parses statements until a block tag whose name is in `ends` (consumed;
  // its tokens are left current), or the end of the template when `ends` is
  // empty.
  absl::StatusOr<Body> ParseBody(std::vector<std::string> ends, std::string* ended_by) {
    if (++nesting_ > max_nesting_) return SyntaxError(line_, "template nests too deeply");
    Body body;
    while (pi_ < pieces_.size()) {
      Piece& p = pieces_[pi_++];
      line_ = p.line;
      if (p.kind == Piece::kText) {
        Stmt s = NewStmt(Stmt::kText);
        s.line = p.line;
        s.text = std::move(p.text);
        body.push_back(std::move(s));
        continue;
      }
      toks_ = &p.toks;
      ti_ = 0;
      if (p.kind == Piece::kVar) {
        Stmt s = NewStmt(Stmt::kOutput);
        s.line = p.line;
        SY_ASSIGN_OR_RETURN(s.expr, ParseTuple(true));
        SY_RETURN_IF_ERROR(ExpectEnd());
        body.push_back(std::move(s));
        continue;
      }
      if (Cur().kind != Tok::kName) return Unexpected("expected a tag name");
      const std::string tag = Cur().text;
      if (std::find(ends.begin(), ends.end(), tag) != ends.end()) {
        ++ti_;
        *ended_by = tag;
        --nesting_;
        return body;
      }
      ++ti_;
      SY_ASSIGN_OR_RETURN(Stmt s, ParseStatement(tag, p.line));
      body.push_back(std::move(s));
    }
    if (!ends.empty()) {
      return SyntaxError(line_, absl::StrCat("unexpected end of template; expected '",
                                             absl::StrJoin(ends, "' or '"), "'"));
    }
    --nesting_;
    return body;
  }

  absl::StatusOr<Stmt> ParseStatement(const std::string& tag, int line) {
    std::string ended_by;
    if (tag == "if") {
      Stmt s = NewStmt(Stmt::kIf);
      s.line = line;
      while (true) {
        SY_ASSIGN_OR_RETURN(ExprPtr cond, ParseTuple(false));
        SY_RETURN_IF_ERROR(ExpectEnd());
        SY_ASSIGN_OR_RETURN(Body body, ParseBody({"elif", "else", "endif"}, &ended_by));
        s.conds.push_back(std::move(cond));
        s.bodies.push_back(std::move(body));
        if (ended_by == "elif") continue;
        if (ended_by == "else") {
          SY_RETURN_IF_ERROR(ExpectEnd());
          SY_ASSIGN_OR_RETURN(s.else_body, ParseBody({"endif"}, &ended_by));
        }
        SY_RETURN_IF_ERROR(ExpectEnd());
        return s;
      }
    }
    if (tag == "for") {
      Stmt s = NewStmt(Stmt::kFor);
      s.line = line;
      SY_ASSIGN_OR_RETURN(s.targets, ParseTargets());
      if (!IsName("in")) return Unexpected("expected 'in'");
      ++ti_;
      SY_ASSIGN_OR_RETURN(s.expr, ParseTuple(false, /*no_condexpr=*/true));
      if (IsName("if")) {
        ++ti_;
        SY_ASSIGN_OR_RETURN(s.filter, ParseExpression(true));
      }
      if (IsName("recursive")) return SyntaxError(line, "recursive loops are not supported");
      SY_RETURN_IF_ERROR(ExpectEnd());
      ++loop_depth_;
      absl::StatusOr<Body> body = ParseBody({"else", "endfor"}, &ended_by);
      --loop_depth_;
      if (!body.ok()) return body.status();
      s.bodies.push_back(*std::move(body));
      if (ended_by == "else") {
        SY_RETURN_IF_ERROR(ExpectEnd());
        SY_ASSIGN_OR_RETURN(s.else_body, ParseBody({"endfor"}, &ended_by));
      }
      SY_RETURN_IF_ERROR(ExpectEnd());
      return s;
    }
    if (tag == "set") {
      Stmt s = NewStmt(Stmt::kSet);
      s.line = line;
      if (Cur().kind == Tok::kName && Peek().kind == Tok::kOp && Peek().text == ".") {
        auto obj = std::make_unique<Expr>();
        obj->kind = Expr::kName;
        obj->line = line;
        obj->name = Cur().text;
        ti_ += 2;
        SY_ASSIGN_OR_RETURN(s.target_attr, ExpectName());
        s.target_obj = std::move(obj);
      } else {
        SY_ASSIGN_OR_RETURN(s.targets, ParseTargets());
      }
      if (AtEnd() && s.target_obj == nullptr && s.targets.size() == 1) {
        s.kind = Stmt::kSetBlock;
        SY_ASSIGN_OR_RETURN(Body body, ParseBody({"endset"}, &ended_by));
        s.bodies.push_back(std::move(body));
        SY_RETURN_IF_ERROR(ExpectEnd());
        return s;
      }
      SY_RETURN_IF_ERROR(Expect("="));
      SY_ASSIGN_OR_RETURN(s.expr, ParseTuple(true));
      SY_RETURN_IF_ERROR(ExpectEnd());
      return s;
    }
    if (tag == "macro") {
      Stmt s = NewStmt(Stmt::kMacro);
      s.line = line;
      SY_ASSIGN_OR_RETURN(s.text, ExpectName());
      SY_RETURN_IF_ERROR(Expect("("));
      while (!IsOp(")")) {
        if (!s.params.empty()) SY_RETURN_IF_ERROR(Expect(","));
        if (IsOp(")")) break;
        SY_ASSIGN_OR_RETURN(std::string param, ExpectName());
        ExprPtr def;
        if (IsOp("=")) {
          ++ti_;
          SY_ASSIGN_OR_RETURN(def, ParseExpression(true));
        } else if (!s.defaults.empty() && s.defaults.back() != nullptr) {
          return SyntaxError(line, "non-default argument follows default argument");
        }
        s.params.push_back(std::move(param));
        s.defaults.push_back(std::move(def));
      }
      ++ti_;
      SY_RETURN_IF_ERROR(ExpectEnd());
      const int outer_loops = loop_depth_;
      loop_depth_ = 0;  // a macro body is not inside the loop it is defined in
      absl::StatusOr<Body> body = ParseBody({"endmacro"}, &ended_by);
      loop_depth_ = outer_loops;
      if (!body.ok()) return body.status();
      s.bodies.push_back(*std::move(body));
      if (Cur().kind == Tok::kName) ++ti_;  // {% endmacro name %}
      SY_RETURN_IF_ERROR(ExpectEnd());
      return s;
    }
    if (tag == "break" || tag == "continue") {
      if (loop_depth_ == 0) return SyntaxError(line, absl::StrCat("'", tag, "' outside loop"));
      Stmt s = NewStmt(tag == "break" ? Stmt::kBreak : Stmt::kContinue);
      s.line = line;
      SY_RETURN_IF_ERROR(ExpectEnd());
      return s;
    }
    if (tag == "generation") {
      Stmt s = NewStmt(Stmt::kBlock);
      s.line = line;
      SY_RETURN_IF_ERROR(ExpectEnd());
      SY_ASSIGN_OR_RETURN(Body body, ParseBody({"endgeneration"}, &ended_by));
      s.bodies.push_back(std::move(body));
      SY_RETURN_IF_ERROR(ExpectEnd());
      return s;
    }
    static const char* const kEnds[] = {"endif", "endfor", "endset",       "endmacro",
                                        "elif",  "else",   "endgeneration"};
    for (const char* e : kEnds) {
      if (tag == e) return SyntaxError(line, absl::StrCat("unexpected '", tag, "'"));
    }
    return SyntaxError(line, absl::StrCat("unsupported tag '", tag, "'"));
  }

  absl::StatusOr<std::vector<std::string>> ParseTargets() {
    std::vector<std::string> names;
    const bool paren = IsOp("(");
    if (paren) ++ti_;
    while (true) {
      SY_ASSIGN_OR_RETURN(std::string n, ExpectName());
      names.push_back(std::move(n));
      if (!IsOp(",")) break;
      ++ti_;
      if (Cur().kind != Tok::kName) break;
    }
    if (paren) SY_RETURN_IF_ERROR(Expect(")"));
    return names;
  }

  // --- expressions ---
  struct Guard {
    explicit Guard(Parser* p) : p(p) { ++p->nesting_; }
    ~Guard() { --p->nesting_; }
    Parser* p;
  };
  absl::Status CheckDepth() {
    if (nesting_ > max_nesting_) return SyntaxError(Cur().line, "expression nests too deeply");
    return absl::OkStatus();
  }

  ExprPtr Make(Expr::Kind kind) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->line = Cur().line;
    return e;
  }

  // An expression or an implicit tuple `a, b`.
  absl::StatusOr<ExprPtr> ParseTuple(bool allow_condexpr, bool no_condexpr = false) {
    std::vector<ExprPtr> items;
    bool tuple = false;
    while (true) {
      SY_ASSIGN_OR_RETURN(ExprPtr e, ParseExpression(allow_condexpr && !no_condexpr));
      items.push_back(std::move(e));
      if (!IsOp(",")) break;
      tuple = true;
      ++ti_;
      if (AtEnd() || IsOp(")") || IsOp("]") || IsOp("}") || IsOp("=") || IsName("if")) break;
    }
    if (!tuple) return std::move(items[0]);
    ExprPtr t = Make(Expr::kTuple);
    t->kids = std::move(items);
    return t;
  }

  absl::StatusOr<ExprPtr> ParseExpression(bool with_condexpr = true) {
    Guard g(this);
    SY_RETURN_IF_ERROR(CheckDepth());
    SY_ASSIGN_OR_RETURN(ExprPtr expr, ParseOr());
    if (!with_condexpr) return expr;
    while (IsName("if")) {
      ++ti_;
      ExprPtr c = Make(Expr::kCond);
      SY_ASSIGN_OR_RETURN(ExprPtr cond, ParseOr());
      ExprPtr other;
      if (IsName("else")) {
        ++ti_;
        SY_ASSIGN_OR_RETURN(other, ParseExpression(true));
      }
      c->kids.push_back(std::move(cond));
      c->kids.push_back(std::move(expr));
      c->kids.push_back(std::move(other));
      expr = std::move(c);
    }
    return expr;
  }

  absl::StatusOr<ExprPtr> ParseOr() {
    return ParseLeftAssociative("or", Expr::kOr, &Parser::ParseAnd);
  }
  absl::StatusOr<ExprPtr> ParseAnd() {
    return ParseLeftAssociative("and", Expr::kAnd, &Parser::ParseNot);
  }
  // operand (KEYWORD operand)*, grouped from the left.
  absl::StatusOr<ExprPtr> ParseLeftAssociative(std::string_view keyword, Expr::Kind kind,
                                               absl::StatusOr<ExprPtr> (Parser::*operand)()) {
    SY_ASSIGN_OR_RETURN(ExprPtr left, (this->*operand)());
    while (IsName(keyword)) {
      ExprPtr e = Make(kind);
      ++ti_;
      SY_ASSIGN_OR_RETURN(ExprPtr right, (this->*operand)());
      e->kids.push_back(std::move(left));
      e->kids.push_back(std::move(right));
      left = std::move(e);
    }
    return left;
  }
  absl::StatusOr<ExprPtr> ParseNot() {
    if (IsName("not")) {
      Guard g(this);
      SY_RETURN_IF_ERROR(CheckDepth());
      ExprPtr e = Make(Expr::kNot);
      ++ti_;
      SY_ASSIGN_OR_RETURN(ExprPtr x, ParseNot());
      e->kids.push_back(std::move(x));
      return e;
    }
    return ParseCompare();
  }
  absl::StatusOr<ExprPtr> ParseCompare() {
    SY_ASSIGN_OR_RETURN(ExprPtr first, ParseMath1());
    ExprPtr cmp;
    while (true) {
      std::string op;
      if (IsCompareOp()) {
        op = Cur().text;
        ++ti_;
      } else if (IsName("in")) {
        op = "in";
        ++ti_;
      } else if (IsName("not") && Peek().kind == Tok::kName && Peek().text == "in") {
        op = "notin";
        ti_ += 2;
      } else {
        break;
      }
      if (cmp == nullptr) {
        cmp = Make(Expr::kCompare);
        cmp->kids.push_back(std::move(first));
      }
      SY_ASSIGN_OR_RETURN(ExprPtr rhs, ParseMath1());
      cmp->ops.push_back(op);
      cmp->kids.push_back(std::move(rhs));
    }
    return cmp ? std::move(cmp) : std::move(first);
  }
  absl::StatusOr<ExprPtr> Binary(ExprPtr left, std::string op, ExprPtr right) {
    auto e = std::make_unique<Expr>();
    e->kind = Expr::kBinary;
    e->line = left->line;
    e->name = std::move(op);
    e->kids.push_back(std::move(left));
    e->kids.push_back(std::move(right));
    return e;
  }
  absl::StatusOr<ExprPtr> ParseMath1() {
    SY_ASSIGN_OR_RETURN(ExprPtr left, ParseConcat());
    while (IsOp("+") || IsOp("-")) {
      std::string op = Cur().text;
      ++ti_;
      SY_ASSIGN_OR_RETURN(ExprPtr right, ParseConcat());
      SY_ASSIGN_OR_RETURN(left, Binary(std::move(left), op, std::move(right)));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> ParseConcat() {
    SY_ASSIGN_OR_RETURN(ExprPtr first, ParseMath2());
    if (!IsOp("~")) return first;
    ExprPtr e = Make(Expr::kConcat);
    e->kids.push_back(std::move(first));
    while (IsOp("~")) {
      ++ti_;
      SY_ASSIGN_OR_RETURN(ExprPtr next, ParseMath2());
      e->kids.push_back(std::move(next));
    }
    return e;
  }
  absl::StatusOr<ExprPtr> ParseMath2() {
    SY_ASSIGN_OR_RETURN(ExprPtr left, ParsePow());
    while (IsOp("*") || IsOp("/") || IsOp("//") || IsOp("%")) {
      std::string op = Cur().text;
      ++ti_;
      SY_ASSIGN_OR_RETURN(ExprPtr right, ParsePow());
      SY_ASSIGN_OR_RETURN(left, Binary(std::move(left), op, std::move(right)));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> ParsePow() {
    SY_ASSIGN_OR_RETURN(ExprPtr left, ParseUnary(true));
    while (IsOp("**")) {
      ++ti_;
      SY_ASSIGN_OR_RETURN(ExprPtr right, ParseUnary(true));
      SY_ASSIGN_OR_RETURN(left, Binary(std::move(left), "**", std::move(right)));
    }
    return left;
  }
  absl::StatusOr<ExprPtr> ParseUnary(bool with_filter) {
    Guard g(this);
    SY_RETURN_IF_ERROR(CheckDepth());
    ExprPtr node;
    if (IsOp("-") || IsOp("+")) {
      node = Make(IsOp("-") ? Expr::kNeg : Expr::kPos);
      ++ti_;
      SY_ASSIGN_OR_RETURN(ExprPtr x, ParseUnary(false));
      node->kids.push_back(std::move(x));
    } else {
      SY_ASSIGN_OR_RETURN(node, ParsePrimary());
    }
    SY_ASSIGN_OR_RETURN(node, ParsePostfix(std::move(node)));
    if (with_filter) {
      SY_ASSIGN_OR_RETURN(node, ParseFilterExpr(std::move(node)));
    }
    return node;
  }

  absl::StatusOr<ExprPtr> ParsePrimary() {
    const Tok& t = Cur();
    if (t.kind == Tok::kName) {
      ExprPtr e = Make(Expr::kLiteral);
      const std::string& n = t.text;
      if (n == "true" || n == "True") {
        e->literal = Value::Bool(true);
      } else if (n == "false" || n == "False") {
        e->literal = Value::Bool(false);
      } else if (n == "none" || n == "None") {
        e->literal = Value::None();
      } else {
        e->kind = Expr::kName;
        e->name = n;
      }
      ++ti_;
      return e;
    }
    if (t.kind == Tok::kString) {
      ExprPtr e = Make(Expr::kLiteral);
      std::string s;
      while (Cur().kind == Tok::kString) s += (*toks_)[ti_++].text;
      e->literal = Value::Str(std::move(s));
      return e;
    }
    if (t.kind == Tok::kInt || t.kind == Tok::kFloat) {
      ExprPtr e = Make(Expr::kLiteral);
      e->literal = t.kind == Tok::kInt ? Value::Int(t.i) : Value::Float(t.f);
      ++ti_;
      return e;
    }
    if (IsOp("(")) {
      ++ti_;
      if (IsOp(")")) {
        ++ti_;
        return Make(Expr::kTuple);
      }
      SY_ASSIGN_OR_RETURN(ExprPtr e, ParseTuple(true));
      SY_RETURN_IF_ERROR(Expect(")"));
      return e;
    }
    if (IsOp("[")) {
      ExprPtr e = Make(Expr::kList);
      ++ti_;
      while (!IsOp("]")) {
        if (!e->kids.empty()) SY_RETURN_IF_ERROR(Expect(","));
        if (IsOp("]")) break;
        SY_ASSIGN_OR_RETURN(ExprPtr x, ParseExpression(true));
        e->kids.push_back(std::move(x));
      }
      ++ti_;
      return e;
    }
    if (IsOp("{")) {
      ExprPtr e = Make(Expr::kDict);
      ++ti_;
      while (!IsOp("}")) {
        if (!e->kids.empty()) SY_RETURN_IF_ERROR(Expect(","));
        if (IsOp("}")) break;
        SY_ASSIGN_OR_RETURN(ExprPtr k, ParseExpression(true));
        SY_RETURN_IF_ERROR(Expect(":"));
        SY_ASSIGN_OR_RETURN(ExprPtr v, ParseExpression(true));
        e->kids.push_back(std::move(k));
        e->kids.push_back(std::move(v));
      }
      ++ti_;
      return e;
    }
    return Unexpected("expected an expression");
  }

  absl::Status ParseCallArgs(Expr* e) {
    SY_RETURN_IF_ERROR(Expect("("));
    bool first = true;
    while (!IsOp(")")) {
      if (!first) SY_RETURN_IF_ERROR(Expect(","));
      first = false;
      if (IsOp(")")) break;
      if (Cur().kind == Tok::kName && Peek().kind == Tok::kOp && Peek().text == "=") {
        std::string key = Cur().text;
        ti_ += 2;
        SY_ASSIGN_OR_RETURN(ExprPtr v, ParseExpression(true));
        e->kwargs.emplace_back(std::move(key), std::move(v));
      } else {
        if (!e->kwargs.empty()) {
          return SyntaxError(Cur().line, "positional argument follows keyword argument");
        }
        SY_ASSIGN_OR_RETURN(ExprPtr v, ParseExpression(true));
        e->kids.push_back(std::move(v));
      }
    }
    ++ti_;
    return absl::OkStatus();
  }

  absl::StatusOr<ExprPtr> ParsePostfix(ExprPtr node) {
    while (true) {
      if (IsOp(".")) {
        ++ti_;
        ExprPtr e = Make(Expr::kAttr);
        if (Cur().kind == Tok::kName) {
          e->name = Cur().text;
          ++ti_;
          e->kids.push_back(std::move(node));
          node = std::move(e);
        } else if (Cur().kind == Tok::kInt) {
          e->kind = Expr::kItem;
          ExprPtr idx = Make(Expr::kLiteral);
          idx->literal = Value::Int(Cur().i);
          ++ti_;
          e->kids.push_back(std::move(node));
          e->kids.push_back(std::move(idx));
          node = std::move(e);
        } else {
          return Unexpected("expected an attribute name");
        }
      } else if (IsOp("[")) {
        ++ti_;
        ExprPtr parts[3];
        bool slice = false;
        for (int k = 0; k < 3; ++k) {
          if (!IsOp(":") && !IsOp("]")) {
            SY_ASSIGN_OR_RETURN(parts[k], ParseExpression(true));
          }
          if (k < 2 && IsOp(":")) {
            slice = true;
            ++ti_;
            continue;
          }
          break;
        }
        SY_RETURN_IF_ERROR(Expect("]"));
        ExprPtr e = Make(slice ? Expr::kSlice : Expr::kItem);
        e->kids.push_back(std::move(node));
        if (slice) {
          for (auto& p : parts) e->kids.push_back(std::move(p));
        } else {
          if (parts[0] == nullptr) return Unexpected("expected a subscript");
          e->kids.push_back(std::move(parts[0]));
        }
        node = std::move(e);
      } else if (IsOp("(")) {
        ExprPtr e = Make(Expr::kCall);
        e->kids.push_back(std::move(node));
        SY_RETURN_IF_ERROR(ParseCallArgs(e.get()));
        node = std::move(e);
      } else {
        return node;
      }
    }
  }

  absl::StatusOr<ExprPtr> ParseFilterExpr(ExprPtr node) {
    while (true) {
      if (IsOp("|")) {
        ++ti_;
        ExprPtr e = Make(Expr::kFilter);
        SY_ASSIGN_OR_RETURN(e->name, ExpectName());
        while (IsOp(".")) {
          ++ti_;
          SY_ASSIGN_OR_RETURN(std::string more, ExpectName());
          e->name += "." + more;
        }
        e->kids.push_back(std::move(node));
        if (IsOp("(")) SY_RETURN_IF_ERROR(ParseCallArgs(e.get()));
        node = std::move(e);
      } else if (IsName("is")) {
        ++ti_;
        ExprPtr e = Make(Expr::kTest);
        if (IsName("not")) {
          e->negated = true;
          ++ti_;
        }
        if (Cur().kind == Tok::kName) {
          e->name = Cur().text;
          ++ti_;
        } else if (IsCompareOp()) {
          e->name = Cur().text;
          ++ti_;
        } else {
          return Unexpected("expected a test name");
        }
        e->kids.push_back(std::move(node));
        if (IsOp("(")) {
          SY_RETURN_IF_ERROR(ParseCallArgs(e.get()));
        } else if ((Cur().kind == Tok::kName && Cur().text != "else" && Cur().text != "or" &&
                    Cur().text != "and" && Cur().text != "if" && Cur().text != "is" &&
                    Cur().text != "in" && Cur().text != "not") ||
                   Cur().kind == Tok::kString || Cur().kind == Tok::kInt ||
                   Cur().kind == Tok::kFloat || IsOp("[") || IsOp("{")) {
          SY_ASSIGN_OR_RETURN(ExprPtr arg, ParsePrimary());
          SY_ASSIGN_OR_RETURN(arg, ParsePostfix(std::move(arg)));
          e->kids.push_back(std::move(arg));
        }
        node = std::move(e);
      } else if (IsOp("(")) {
        ExprPtr e = Make(Expr::kCall);
        e->kids.push_back(std::move(node));
        SY_RETURN_IF_ERROR(ParseCallArgs(e.get()));
        node = std::move(e);
      } else {
        return node;
      }
    }
  }

  std::vector<Piece> pieces_;
  size_t pi_ = 0;
  std::vector<Tok>* toks_ = nullptr;
  size_t ti_ = 0;
  int line_ = 1;
  int nesting_ = 0;
  int max_nesting_;
  int loop_depth_ = 0;
};

}  // namespace

// ---------------------------------------------------------------- render --

struct ChatTemplateImpl {
  Body body;
  ChatTemplateLimits limits;
};

namespace {

struct Scope {
  std::unordered_map<std::string, Value> vars;
  std::shared_ptr<Scope> parent;
  const Value* Lookup(const std::string& name) const {
    for (const Scope* s = this; s != nullptr; s = s->parent.get()) {
      auto it = s->vars.find(name);
      if (it != s->vars.end()) return &it->second;
    }
    return nullptr;
  }
};
using ScopePtr = std::shared_ptr<Scope>;

enum class Flow { kNormal, kBreak, kContinue };

absl::Status Exhausted(std::string_view what, int64_t limit) {
  return absl::ResourceExhaustedError(
      absl::StrCat("chat template exceeded its limit of ", limit, " ", std::string(what)));
}

class Context {
 public:
  explicit Context(const ChatTemplateLimits& limits) : limits_(limits) {}

  absl::Status Step() { return StepN(1); }
  absl::Status StepN(int64_t n) {
    const int64_t before = steps_;
    steps_ += n;
    if (steps_ > limits_.max_steps) return Exhausted("evaluation steps", limits_.max_steps);
    // The clock is the catch-all for operations whose cost grows with the
    // size of their operands (comparing, searching, decoding big strings).
    if ((before >> 8) != (steps_ >> 8) && std::chrono::steady_clock::now() - start_ >
                                              std::chrono::milliseconds(limits_.max_render_ms)) {
      return Exhausted("milliseconds", limits_.max_render_ms);
    }
    return absl::OkStatus();
  }
  // Accounts for a new string of `n` bytes.
  absl::Status Charge(size_t n) {
    if (static_cast<int64_t>(n) > limits_.max_output_bytes) {
      return Exhausted("bytes in one value", limits_.max_output_bytes);
    }
    work_ += static_cast<int64_t>(n);
    if (work_ > limits_.max_work_bytes) return Exhausted("bytes of work", limits_.max_work_bytes);
    return absl::OkStatus();
  }
  absl::Status Iterate() {
    if (++iterations_ > limits_.max_loop_iterations) {
      return Exhausted("loop iterations", limits_.max_loop_iterations);
    }
    return Step();
  }
  absl::Status Emit(std::string_view s, std::string* out) {
    if (static_cast<int64_t>(out->size() + s.size()) > limits_.max_output_bytes) {
      return Exhausted("output bytes", limits_.max_output_bytes);
    }
    SY_RETURN_IF_ERROR(Charge(s.size()));
    out->append(s);
    return absl::OkStatus();
  }

  absl::StatusOr<Value> Eval(const Expr& e, const ScopePtr& scope) {
    if (++depth_ > limits_.max_render_depth) {
      --depth_;
      return Exhausted("nested evaluations", limits_.max_render_depth);
    }
    absl::StatusOr<Value> v = EvalExpr(e, scope);
    --depth_;
    return v;
  }
  absl::StatusOr<Flow> Exec(const Body& body, const ScopePtr& scope, std::string* out);

  const ChatTemplateLimits& limits_;
  int call_depth_ = 0;

 private:
  absl::StatusOr<Value> EvalExpr(const Expr& e, const ScopePtr& scope);
  absl::StatusOr<Flow> ExecOne(const Stmt& s, const ScopePtr& scope, std::string* out);
  absl::StatusOr<Flow> ExecFor(const Stmt& s, const ScopePtr& scope, std::string* out);
  absl::Status Assign(const std::vector<std::string>& targets, const Value& v, Scope* scope);
  Value MakeMacro(const Stmt& s, const ScopePtr& scope);
  absl::StatusOr<Value> GetAttr(const Value& obj, const std::string& name);
  absl::StatusOr<Value> GetItem(const Value& obj, const Value& key);
  absl::StatusOr<Value> Binary(const std::string& op, const Value& a, const Value& b);
  absl::StatusOr<Value> Call(const Value& fn, Args& args);
  absl::StatusOr<Args> EvalArgs(const Expr& e, size_t first, const ScopePtr& scope);
  absl::StatusOr<Value> ApplyFilter(const std::string& name, const Value& v, Args& args,
                                    const ScopePtr& scope);
  absl::StatusOr<bool> ApplyTest(const std::string& name, const Value& v, Args& args);

  const std::chrono::steady_clock::time_point start_ = std::chrono::steady_clock::now();
  int depth_ = 0;
  int64_t steps_ = 0;
  int64_t work_ = 0;
  int64_t iterations_ = 0;
};

// The items of an iterable: list items, dict keys, string characters.
absl::StatusOr<ValueList> ItemsUncharged(const Value& v);

// Items(), with the copy charged as evaluation steps.
absl::StatusOr<ValueList> Items(const Value& v, Context& ctx) {
  SY_ASSIGN_OR_RETURN(ValueList items, ItemsUncharged(v));
  SY_RETURN_IF_ERROR(ctx.StepN(static_cast<int64_t>(items.size())));
  return items;
}

absl::StatusOr<ValueList> ItemsUncharged(const Value& v) {
  switch (v.kind) {
    case Value::kUndefined:
      return ValueList{};
    case Value::kList:
      return *v.list;
    case Value::kDict: {
      if (v.is_namespace) return RenderError("'Namespace' object is not iterable");
      ValueList keys;
      for (const auto& [k, x] : v.dict->items) keys.push_back(Value::Str(k));
      return keys;
    }
    case Value::kString: {
      ValueList chars;
      for (char32_t c : Decode(v.s)) chars.push_back(Value::Str(Encode(std::u32string(1, c))));
      return chars;
    }
    default:
      return RenderError(absl::StrCat("'", TypeName(v), "' object is not iterable"));
  }
}

absl::StatusOr<int64_t> Length(const Value& v) {
  switch (v.kind) {
    case Value::kUndefined:
      return 0;
    case Value::kList:
      return static_cast<int64_t>(v.list->size());
    case Value::kDict:
      return static_cast<int64_t>(v.dict->items.size());
    case Value::kString:
      return static_cast<int64_t>(Decode(v.s).size());
    default:
      return RenderError(absl::StrCat("object of type '", TypeName(v), "' has no len()"));
  }
}

absl::StatusOr<bool> Contains(const Value& container, const Value& item) {
  switch (container.kind) {
    case Value::kString:
      if (item.kind != Value::kString) {
        return RenderError(
            absl::StrCat("'in <string>' requires string as left operand, not ", TypeName(item)));
      }
      return container.s.find(item.s) != std::string::npos;
    case Value::kList:
      for (const Value& x : *container.list) {
        if (Equal(x, item)) return true;
      }
      return false;
    case Value::kDict:
      return item.kind == Value::kString && container.dict->Find(item.s) != nullptr;
    case Value::kUndefined:
      return UndefinedError(container);
    default:
      return RenderError(
          absl::StrCat("argument of type '", TypeName(container), "' is not iterable"));
  }
}

// Python's slice semantics over `n` items.
std::vector<int64_t> SliceIndices(int64_t n, const Value* start, const Value* stop, int64_t step) {
  std::vector<int64_t> idx;
  auto norm = [&](const Value* v, int64_t def) {
    if (v == nullptr || v->kind == Value::kNone) return def;
    int64_t x = v->AsInt();
    if (x < 0) x += n;
    if (step > 0) return std::clamp<int64_t>(x, 0, n);
    return std::clamp<int64_t>(x, -1, n - 1);
  };
  if (step > 0) {
    const int64_t b = norm(start, 0), e = norm(stop, n);
    for (int64_t k = b; k < e;) {
      idx.push_back(k);
      if (__builtin_add_overflow(k, step, &k)) break;
    }
  } else {
    const int64_t b = norm(start, n - 1), e = norm(stop, -1);
    for (int64_t k = b; k > e;) {
      idx.push_back(k);
      if (__builtin_add_overflow(k, step, &k)) break;
    }
  }
  return idx;
}

absl::StatusOr<Value> Context::GetItem(const Value& obj, const Value& key) {
  switch (obj.kind) {
    case Value::kUndefined:
      return UndefinedError(obj);
    case Value::kDict:
      if (key.kind == Value::kString) {
        if (const Value* v = obj.dict->Find(key.s)) return *v;
        return Value::Undef(absl::StrCat("'", ObjectRepr(obj), "' has no attribute '", key.s, "'"));
      }
      return Value::Undef(
          absl::StrCat("'", ObjectRepr(obj), "' has no attribute '", Str(key), "'"));
    case Value::kList:
    case Value::kString: {
      if (key.kind != Value::kInt && key.kind != Value::kBool) {
        if (key.kind == Value::kString) return GetAttr(obj, key.s);
        return Value::Undef(
            absl::StrCat("'", ObjectRepr(obj), "' has no attribute '", Str(key), "'"));
      }
      int64_t i = key.AsInt();
      if (obj.kind == Value::kList) {
        const int64_t n = static_cast<int64_t>(obj.list->size());
        if (i < 0) i += n;
        if (i < 0 || i >= n) {
          return Value::Undef(absl::StrCat("'", ObjectRepr(obj), "' has no element ", key.AsInt()));
        }
        return (*obj.list)[i];
      }
      std::u32string u = Decode(obj.s);
      const int64_t n = static_cast<int64_t>(u.size());
      if (i < 0) i += n;
      if (i < 0 || i >= n) {
        return Value::Undef(absl::StrCat("'", ObjectRepr(obj), "' has no element ", key.AsInt()));
      }
      return Value::Str(Encode(u.substr(i, 1)));
    }
    default:
      return Value::Undef(
          absl::StrCat("'", ObjectRepr(obj), "' has no attribute '", Str(key), "'"));
  }
}

// Methods of str and dict the sandbox allows.
absl::StatusOr<Value> StringMethod(const std::string& s, const std::string& name) {
  auto str_arg = [](const Args& a, size_t i, std::string_view n) -> std::optional<std::string> {
    const Value* v = a.Get(i, n);
    if (v == nullptr || v->kind == Value::kNone) return std::nullopt;
    return Str(*v);
  };
  if (name == "strip" || name == "lstrip" || name == "rstrip") {
    return Value::Func(name, [s, name, str_arg](Context& ctx, Args& a) -> absl::StatusOr<Value> {
      std::string r = PyStrip(s, str_arg(a, 0, "chars"), name != "rstrip", name != "lstrip");
      SY_RETURN_IF_ERROR(ctx.Charge(r.size()));
      return Value::Str(std::move(r));
    });
  }
  if (name == "upper" || name == "lower" || name == "title" || name == "capitalize") {
    return Value::Func(name, [s, name](Context& ctx, Args&) -> absl::StatusOr<Value> {
      std::string r = name == "upper"   ? MapCase(s, true)
                      : name == "lower" ? MapCase(s, false)
                      : name == "title" ? PyTitle(s)
                                        : PyCapitalize(s);
      SY_RETURN_IF_ERROR(ctx.Charge(r.size()));
      return Value::Str(std::move(r));
    });
  }
  if (name == "startswith" || name == "endswith") {
    return Value::Func(name, [s, name](Context&, Args& a) -> absl::StatusOr<Value> {
      const Value* p = a.Get(0, "prefix");
      if (p == nullptr) return RenderError(name + "() takes at least 1 argument (0 given)");
      std::vector<std::string> options;
      if (p->kind == Value::kList && p->tuple) {
        for (const Value& x : *p->list) options.push_back(Str(x));
      } else if (p->kind == Value::kString) {
        options.push_back(p->s);
      } else {
        return RenderError(
            absl::StrCat(name, " first arg must be str or a tuple of str, not ", TypeName(*p)));
      }
      for (const std::string& o : options) {
        const bool hit =
            name == "startswith"
                ? s.compare(0, o.size(), o) == 0
                : s.size() >= o.size() && s.compare(s.size() - o.size(), o.size(), o) == 0;
        if (hit) return Value::Bool(true);
      }
      return Value::Bool(false);
    });
  }
  if (name == "split") {
    return Value::Func(name, [s, str_arg](Context& ctx, Args& a) -> absl::StatusOr<Value> {
      std::optional<std::string> sep = str_arg(a, 0, "sep");
      const Value* mv = a.Get(1, "maxsplit");
      int64_t maxsplit = mv ? mv->AsInt() : -1;
      ValueList parts;
      SY_RETURN_IF_ERROR(ctx.Charge(s.size()));
      if (sep) {
        if (sep->empty()) return RenderError("empty separator");
        size_t b = 0;
        while (maxsplit != 0) {
          const size_t e = s.find(*sep, b);
          if (e == std::string::npos) break;
          parts.push_back(Value::Str(s.substr(b, e - b)));
          b = e + sep->size();
          --maxsplit;
        }
        parts.push_back(Value::Str(s.substr(b)));
      } else {
        std::u32string u = Decode(s);
        size_t k = 0;
        while (k < u.size()) {
          while (k < u.size() && IsPySpace(u[k])) ++k;
          if (k == u.size()) break;
          if (maxsplit == 0) {
            size_t e = u.size();
            while (e > k && IsPySpace(u[e - 1])) --e;
            parts.push_back(Value::Str(Encode(u.substr(k, e - k))));
            break;
          }
          size_t e = k;
          while (e < u.size() && !IsPySpace(u[e])) ++e;
          parts.push_back(Value::Str(Encode(u.substr(k, e - k))));
          k = e;
          --maxsplit;
        }
      }
      return Value::List(std::move(parts));
    });
  }
  if (name == "replace") {
    return Value::Func(name, [s](Context& ctx, Args& a) -> absl::StatusOr<Value> {
      const Value* o = a.Get(0, "old");
      const Value* n = a.Get(1, "new");
      if (o == nullptr || n == nullptr) return RenderError("replace() takes at least 2 arguments");
      const Value* c = a.Get(2, "count");
      int64_t count = c ? c->AsInt() : -1;
      const std::string from = Str(*o), to = Str(*n);
      std::string r;
      if (from.empty()) {
        std::u32string u = Decode(s);
        for (size_t k = 0; k <= u.size(); ++k) {
          if (count != 0) {
            r += to;
            --count;
          }
          if (k < u.size()) AppendUtf8(u[k], &r);
          SY_RETURN_IF_ERROR(ctx.Charge(to.size() + 4));
        }
      } else {
        size_t b = 0;
        while (count != 0) {
          const size_t e = s.find(from, b);
          if (e == std::string::npos) break;
          r.append(s, b, e - b);
          r += to;
          SY_RETURN_IF_ERROR(ctx.Charge(e - b + to.size()));
          b = e + from.size();
          --count;
        }
        r.append(s, b);
      }
      SY_RETURN_IF_ERROR(ctx.Charge(r.size()));
      return Value::Str(std::move(r));
    });
  }
  if (name == "find" || name == "count") {
    return Value::Func(name, [s, name](Context&, Args& a) -> absl::StatusOr<Value> {
      const Value* x = a.Get(0, "sub");
      if (x == nullptr) return RenderError(name + "() takes at least 1 argument (0 given)");
      const std::string sub = Str(*x);
      if (name == "find") {
        const size_t at = s.find(sub);
        if (at == std::string::npos) return Value::Int(-1);
        return Value::Int(static_cast<int64_t>(Decode(s.substr(0, at)).size()));
      }
      if (sub.empty()) return Value::Int(static_cast<int64_t>(Decode(s).size()) + 1);
      int64_t n = 0;
      for (size_t at = s.find(sub); at != std::string::npos; at = s.find(sub, at + sub.size())) {
        ++n;
      }
      return Value::Int(n);
    });
  }
  if (name == "join") {
    return Value::Func(name, [s](Context& ctx, Args& a) -> absl::StatusOr<Value> {
      const Value* x = a.Get(0, "iterable");
      if (x == nullptr) return RenderError("join() takes exactly one argument (0 given)");
      SY_ASSIGN_OR_RETURN(ValueList items, Items(*x, ctx));
      std::string r;
      for (size_t k = 0; k < items.size(); ++k) {
        if (items[k].kind != Value::kString) {
          return RenderError(absl::StrCat("sequence item ", k, ": expected str instance, ",
                                          TypeName(items[k]), " found"));
        }
        if (k) r += s;
        r += items[k].s;
        SY_RETURN_IF_ERROR(ctx.Charge(items[k].s.size() + s.size()));
      }
      return Value::Str(std::move(r));
    });
  }
  return Value::Undef(absl::StrCat("'str object' has no attribute '", name, "'"));
}

absl::StatusOr<Value> Context::GetAttr(const Value& obj, const std::string& name) {
  switch (obj.kind) {
    case Value::kUndefined:
      return UndefinedError(obj);
    case Value::kString:
      return StringMethod(obj.s, name);
    case Value::kDict: {
      if (!obj.is_namespace) {
        auto d = obj.dict;
        if (name == "get") {
          return Value::Func("get", [d](Context&, Args& a) -> absl::StatusOr<Value> {
            const Value* k = a.Get(0, "key");
            if (k == nullptr) return RenderError("get expected at least 1 argument, got 0");
            if (k->kind == Value::kString) {
              if (const Value* v = d->Find(k->s)) return *v;
            }
            const Value* def = a.Get(1, "default");
            return def ? *def : Value::None();
          });
        }
        if (name == "items" || name == "keys" || name == "values") {
          return Value::Func(name, [d, name](Context&, Args&) -> absl::StatusOr<Value> {
            ValueList out;
            for (const auto& [k, v] : d->items) {
              if (name == "items") {
                out.push_back(Value::List({Value::Str(k), v}, true));
              } else {
                out.push_back(name == "keys" ? Value::Str(k) : v);
              }
            }
            return Value::List(std::move(out));
          });
        }
      }
      if (const Value* v = obj.dict->Find(name)) return *v;
      return Value::Undef(absl::StrCat("'", ObjectRepr(obj), "' has no attribute '", name, "'"));
    }
    default:
      return Value::Undef(absl::StrCat("'", ObjectRepr(obj), "' has no attribute '", name, "'"));
  }
}

absl::StatusOr<Value> Context::Binary(const std::string& op, const Value& a, const Value& b) {
  if (a.undefined()) return UndefinedError(a);
  if (b.undefined()) return UndefinedError(b);
  auto unsupported = [&]() {
    return RenderError(absl::StrCat("unsupported operand type(s) for ", op, ": '", TypeName(a),
                                    "' and '", TypeName(b), "'"));
  };
  const bool nums = a.numeric() && b.numeric();
  const bool floats = nums && (a.kind == Value::kFloat || b.kind == Value::kFloat);
  if (op == "+") {
    if (nums) {
      if (floats) return Value::Float(a.AsDouble() + b.AsDouble());
      int64_t r;
      if (__builtin_add_overflow(a.AsInt(), b.AsInt(), &r)) return IntegerOverflow();
      return Value::Int(r);
    }
    if (a.kind == Value::kString && b.kind == Value::kString) {
      SY_RETURN_IF_ERROR(Charge(a.s.size() + b.s.size()));
      return Value::Str(a.s + b.s);
    }
    if (a.kind == Value::kList && b.kind == Value::kList && a.tuple == b.tuple) {
      SY_RETURN_IF_ERROR(Charge(16 * (a.list->size() + b.list->size())));
      ValueList items = *a.list;
      items.insert(items.end(), b.list->begin(), b.list->end());
      Value sum = Value::List(std::move(items), a.tuple);
      SY_RETURN_IF_ERROR(CheckNest(sum));
      return sum;
    }
    if (a.kind == Value::kString) {
      return RenderError(
          absl::StrCat("can only concatenate str (not \"", TypeName(b), "\") to str"));
    }
    if (a.kind == Value::kList && !a.tuple) {
      return RenderError(
          absl::StrCat("can only concatenate list (not \"", TypeName(b), "\") to list"));
    }
    return unsupported();
  }
  if (op == "-") {
    if (!nums) return unsupported();
    if (floats) return Value::Float(a.AsDouble() - b.AsDouble());
    int64_t r;
    if (__builtin_sub_overflow(a.AsInt(), b.AsInt(), &r)) return IntegerOverflow();
    return Value::Int(r);
  }
  if (op == "*") {
    if (nums) {
      if (floats) return Value::Float(a.AsDouble() * b.AsDouble());
      int64_t r;
      if (__builtin_mul_overflow(a.AsInt(), b.AsInt(), &r)) return IntegerOverflow();
      return Value::Int(r);
    }
    const Value* seq = a.kind == Value::kString || a.kind == Value::kList ? &a : &b;
    const Value* times = seq == &a ? &b : &a;
    if ((seq->kind != Value::kString && seq->kind != Value::kList) ||
        (times->kind != Value::kInt && times->kind != Value::kBool)) {
      return unsupported();
    }
    const int64_t n = std::max<int64_t>(times->AsInt(), 0);
    const int64_t unit = seq->kind == Value::kString ? static_cast<int64_t>(seq->s.size())
                                                     : 16 * static_cast<int64_t>(seq->list->size());
    if (unit != 0 && n > limits_.max_output_bytes / unit) {
      return Exhausted("bytes in one value", limits_.max_output_bytes);
    }
    SY_RETURN_IF_ERROR(Charge(static_cast<size_t>(unit * n)));
    if (seq->kind == Value::kString) {
      std::string r;
      r.reserve(seq->s.size() * n);
      for (int64_t k = 0; k < n; ++k) r += seq->s;
      return Value::Str(std::move(r));
    }
    ValueList items;
    for (int64_t k = 0; k < n; ++k) items.insert(items.end(), seq->list->begin(), seq->list->end());
    return Value::List(std::move(items), seq->tuple);
  }
  if (!nums) return unsupported();
  if (op == "/") {
    if (b.AsDouble() == 0) return RenderError("division by zero");
    return Value::Float(a.AsDouble() / b.AsDouble());
  }
  if (op == "//" || op == "%") {
    if (b.AsDouble() == 0) {
      return RenderError(op == "//" ? (floats ? "float floor division by zero"
                                              : "integer division or modulo by zero")
                                    : (floats ? "float modulo" : "integer modulo by zero"));
    }
    if (floats) {
      const double x = a.AsDouble(), y = b.AsDouble();
      double m = std::fmod(x, y);
      if (m != 0 && ((m < 0) != (y < 0))) m += y;
      if (op == "%") return Value::Float(m);
      return Value::Float(std::floor((x - m) / y + 0.5));
    }
    const int64_t x = a.AsInt(), y = b.AsInt();
    if (x == INT64_MIN && y == -1) {
      if (op == "%") return Value::Int(0);
      return IntegerOverflow();
    }
    int64_t q = x / y, m = x % y;
    if (m != 0 && ((m < 0) != (y < 0))) {
      m += y;
      --q;
    }
    return op == "%" ? Value::Int(m) : Value::Int(q);
  }
  if (op == "**") {
    if (!floats && b.AsInt() >= 0) {
      // Exponentiation by squaring: O(log exponent) steps.
      int64_t r = 1, base = a.AsInt();
      for (int64_t e = b.AsInt(); e > 0; e >>= 1) {
        if ((e & 1) && __builtin_mul_overflow(r, base, &r)) return IntegerOverflow();
        if (e > 1 && __builtin_mul_overflow(base, base, &base)) {
          if (a.AsInt() == -1 || a.AsInt() == 0 || a.AsInt() == 1) break;  // cannot happen
          return IntegerOverflow();
        }
      }
      return Value::Int(r);
    }
    return Value::Float(std::pow(a.AsDouble(), b.AsDouble()));
  }
  return unsupported();
}

absl::StatusOr<Args> Context::EvalArgs(const Expr& e, size_t first, const ScopePtr& scope) {
  Args args;
  for (size_t k = first; k < e.kids.size(); ++k) {
    SY_ASSIGN_OR_RETURN(Value v, Eval(*e.kids[k], scope));
    args.pos.push_back(std::move(v));
  }
  for (const auto& [name, x] : e.kwargs) {
    SY_ASSIGN_OR_RETURN(Value v, Eval(*x, scope));
    args.kw.emplace_back(name, std::move(v));
  }
  return args;
}

absl::StatusOr<Value> Context::Call(const Value& fn, Args& args) {
  if (fn.undefined()) return UndefinedError(fn);
  if (fn.kind != Value::kCallable) {
    return RenderError(absl::StrCat("'", TypeName(fn), "' object is not callable"));
  }
  return fn.fn->fn(*this, args);
}

absl::StatusOr<bool> Context::ApplyTest(const std::string& name, const Value& v, Args& args) {
  const Value* arg = args.Get(0, "value");
  auto need_arg = [&]() -> absl::Status {
    if (arg == nullptr) return RenderError(absl::StrCat("test '", name, "' needs an argument"));
    return absl::OkStatus();
  };
  if (name == "defined") return !v.undefined();
  if (name == "undefined") return v.undefined();
  if (name == "none") return v.kind == Value::kNone;
  if (name == "string") return v.kind == Value::kString;
  if (name == "number") return v.numeric();
  if (name == "integer") return v.kind == Value::kInt;
  if (name == "float") return v.kind == Value::kFloat;
  if (name == "boolean") return v.kind == Value::kBool;
  if (name == "true") return v.kind == Value::kBool && v.b;
  if (name == "false") return v.kind == Value::kBool && !v.b;
  if (name == "mapping") return v.kind == Value::kDict && !v.is_namespace;
  if (name == "sequence") {
    return v.kind == Value::kList || v.kind == Value::kString ||
           (v.kind == Value::kDict && !v.is_namespace);
  }
  if (name == "iterable") {
    return v.kind == Value::kList || v.kind == Value::kString || v.kind == Value::kUndefined ||
           (v.kind == Value::kDict && !v.is_namespace);
  }
  if (name == "callable") return v.kind == Value::kCallable;
  if (name == "even" || name == "odd" || name == "divisibleby") {
    if (v.kind != Value::kInt && v.kind != Value::kBool) {
      if (v.undefined()) return UndefinedError(v);
      if (name != "divisibleby") {
        return RenderError(absl::StrCat("test '", name, "' needs an integer"));
      }
    }
    if (name == "divisibleby") {
      SY_RETURN_IF_ERROR(need_arg());
      SY_ASSIGN_OR_RETURN(Value m, Binary("%", v, *arg));
      return m.AsDouble() == 0;
    }
    const int64_t r = ((v.AsInt() % 2) + 2) % 2;
    return name == "even" ? r == 0 : r == 1;
  }
  if (name == "eq" || name == "equalto" || name == "==") {
    SY_RETURN_IF_ERROR(need_arg());
    return Equal(v, *arg);
  }
  if (name == "ne" || name == "!=") {
    SY_RETURN_IF_ERROR(need_arg());
    return !Equal(v, *arg);
  }
  if (name == "lt" || name == "lessthan" || name == "<" || name == "le" || name == "<=" ||
      name == "gt" || name == "greaterthan" || name == ">" || name == "ge" || name == ">=") {
    SY_RETURN_IF_ERROR(need_arg());
    SY_ASSIGN_OR_RETURN(int c, Compare(v, *arg, name));
    if (name == "lt" || name == "lessthan" || name == "<") return c < 0;
    if (name == "le" || name == "<=") return c <= 0;
    if (name == "gt" || name == "greaterthan" || name == ">") return c > 0;
    return c >= 0;
  }
  if (name == "in") {
    SY_RETURN_IF_ERROR(need_arg());
    return Contains(*arg, v);
  }
  if (name == "sameas") {
    SY_RETURN_IF_ERROR(need_arg());
    if (v.kind != arg->kind) return false;
    if (v.kind == Value::kList) return v.list == arg->list;
    if (v.kind == Value::kDict) return v.dict == arg->dict;
    return Equal(v, *arg);
  }
  return RenderError(absl::StrCat("No test named '", name, "'."));
}

// An attribute path like "a.b" or "0", looked up as jinja2's make_attrgetter does.
Value AttrPath(const Value& v, const std::string& path);

absl::StatusOr<Value> Context::ApplyFilter(const std::string& name, const Value& v, Args& args,
                                           const ScopePtr& scope) {
  (void)scope;
  const Value* a0 = args.pos.size() > 0 ? &args.pos[0] : nullptr;
  auto kw = [&](size_t i, std::string_view n) { return args.Get(i, n); };
  auto need_defined = [&]() -> absl::Status {
    if (v.undefined()) return UndefinedError(v);
    return absl::OkStatus();
  };
  auto new_string = [&](std::string s) -> absl::StatusOr<Value> {
    SY_RETURN_IF_ERROR(Charge(s.size()));
    return Value::Str(std::move(s));
  };
  if (name == "trim") {
    const Value* chars = kw(0, "chars");
    return new_string(PyStrip(Str(v),
                              chars && chars->kind != Value::kNone
                                  ? std::optional<std::string>(Str(*chars))
                                  : std::nullopt,
                              true, true));
  }
  if (name == "tojson") {
    const Value* indent = kw(0, "indent");
    std::string out;
    int64_t spaces = indent && indent->kind != Value::kNone ? indent->AsInt() : -1;
    if (spaces > 1000) return RenderError("tojson: indent must be at most 1000");
    SY_RETURN_IF_ERROR(ToJson(v, static_cast<int>(spaces), 0, limits_.max_output_bytes, &out));
    return new_string(std::move(out));
  }
  if (name == "length" || name == "count") {
    SY_ASSIGN_OR_RETURN(int64_t n, Length(v));
    return Value::Int(n);
  }
  if (name == "upper" || name == "lower") return new_string(MapCase(Str(v), name == "upper"));
  if (name == "capitalize") return new_string(PyCapitalize(Str(v)));
  if (name == "title") return new_string(JinjaTitle(Str(v)));
  if (name == "default" || name == "d") {
    const Value* def = kw(0, "default_value");
    const Value* boolean = kw(1, "boolean");
    const bool use_default = v.undefined() || (boolean && Truthy(*boolean) && !Truthy(v));
    if (use_default) return def ? *def : Value::Str("");
    return v;
  }
  if (name == "join") {
    const Value* sep = kw(0, "d");
    const Value* attr = kw(1, "attribute");
    SY_ASSIGN_OR_RETURN(ValueList items, Items(v, *this));
    std::string out;
    const std::string s = sep ? Str(*sep) : "";
    for (size_t k = 0; k < items.size(); ++k) {
      if (k) out += s;
      Value item = items[k];
      if (attr) {
        item = AttrPath(item, Str(*attr));
      }
      out += Str(item);
      SY_RETURN_IF_ERROR(Charge(s.size()));
      if (static_cast<int64_t>(out.size()) > limits_.max_output_bytes) {
        return Exhausted("bytes in one value", limits_.max_output_bytes);
      }
    }
    return new_string(std::move(out));
  }
  if (name == "first" || name == "last") {
    SY_RETURN_IF_ERROR(need_defined());
    SY_ASSIGN_OR_RETURN(ValueList items, Items(v, *this));
    if (items.empty()) return Value::Undef(absl::StrCat("No ", name, " item, sequence was empty."));
    return name == "first" ? items.front() : items.back();
  }
  if (name == "string") return new_string(Str(v));
  if (name == "safe") return v;
  if (name == "int" || name == "float") {
    const bool is_int = name == "int";
    const Value* def = kw(0, "default");
    Value fallback = def ? *def : (is_int ? Value::Int(0) : Value::Float(0));
    if (v.kind == Value::kInt || v.kind == Value::kBool) {
      return is_int ? Value::Int(v.AsInt()) : Value::Float(v.AsDouble());
    }
    if (v.kind == Value::kFloat) {
      if (!is_int) return v;
      if (!std::isfinite(v.f)) return fallback;
      return FloatToInt(v.f);
    }
    if (v.kind == Value::kString) {
      std::string t = PyStrip(v.s, std::nullopt, true, true);
      t.erase(std::remove(t.begin(), t.end(), '_'), t.end());
      int64_t i;
      auto r = std::from_chars(t.data() + (!t.empty() && t[0] == '+'), t.data() + t.size(), i);
      if (is_int && !t.empty() && r.ec == std::errc() && r.ptr == t.data() + t.size()) {
        return Value::Int(i);
      }
      char* end = nullptr;
      const double d = std::strtod(t.c_str(), &end);
      if (!t.empty() && end == t.c_str() + t.size()) {
        if (!is_int) return Value::Float(d);
        if (std::isfinite(d)) return FloatToInt(d);
      }
    }
    return fallback;
  }
  if (name == "abs") {
    SY_RETURN_IF_ERROR(need_defined());
    if (v.kind == Value::kFloat) return Value::Float(std::fabs(v.f));
    if (v.numeric()) {
      if (v.AsInt() == INT64_MIN) return IntegerOverflow();
      return Value::Int(std::abs(v.AsInt()));
    }
    return RenderError(absl::StrCat("bad operand type for abs(): '", TypeName(v), "'"));
  }
  if (name == "round") {
    SY_RETURN_IF_ERROR(need_defined());
    if (!v.numeric()) return RenderError("round needs a number");
    const Value* prec = kw(0, "precision");
    const Value* method = kw(1, "method");
    const int64_t p = prec ? prec->AsInt() : 0;
    const std::string m = method ? Str(*method) : "common";
    const double scale = std::pow(10.0, static_cast<double>(p));
    double x = v.AsDouble() * scale;
    if (m == "common") {
      x = std::round(x);
    } else if (m == "ceil") {
      x = std::ceil(x);
    } else if (m == "floor") {
      x = std::floor(x);
    } else {
      return RenderError("method must be common, ceil or floor");
    }
    return Value::Float(x / scale);
  }
  if (name == "items") {
    if (v.undefined()) return Value::List({});
    if (v.kind != Value::kDict || v.is_namespace) {
      return RenderError(absl::StrCat("Can only get item pairs from a mapping."));
    }
    ValueList out;
    for (const auto& [k, x] : v.dict->items) out.push_back(Value::List({Value::Str(k), x}, true));
    return Value::List(std::move(out));
  }
  if (name == "list") {
    SY_ASSIGN_OR_RETURN(ValueList items, Items(v, *this));
    return Value::List(std::move(items));
  }
  if (name == "reverse") {
    if (v.kind == Value::kString) {
      std::u32string u = Decode(v.s);
      std::reverse(u.begin(), u.end());
      return new_string(Encode(u));
    }
    SY_ASSIGN_OR_RETURN(ValueList items, Items(v, *this));
    std::reverse(items.begin(), items.end());
    return Value::List(std::move(items));
  }
  if (name == "unique") {
    SY_ASSIGN_OR_RETURN(ValueList items, Items(v, *this));
    ValueList out;
    for (const Value& x : items) {
      SY_RETURN_IF_ERROR(Step());
      bool seen = false;
      for (const Value& y : out) {
        if (Equal(x, y) || (x.kind == Value::kString && y.kind == Value::kString &&
                            MapCase(x.s, false) == MapCase(y.s, false))) {
          seen = true;
          break;
        }
      }
      if (!seen) out.push_back(x);
    }
    return Value::List(std::move(out));
  }
  if (name == "replace") {
    SY_ASSIGN_OR_RETURN(Value method, StringMethod(Str(v), "replace"));
    return Call(method, args);
  }
  if (name == "map") {
    SY_ASSIGN_OR_RETURN(ValueList items, Items(v, *this));
    const Value* attr = nullptr;
    for (const auto& [k, x] : args.kw) {
      if (k == "attribute") attr = &x;
    }
    ValueList out;
    if (attr) {
      const Value* def = nullptr;
      for (const auto& [k, x] : args.kw) {
        if (k == "default") def = &x;
      }
      for (const Value& x : items) {
        SY_RETURN_IF_ERROR(Step());
        Value y = AttrPath(x, Str(*attr));
        out.push_back(y.undefined() && def ? *def : y);
      }
      return Value::List(std::move(out));
    }
    if (a0 == nullptr || a0->kind != Value::kString) {
      return RenderError("map needs a filter name or attribute=");
    }
    Args rest;
    rest.pos.assign(args.pos.begin() + 1, args.pos.end());
    rest.kw = args.kw;
    for (const Value& x : items) {
      SY_RETURN_IF_ERROR(Step());
      SY_ASSIGN_OR_RETURN(Value y, ApplyFilter(a0->s, x, rest, scope));
      out.push_back(std::move(y));
    }
    return Value::List(std::move(out));
  }
  if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
    const bool attr_form = name == "selectattr" || name == "rejectattr";
    const bool keep = name == "select" || name == "selectattr";
    SY_ASSIGN_OR_RETURN(ValueList items, Items(v, *this));
    size_t next = 0;
    std::string attr;
    if (attr_form) {
      if (args.pos.empty()) return RenderError(absl::StrCat(name, " needs an attribute"));
      attr = Str(args.pos[next++]);
    }
    std::string test;
    if (next < args.pos.size()) test = Str(args.pos[next++]);
    Args rest;
    rest.pos.assign(args.pos.begin() + next, args.pos.end());
    rest.kw = args.kw;
    ValueList out;
    for (const Value& x : items) {
      SY_RETURN_IF_ERROR(Step());
      Value subject = x;
      if (attr_form) {
        subject = AttrPath(x, attr);
      }
      bool pass;
      if (test.empty()) {
        pass = Truthy(subject);
      } else {
        SY_ASSIGN_OR_RETURN(pass, ApplyTest(test, subject, rest));
      }
      if (pass == keep) out.push_back(x);
    }
    return Value::List(std::move(out));
  }
  if (name == "sort") {
    SY_ASSIGN_OR_RETURN(ValueList items, Items(v, *this));
    const Value* rev = kw(0, "reverse");
    const Value* cs = kw(1, "case_sensitive");
    const Value* attr = kw(2, "attribute");
    const bool case_sensitive = cs && Truthy(*cs);
    std::vector<std::pair<Value, Value>> keyed;
    for (const Value& x : items) {
      Value key = x;
      if (attr) {
        key = AttrPath(x, Str(*attr));
      }
      if (!case_sensitive && key.kind == Value::kString) key = Value::Str(MapCase(key.s, false));
      keyed.emplace_back(std::move(key), x);
    }
    absl::Status error;
    std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& p, const auto& q) {
      if (!error.ok()) return false;
      absl::StatusOr<int> c = Compare(p.first, q.first, "<");
      if (!c.ok()) {
        error = c.status();
        return false;
      }
      return *c < 0;
    });
    SY_RETURN_IF_ERROR(error);
    ValueList out;
    for (auto& p : keyed) out.push_back(std::move(p.second));
    if (rev && Truthy(*rev)) std::reverse(out.begin(), out.end());
    return Value::List(std::move(out));
  }
  return RenderError(absl::StrCat("No filter named '", name, "'."));
}

Value AttrPath(const Value& v, const std::string& path) {
  Value cur = v;
  size_t b = 0;
  while (true) {
    const size_t e = path.find('.', b);
    const std::string part = path.substr(b, e == std::string::npos ? std::string::npos : e - b);
    if (cur.undefined()) return cur;
    if (cur.kind == Value::kDict) {
      const Value* x = cur.dict->Find(part);
      cur = x ? *x
              : Value::Undef(absl::StrCat("'", ObjectRepr(cur), "' has no attribute '", part, "'"));
    } else if (cur.kind == Value::kList) {
      int64_t idx;
      auto r = std::from_chars(part.data(), part.data() + part.size(), idx);
      if (r.ec == std::errc() && idx >= 0 && idx < static_cast<int64_t>(cur.list->size())) {
        cur = (*cur.list)[idx];
      } else {
        cur = Value::Undef(absl::StrCat("'", ObjectRepr(cur), "' has no attribute '", part, "'"));
      }
    } else {
      cur = Value::Undef(absl::StrCat("'", ObjectRepr(cur), "' has no attribute '", part, "'"));
    }
    if (e == std::string::npos) break;
    b = e + 1;
  }
  return cur;
}

absl::StatusOr<Value> Context::EvalExpr(const Expr& e, const ScopePtr& scope) {
  SY_RETURN_IF_ERROR(Step());
  switch (e.kind) {
    case Expr::kLiteral:
      return e.literal;
    case Expr::kName: {
      if (const Value* v = scope->Lookup(e.name)) return *v;
      return Value::Undef(absl::StrCat("'", e.name, "' is undefined"));
    }
    case Expr::kList:
    case Expr::kTuple: {
      ValueList items;
      for (const auto& k : e.kids) {
        SY_ASSIGN_OR_RETURN(Value v, Eval(*k, scope));
        items.push_back(std::move(v));
      }
      Value list = Value::List(std::move(items), e.kind == Expr::kTuple);
      SY_RETURN_IF_ERROR(CheckNest(list));
      return list;
    }
    case Expr::kDict: {
      Value d = NewDict();
      for (size_t k = 0; k + 1 < e.kids.size(); k += 2) {
        SY_ASSIGN_OR_RETURN(Value key, Eval(*e.kids[k], scope));
        SY_ASSIGN_OR_RETURN(Value val, Eval(*e.kids[k + 1], scope));
        if (key.kind != Value::kString) {
          return RenderError("only string keys are supported in dict literals");
        }
        d.dict->Set(key.s, std::move(val));
      }
      SY_RETURN_IF_ERROR(CheckNest(d));
      return d;
    }
    case Expr::kAttr: {
      SY_ASSIGN_OR_RETURN(Value obj, Eval(*e.kids[0], scope));
      return GetAttr(obj, e.name);
    }
    case Expr::kItem: {
      SY_ASSIGN_OR_RETURN(Value obj, Eval(*e.kids[0], scope));
      SY_ASSIGN_OR_RETURN(Value key, Eval(*e.kids[1], scope));
      return GetItem(obj, key);
    }
    case Expr::kSlice: {
      SY_ASSIGN_OR_RETURN(Value obj, Eval(*e.kids[0], scope));
      Value parts[3];
      for (int k = 0; k < 3; ++k) {
        if (e.kids[k + 1] == nullptr) continue;
        SY_ASSIGN_OR_RETURN(parts[k], Eval(*e.kids[k + 1], scope));
        if (parts[k].undefined()) return UndefinedError(parts[k]);
        if (parts[k].kind != Value::kNone && parts[k].kind != Value::kInt &&
            parts[k].kind != Value::kBool) {
          return RenderError("slice indices must be integers or None or have an __index__ method");
        }
      }
      const int64_t step = parts[2].kind == Value::kInt ? parts[2].i : 1;
      if (step == 0) return RenderError("slice step cannot be zero");
      auto bound = [&](int k) -> const Value* {
        return parts[k].kind == Value::kInt || parts[k].kind == Value::kBool ? &parts[k] : nullptr;
      };
      if (obj.undefined()) return UndefinedError(obj);
      if (obj.kind == Value::kList) {
        ValueList out;
        for (int64_t k :
             SliceIndices(static_cast<int64_t>(obj.list->size()), bound(0), bound(1), step)) {
          out.push_back((*obj.list)[k]);
        }
        SY_RETURN_IF_ERROR(StepN(static_cast<int64_t>(out.size())));
        return Value::List(std::move(out), obj.tuple);
      }
      if (obj.kind == Value::kString) {
        std::u32string u = Decode(obj.s), r;
        for (int64_t k : SliceIndices(static_cast<int64_t>(u.size()), bound(0), bound(1), step)) {
          r.push_back(u[k]);
        }
        std::string s = Encode(r);
        SY_RETURN_IF_ERROR(Charge(s.size()));
        return Value::Str(std::move(s));
      }
      return RenderError(absl::StrCat("'", TypeName(obj), "' object is not subscriptable"));
    }
    case Expr::kCall: {
      SY_ASSIGN_OR_RETURN(Value fn, Eval(*e.kids[0], scope));
      SY_ASSIGN_OR_RETURN(Args args, EvalArgs(e, 1, scope));
      return Call(fn, args);
    }
    case Expr::kFilter: {
      SY_ASSIGN_OR_RETURN(Value v, Eval(*e.kids[0], scope));
      SY_ASSIGN_OR_RETURN(Args args, EvalArgs(e, 1, scope));
      return ApplyFilter(e.name, v, args, scope);
    }
    case Expr::kTest: {
      SY_ASSIGN_OR_RETURN(Value v, Eval(*e.kids[0], scope));
      SY_ASSIGN_OR_RETURN(Args args, EvalArgs(e, 1, scope));
      SY_ASSIGN_OR_RETURN(bool r, ApplyTest(e.name, v, args));
      return Value::Bool(r != e.negated);
    }
    case Expr::kNeg:
    case Expr::kPos: {
      SY_ASSIGN_OR_RETURN(Value v, Eval(*e.kids[0], scope));
      if (v.undefined()) return UndefinedError(v);
      if (!v.numeric()) {
        return RenderError(absl::StrCat("bad operand type for unary ",
                                        e.kind == Expr::kNeg ? "-" : "+", ": '", TypeName(v), "'"));
      }
      if (e.kind == Expr::kPos) return v.kind == Value::kBool ? Value::Int(v.AsInt()) : v;
      if (v.kind == Value::kFloat) return Value::Float(-v.f);
      if (v.AsInt() == INT64_MIN) return IntegerOverflow();
      return Value::Int(-v.AsInt());
    }
    case Expr::kNot: {
      SY_ASSIGN_OR_RETURN(Value v, Eval(*e.kids[0], scope));
      return Value::Bool(!Truthy(v));
    }
    case Expr::kAnd:
    case Expr::kOr: {
      SY_ASSIGN_OR_RETURN(Value l, Eval(*e.kids[0], scope));
      if (Truthy(l) == (e.kind == Expr::kOr)) return l;
      return Eval(*e.kids[1], scope);
    }
    case Expr::kBinary: {
      SY_ASSIGN_OR_RETURN(Value l, Eval(*e.kids[0], scope));
      SY_ASSIGN_OR_RETURN(Value r, Eval(*e.kids[1], scope));
      return Binary(e.name, l, r);
    }
    case Expr::kCompare: {
      SY_ASSIGN_OR_RETURN(Value left, Eval(*e.kids[0], scope));
      for (size_t k = 0; k < e.ops.size(); ++k) {
        SY_ASSIGN_OR_RETURN(Value right, Eval(*e.kids[k + 1], scope));
        const std::string& op = e.ops[k];
        bool r;
        if (op == "==") {
          r = Equal(left, right);
        } else if (op == "!=") {
          r = !Equal(left, right);
        } else if (op == "in" || op == "notin") {
          if (right.kind == Value::kList) {
            SY_RETURN_IF_ERROR(StepN(static_cast<int64_t>(right.list->size())));
          }
          SY_ASSIGN_OR_RETURN(r, Contains(right, left));
          if (op == "notin") r = !r;
        } else {
          SY_ASSIGN_OR_RETURN(int c, Compare(left, right, op));
          r = op == "<" ? c < 0 : op == "<=" ? c <= 0 : op == ">" ? c > 0 : c >= 0;
        }
        if (!r) return Value::Bool(false);
        left = std::move(right);
      }
      return Value::Bool(true);
    }
    case Expr::kCond: {
      SY_ASSIGN_OR_RETURN(Value c, Eval(*e.kids[0], scope));
      if (Truthy(c)) return Eval(*e.kids[1], scope);
      if (e.kids[2] == nullptr) {
        return Value::Undef("the inline if-expression on line " + std::to_string(e.line) +
                            " evaluated to false and no else section was defined.");
      }
      return Eval(*e.kids[2], scope);
    }
    case Expr::kConcat: {
      std::string out;
      for (const auto& k : e.kids) {
        SY_ASSIGN_OR_RETURN(Value v, Eval(*k, scope));
        std::string s = Str(v);
        SY_RETURN_IF_ERROR(Charge(s.size()));
        out += s;
        if (static_cast<int64_t>(out.size()) > limits_.max_output_bytes) {
          return Exhausted("bytes in one value", limits_.max_output_bytes);
        }
      }
      return Value::Str(std::move(out));
    }
  }
  return RenderError("unknown expression");
}

absl::Status Context::Assign(const std::vector<std::string>& targets, const Value& v,
                             Scope* scope) {
  if (targets.size() == 1) {
    scope->vars[targets[0]] = v;
    return absl::OkStatus();
  }
  SY_ASSIGN_OR_RETURN(ValueList items, Items(v, *this));
  if (items.size() != targets.size()) {
    return RenderError(
        items.size() < targets.size()
            ? absl::StrCat("not enough values to unpack (expected ", targets.size(), ", got ",
                           items.size(), ")")
            : absl::StrCat("too many values to unpack (expected ", targets.size(), ")"));
  }
  for (size_t k = 0; k < targets.size(); ++k) scope->vars[targets[k]] = items[k];
  return absl::OkStatus();
}

Value Context::MakeMacro(const Stmt& s, const ScopePtr& scope) {
  const Stmt* macro = &s;
  // Weak: the macro is stored in that scope, and a strong pointer would be a
  // cycle that outlives the render.
  std::weak_ptr<Scope> defined_in = scope;
  return Value::Func(
      s.text, [macro, defined_in](Context& ctx, Args& args) -> absl::StatusOr<Value> {
        if (args.pos.size() > macro->params.size()) {
          return RenderError(absl::StrCat("macro '", macro->text, "' takes not more than ",
                                          macro->params.size(), " argument(s)"));
        }
        if (ctx.call_depth_ >= ctx.limits_.max_call_depth) {
          return Exhausted("nested macro calls", ctx.limits_.max_call_depth);
        }
        auto frame = std::make_shared<Scope>();
        frame->parent = defined_in.lock();
        if (frame->parent == nullptr) {
          return RenderError(
              absl::StrCat("macro '", macro->text, "' called after its scope ended"));
        }
        for (size_t k = 0; k < macro->params.size(); ++k) {
          const std::string& p = macro->params[k];
          if (k < args.pos.size()) {
            frame->vars[p] = args.pos[k];
            continue;
          }
          bool found = false;
          for (const auto& [name, v] : args.kw) {
            if (name == p) {
              frame->vars[p] = v;
              found = true;
            }
          }
          if (found) continue;
          if (macro->defaults[k] != nullptr) {
            SY_ASSIGN_OR_RETURN(frame->vars[p], ctx.Eval(*macro->defaults[k], frame));
          } else {
            frame->vars[p] = Value::Undef(absl::StrCat("'", p, "' is undefined"));
          }
        }
        for (const auto& [name, v] : args.kw) {
          if (std::find(macro->params.begin(), macro->params.end(), name) == macro->params.end()) {
            return RenderError(
                absl::StrCat("macro '", macro->text, "' takes no keyword argument '", name, "'"));
          }
        }
        std::string out;
        ++ctx.call_depth_;
        absl::StatusOr<Flow> flow = ctx.Exec(macro->bodies[0], frame, &out);
        --ctx.call_depth_;
        if (!flow.ok()) return flow.status();
        return Value::Str(std::move(out));
      });
}

absl::StatusOr<Flow> Context::Exec(const Body& body, const ScopePtr& scope, std::string* out) {
  if (++depth_ > limits_.max_render_depth) {
    --depth_;
    return Exhausted("nested evaluations", limits_.max_render_depth);
  }
  for (const Stmt& s : body) {
    absl::StatusOr<Flow> f = ExecOne(s, scope, out);
    if (!f.ok() || *f != Flow::kNormal) {
      --depth_;
      return f;
    }
  }
  --depth_;
  return Flow::kNormal;
}

absl::StatusOr<Flow> Context::ExecFor(const Stmt& s, const ScopePtr& scope, std::string* out) {
  SY_ASSIGN_OR_RETURN(Value iterable, Eval(*s.expr, scope));
  SY_ASSIGN_OR_RETURN(ValueList items, Items(iterable, *this));
  if (s.filter != nullptr) {
    ValueList kept;
    for (const Value& x : items) {
      SY_RETURN_IF_ERROR(Iterate());
      auto probe = std::make_shared<Scope>();
      probe->parent = scope;
      SY_RETURN_IF_ERROR(Assign(s.targets, x, probe.get()));
      SY_ASSIGN_OR_RETURN(Value c, Eval(*s.filter, probe));
      if (Truthy(c)) kept.push_back(x);
    }
    items = std::move(kept);
  }
  if (items.empty()) {
    auto inner = std::make_shared<Scope>();
    inner->parent = scope;
    SY_ASSIGN_OR_RETURN(Flow f, Exec(s.else_body, inner, out));
    (void)f;
    return Flow::kNormal;
  }
  const int64_t n = static_cast<int64_t>(items.size());
  for (int64_t k = 0; k < n; ++k) {
    SY_RETURN_IF_ERROR(Iterate());
    auto inner = std::make_shared<Scope>();
    inner->parent = scope;
    SY_RETURN_IF_ERROR(Assign(s.targets, items[k], inner.get()));
    auto loop = std::make_shared<Dict>();
    loop->Set("index0", Value::Int(k));
    loop->Set("index", Value::Int(k + 1));
    loop->Set("revindex", Value::Int(n - k));
    loop->Set("revindex0", Value::Int(n - k - 1));
    loop->Set("first", Value::Bool(k == 0));
    loop->Set("last", Value::Bool(k == n - 1));
    loop->Set("length", Value::Int(n));
    loop->Set("depth", Value::Int(1));
    loop->Set("depth0", Value::Int(0));
    loop->Set("previtem", k > 0 ? items[k - 1] : Value::Undef("there is no previous item"));
    loop->Set("nextitem", k + 1 < n ? items[k + 1] : Value::Undef("there is no next item"));
    Value loop_value = Value::MakeDict(loop);
    loop_value.is_namespace = true;  // not iterable, prints as an object
    inner->vars["loop"] = loop_value;
    SY_ASSIGN_OR_RETURN(Flow f, Exec(s.bodies[0], inner, out));
    if (f == Flow::kBreak) break;
  }
  return Flow::kNormal;
}

absl::StatusOr<Flow> Context::ExecOne(const Stmt& s, const ScopePtr& scope, std::string* out) {
  SY_RETURN_IF_ERROR(Step());
  switch (s.kind) {
    case Stmt::kText:
      SY_RETURN_IF_ERROR(Emit(s.text, out));
      return Flow::kNormal;
    case Stmt::kOutput: {
      SY_ASSIGN_OR_RETURN(Value v, Eval(*s.expr, scope));
      SY_RETURN_IF_ERROR(Emit(Str(v), out));
      return Flow::kNormal;
    }
    case Stmt::kIf:
      for (size_t k = 0; k < s.conds.size(); ++k) {
        SY_ASSIGN_OR_RETURN(Value c, Eval(*s.conds[k], scope));
        if (Truthy(c)) return Exec(s.bodies[k], scope, out);
      }
      return Exec(s.else_body, scope, out);
    case Stmt::kFor:
      return ExecFor(s, scope, out);
    case Stmt::kSet: {
      SY_ASSIGN_OR_RETURN(Value v, Eval(*s.expr, scope));
      if (s.target_obj != nullptr) {
        SY_ASSIGN_OR_RETURN(Value obj, Eval(*s.target_obj, scope));
        if (obj.kind != Value::kDict || !obj.is_namespace || obj.dict->Find("index0") != nullptr) {
          return RenderError("cannot assign attribute on non-namespace object");
        }
        // A namespace inside a namespace could make a cycle (set ns.a = ns).
        int64_t visited = 0;
        const bool holds = HoldsNamespace(v, &visited);
        SY_RETURN_IF_ERROR(StepN(visited));
        if (holds) return RenderError("a namespace cannot hold a namespace");
        obj.dict->Set(s.target_attr, std::move(v));
        SY_RETURN_IF_ERROR(CheckNest(obj));
        return Flow::kNormal;
      }
      SY_RETURN_IF_ERROR(Assign(s.targets, v, scope.get()));
      return Flow::kNormal;
    }
    case Stmt::kSetBlock: {
      std::string captured;
      SY_ASSIGN_OR_RETURN(Flow f, Exec(s.bodies[0], scope, &captured));
      (void)f;
      scope->vars[s.targets[0]] = Value::Str(std::move(captured));
      return Flow::kNormal;
    }
    case Stmt::kMacro:
      scope->vars[s.text] = MakeMacro(s, scope);
      return Flow::kNormal;
    case Stmt::kBreak:
      return Flow::kBreak;
    case Stmt::kContinue:
      return Flow::kContinue;
    case Stmt::kBlock:
      return Exec(s.bodies[0], scope, out);
  }
  return Flow::kNormal;
}

ScopePtr Globals() {
  auto g = std::make_shared<Scope>();
  g->vars["raise_exception"] =
      Value::Func("raise_exception", [](Context&, Args& a) -> absl::StatusOr<Value> {
        const Value* m = a.Get(0, "message");
        return absl::InvalidArgumentError(m ? Str(*m) : "");
      });
  g->vars["namespace"] =
      Value::Func("namespace", [](Context& ctx, Args& a) -> absl::StatusOr<Value> {
        Value ns = NewDict();
        ns.is_namespace = true;
        if (!a.pos.empty()) {
          if (a.pos[0].kind != Value::kDict) return RenderError("namespace() takes a mapping");
          for (const auto& [k, v] : a.pos[0].dict->items) ns.dict->Set(k, v);
        }
        for (const auto& [k, v] : a.kw) {
          // A namespace inside a namespace could make a cycle (set ns.a = ns).
          int64_t visited = 0;
          const bool holds = HoldsNamespace(v, &visited);
          SY_RETURN_IF_ERROR(ctx.StepN(visited));
          if (holds) return RenderError("a namespace cannot hold a namespace");
          ns.dict->Set(k, v);
        }
        SY_RETURN_IF_ERROR(CheckNest(ns));
        return ns;
      });
  g->vars["dict"] = Value::Func("dict", [](Context&, Args& a) -> absl::StatusOr<Value> {
    Value d = NewDict();
    for (const auto& [k, v] : a.kw) d.dict->Set(k, v);
    SY_RETURN_IF_ERROR(CheckNest(d));
    return d;
  });
  g->vars["range"] = Value::Func("range", [](Context& ctx, Args& a) -> absl::StatusOr<Value> {
    int64_t start = 0, stop = 0, step = 1;
    for (const Value& v : a.pos) {
      if (v.kind != Value::kInt && v.kind != Value::kBool) {
        return RenderError(
            absl::StrCat("'", TypeName(v), "' object cannot be interpreted as an integer"));
      }
    }
    if (a.pos.size() == 1) {
      stop = a.pos[0].AsInt();
    } else if (a.pos.size() >= 2) {
      start = a.pos[0].AsInt();
      stop = a.pos[1].AsInt();
      if (a.pos.size() >= 3) step = a.pos[2].AsInt();
    } else {
      return RenderError("range expected at least 1 argument, got 0");
    }
    if (step == 0) return RenderError("range() arg 3 must not be zero");
    const double count = std::ceil((static_cast<double>(stop) - start) / step);
    if (count > static_cast<double>(ctx.limits_.max_range)) {
      return Exhausted("items in range()", ctx.limits_.max_range);
    }
    ValueList out;
    for (int64_t v = start; step > 0 ? v < stop : v > stop;) {
      out.push_back(Value::Int(v));
      if (__builtin_add_overflow(v, step, &v)) break;
    }
    return Value::List(std::move(out));
  });
  return g;
}

// jinja2's lexer: str.splitlines() then "\n".join(), which normalizes every
// line break and drops one trailing newline.
std::string NormalizeNewlines(std::string_view src) {
  std::u32string u = Decode(src), out;
  std::vector<std::u32string> lines;
  std::u32string cur;
  for (size_t k = 0; k < u.size(); ++k) {
    const char32_t c = u[k];
    const bool brk = c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || c == 0x1C || c == 0x1D ||
                     c == 0x1E || c == 0x85 || c == 0x2028 || c == 0x2029;
    if (!brk) {
      cur.push_back(c);
      continue;
    }
    if (c == '\r' && k + 1 < u.size() && u[k + 1] == '\n') ++k;
    lines.push_back(std::move(cur));
    cur.clear();
  }
  if (!cur.empty()) lines.push_back(std::move(cur));
  for (size_t k = 0; k < lines.size(); ++k) {
    if (k) out.push_back('\n');
    out += lines[k];
  }
  return Encode(out);
}

}  // namespace

ChatTemplate::ChatTemplate(std::unique_ptr<ChatTemplateImpl> impl) : impl_(std::move(impl)) {}
ChatTemplate::~ChatTemplate() = default;

absl::StatusOr<std::unique_ptr<ChatTemplate>> ChatTemplate::Compile(std::string_view source,
                                                                    ChatTemplateLimits limits) {
  if (static_cast<int64_t>(source.size()) > limits.max_source_bytes) {
    return absl::InvalidArgumentError(absl::StrCat("chat template is ", source.size(),
                                                   " bytes, more than the limit of ",
                                                   limits.max_source_bytes));
  }
  Lexer lexer(NormalizeNewlines(source));
  SY_ASSIGN_OR_RETURN(std::vector<Piece> pieces, lexer.Run());
  Parser parser(std::move(pieces), limits.max_nesting);
  auto impl = std::make_unique<ChatTemplateImpl>();
  SY_ASSIGN_OR_RETURN(impl->body, parser.ParseTemplate());
  impl->limits = limits;
  return std::unique_ptr<ChatTemplate>(new ChatTemplate(std::move(impl)));
}

absl::StatusOr<std::string> ChatTemplate::Render(const nlohmann::ordered_json& variables) const {
  if (!variables.is_object()) {
    return absl::InvalidArgumentError("chat template variables must be a JSON object");
  }
  auto scope = std::make_shared<Scope>();
  scope->parent = Globals();
  for (auto it = variables.begin(); it != variables.end(); ++it) {
    scope->vars[it.key()] = FromJson(it.value());
  }
  Context ctx(impl_->limits);
  std::string out;
  SY_ASSIGN_OR_RETURN(Flow f, ctx.Exec(impl_->body, scope, &out));
  (void)f;
  return out;
}

absl::StatusOr<std::string> ChatTemplate::RenderChat(const nlohmann::ordered_json& messages,
                                                     bool add_generation_prompt) const {
  nlohmann::ordered_json vars = nlohmann::ordered_json::object();
  vars["messages"] = messages;
  vars["add_generation_prompt"] = add_generation_prompt;
  if (bos_token_) vars["bos_token"] = *bos_token_;
  if (eos_token_) vars["eos_token"] = *eos_token_;
  return Render(vars);
}

absl::StatusOr<TokenizerChatConfig> ParseTokenizerChatConfig(std::string_view json_text) {
  nlohmann::json j = nlohmann::json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError("tokenizer_config.json is not a JSON object");
  }
  TokenizerChatConfig out;
  if (j.contains("chat_template") && !j["chat_template"].is_null()) {
    const nlohmann::json& t = j["chat_template"];
    if (t.is_string()) {
      out.chat_template = t.get<std::string>();
    } else if (t.is_array()) {
      bool found = false;
      for (const nlohmann::json& entry : t) {
        if (!entry.is_object() || !entry.contains("name") || !entry.contains("template") ||
            !entry["name"].is_string() || !entry["template"].is_string()) {
          return absl::InvalidArgumentError(
              "tokenizer_config.json: chat_template entries must be {\"name\": string, "
              "\"template\": string}");
        }
        if (entry["name"] == "default") {
          out.chat_template = entry["template"].get<std::string>();
          found = true;
        }
      }
      if (!found) {
        return absl::InvalidArgumentError(
            "tokenizer_config.json: chat_template lists no template named \"default\"");
      }
    } else {
      return absl::InvalidArgumentError(
          "tokenizer_config.json: chat_template must be a string or a list of {name, template}");
    }
  }
  for (const char* key : {"bos_token", "eos_token"}) {
    if (!j.contains(key) || j[key].is_null()) continue;
    const nlohmann::json& t = j[key];
    std::optional<std::string> value;
    if (t.is_string()) {
      value = t.get<std::string>();
    } else if (t.is_object() && t.contains("content") && t["content"].is_string()) {
      value = t["content"].get<std::string>();
    } else {
      return absl::InvalidArgumentError(absl::StrCat(
          "tokenizer_config.json: ", key, " must be a string or an object with \"content\""));
    }
    (std::string_view(key) == "bos_token" ? out.bos_token : out.eos_token) = value;
  }
  return out;
}

absl::StatusOr<std::unique_ptr<ChatTemplate>> LoadChatTemplate(const std::string& model_dir,
                                                               const std::string& template_file,
                                                               ChatTemplateLimits limits) {
  auto read = [](const std::string& path) -> absl::StatusOr<std::string> {
    std::ifstream in(path, std::ios::binary);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  };
  TokenizerChatConfig config;
  const std::string config_path = model_dir + "/tokenizer_config.json";
  if (!model_dir.empty()) {
    absl::StatusOr<std::string> text = read(config_path);
    if (text.ok()) {
      absl::StatusOr<TokenizerChatConfig> parsed = ParseTokenizerChatConfig(*text);
      if (!parsed.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat(config_path, ": ", parsed.status().message()));
      }
      config = *std::move(parsed);
    } else if (template_file.empty()) {
      return absl::NotFoundError(absl::StrCat("no chat template: cannot read ", config_path));
    }
  }
  std::string source;
  std::string where;
  if (!template_file.empty()) {
    SY_ASSIGN_OR_RETURN(source, read(template_file));
    where = template_file;
  } else {
    if (config.chat_template.empty()) {
      return absl::NotFoundError(absl::StrCat(
          "no chat template: ", model_dir.empty() ? "no model or template file given"
                                                  : config_path + " has no chat_template"));
    }
    source = config.chat_template;
    where = config_path;
  }
  absl::StatusOr<std::unique_ptr<ChatTemplate>> compiled = ChatTemplate::Compile(source, limits);
  if (!compiled.ok()) {
    return absl::Status(compiled.status().code(),
                        absl::StrCat(where, ": ", compiled.status().message()));
  }
  if (config.bos_token) (*compiled)->set_bos_token(*config.bos_token);
  if (config.eos_token) (*compiled)->set_eos_token(*config.eos_token);
  return compiled;
}

}  // namespace switchyard
