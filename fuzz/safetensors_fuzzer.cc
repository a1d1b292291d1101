// libFuzzer target: ParseSafetensorsHeader over arbitrary file contents. It
// must never crash, and a header it accepts must describe tensors that lie
// inside the data section, do not overlap, and have the byte size their dtype
// and shape need.
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/dtype.h"
#include "core/safetensors.h"
#include "fuzz/fuzz_check.h"

using switchyard::ParseSafetensorsHeader;
using switchyard::SafetensorsEntry;
using switchyard::SafetensorsHeader;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const absl::Span<const uint8_t> bytes(data, size);
  absl::StatusOr<SafetensorsHeader> parsed = ParseSafetensorsHeader(bytes, "fuzz");
  if (!parsed.ok()) {
    const absl::StatusCode code = parsed.status().code();
    FUZZ_CHECK(code == absl::StatusCode::kInvalidArgument || code == absl::StatusCode::kDataLoss,
               "unexpected error code: %s", parsed.status().ToString().c_str());
    FUZZ_CHECK(parsed.status().message().substr(0, 4) == "fuzz", "error does not name the file: %s",
               parsed.status().ToString().c_str());
    return 0;
  }
  const SafetensorsHeader& h = *parsed;

  // The data section starts right after the 8-byte length and the JSON.
  FUZZ_CHECK(size >= 8, "accepted a %zu-byte file", size);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | data[i];
  FUZZ_CHECK(h.data_section_offset == 8 + header_len, "data_section_offset %llu, header %llu",
             static_cast<unsigned long long>(h.data_section_offset),
             static_cast<unsigned long long>(header_len));
  FUZZ_CHECK(h.data_section_offset <= size, "data section starts past the end");
  FUZZ_CHECK(header_len <= switchyard::kMaxSafetensorsHeaderBytes, "absurd header accepted");
  const uint64_t data_size = size - h.data_section_offset;

  std::vector<const SafetensorsEntry*> by_offset;
  for (size_t i = 0; i < h.tensors.size(); ++i) {
    const SafetensorsEntry& e = h.tensors[i];
    FUZZ_CHECK(e.name != "__metadata__", "__metadata__ parsed as a tensor");
    if (i > 0) {
      FUZZ_CHECK(h.tensors[i - 1].name < e.name, "tensors not sorted by unique name at %zu", i);
    }
    FUZZ_CHECK(h.Find(e.name) == &e, "Find('%s') does not return its entry", e.name.c_str());
    FUZZ_CHECK(e.data_begin <= e.data_end, "tensor '%s': end < begin", e.name.c_str());
    FUZZ_CHECK(e.data_end <= data_size, "tensor '%s': ends at %llu, data section has %llu bytes",
               e.name.c_str(), static_cast<unsigned long long>(e.data_end),
               static_cast<unsigned long long>(data_size));
    for (int64_t d : e.shape) FUZZ_CHECK(d >= 0, "tensor '%s': negative dimension", e.name.c_str());
    absl::StatusOr<uint64_t> nbytes = switchyard::TensorByteSize(e.dtype, e.shape);
    FUZZ_CHECK(nbytes.ok() && *nbytes == e.nbytes(), "tensor '%s': size does not match shape",
               e.name.c_str());
    // Touch the tensor's first and last byte: ASan checks they are inside the input.
    if (e.nbytes() > 0) {
      const uint8_t* p = data + h.data_section_offset + e.data_begin;
      volatile uint8_t sink = p[0] ^ p[e.nbytes() - 1];
      (void)sink;
      by_offset.push_back(&e);
    }
  }
  // No two tensors share bytes.
  std::sort(by_offset.begin(), by_offset.end(),
            [](const SafetensorsEntry* a, const SafetensorsEntry* b) {
              return a->data_begin < b->data_begin;
            });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    FUZZ_CHECK(by_offset[i - 1]->data_end <= by_offset[i]->data_begin,
               "tensors '%s' and '%s' overlap", by_offset[i - 1]->name.c_str(),
               by_offset[i]->name.c_str());
  }
  return 0;
}
