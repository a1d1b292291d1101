// UTF-8 validity, as the Generation API promises it for every text it sends.
// Validity follows Rust's String::from_utf8 (no overlongs, no surrogates,
// nothing above U+10FFFF), which is what Hugging Face `tokenizers` uses.
#ifndef SWITCHYARD_CORE_UTF8_H_
#define SWITCHYARD_CORE_UTF8_H_

#include <cstddef>
#include <string_view>

namespace switchyard {

// Length of the valid UTF-8 sequence starting at s[i], or 0 if invalid.
inline size_t ValidUtf8Len(std::string_view s, size_t i) {
  const auto b = [&](size_t k) { return static_cast<unsigned char>(s[k]); };
  const unsigned char c = b(i);
  const size_t left = s.size() - i;
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) {
    return (left >= 2 && (b(i + 1) & 0xC0) == 0x80) ? 2 : 0;
  }
  if (c >= 0xE0 && c <= 0xEF) {
    if (left < 3) return 0;
    const unsigned char c1 = b(i + 1);
    const unsigned char lo = c == 0xE0 ? 0xA0 : 0x80;
    const unsigned char hi = c == 0xED ? 0x9F : 0xBF;
    if (c1 < lo || c1 > hi || (b(i + 2) & 0xC0) != 0x80) return 0;
    return 3;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    if (left < 4) return 0;
    const unsigned char c1 = b(i + 1);
    const unsigned char lo = c == 0xF0 ? 0x90 : 0x80;
    const unsigned char hi = c == 0xF4 ? 0x8F : 0xBF;
    if (c1 < lo || c1 > hi || (b(i + 2) & 0xC0) != 0x80 || (b(i + 3) & 0xC0) != 0x80) return 0;
    return 4;
  }
  return 0;
}

// True if `s` is well-formed UTF-8.
inline bool IsValidUtf8(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const size_t n = ValidUtf8Len(s, i);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

}  // namespace switchyard

#endif  // SWITCHYARD_CORE_UTF8_H_
