// UTF-8 validity, as the Generation API promises it for every text it sends.
#ifndef SWITCHYARD_CORE_UTF8_H_
#define SWITCHYARD_CORE_UTF8_H_

#include <string_view>

namespace switchyard {

// True if `s` is well-formed UTF-8 (no overlongs, surrogates or code points
// above U+10FFFF).
inline bool IsValidUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    int extra;
    unsigned char lo = 0x80, hi = 0xbf;  // bounds of the second byte
    if (c < 0x80) {
      extra = 0;
    } else if (c >= 0xc2 && c <= 0xdf) {
      extra = 1;
    } else if (c >= 0xe0 && c <= 0xef) {
      extra = 2;
      if (c == 0xe0) lo = 0xa0;
      if (c == 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      extra = 3;
      if (c == 0xf0) lo = 0x90;
      if (c == 0xf4) hi = 0x8f;
    } else {
      return false;
    }
    if (extra > 0 && i + extra >= s.size()) return false;  // truncated sequence
    for (int k = 1; k <= extra; ++k) {
      const unsigned char b = static_cast<unsigned char>(s[i + k]);
      const unsigned char min = k == 1 ? lo : 0x80, max = k == 1 ? hi : 0xbf;
      if (b < min || b > max) return false;
    }
    i += extra + 1;
  }
  return true;
}

}  // namespace switchyard

#endif  // SWITCHYARD_CORE_UTF8_H_
