// The safetensors file format (https://github.com/huggingface/safetensors):
// an 8-byte little-endian header length N, N bytes of JSON header, then the
// tensor data. The header maps each tensor name to
//   {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [begin, end]}
// with offsets relative to the start of the data section, and may hold a
// "__metadata__" object of string -> string.
//
// Reading: SafetensorsFile::Open memory-maps a file read-only and validates
// its header and every tensor's extent; ParseSafetensorsHeader is the same
// validation as a pure function over bytes (the fuzz target). Nothing here
// crashes on malformed input: every problem is an error status naming the
// file and, where there is one, the tensor.
//
// Error codes:
//   NotFound          the file does not exist; View of an absent tensor.
//   DataLoss          the bytes end too early: file shorter than 8 bytes,
//                     header length past the end of the file, tensor data
//                     past the end of the file (a truncated download).
//   InvalidArgument   anything else malformed: absurd header length, bad
//                     JSON, missing or mistyped keys, an unsupported dtype
//                     (named), negative dimensions, data_offsets end < begin,
//                     overlapping tensors, a byte size that does not match
//                     dtype and shape.
//
// Writing: SafetensorsWriter streams a file whose tensor list is known up
// front (offsets follow from shapes), one tensor or one chunk at a time, so a
// multi-GB file never needs to be in memory. WriteSafetensors is the
// convenience form for tensors already in memory. The header is padded with
// spaces so the data section starts 8-byte aligned, as the Hugging Face
// writer does.
#ifndef SWITCHYARD_CORE_SAFETENSORS_H_
#define SWITCHYARD_CORE_SAFETENSORS_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "core/dtype.h"

namespace switchyard {

// Headers larger than this are rejected as absurd (the Hugging Face library
// uses the same limit).
inline constexpr uint64_t kMaxSafetensorsHeaderBytes = 100ull << 20;

// A stored tensor in place: its dtype, shape and bytes (little-endian,
// row-major, possibly unaligned). Does not own the bytes; valid while the
// file (or Checkpoint) it came from is alive.
struct TensorView {
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t nbytes = 0;

  // Product of the shape (1 for a scalar).
  int64_t num_elements() const;
};

// One tensor's header entry.
struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  // Byte range [data_begin, data_end) relative to the data section.
  uint64_t data_begin = 0;
  uint64_t data_end = 0;

  uint64_t nbytes() const { return data_end - data_begin; }
};

// A parsed and validated header.
struct SafetensorsHeader {
  // Absolute file offset of the data section (8 + JSON header length).
  uint64_t data_section_offset = 0;
  // Every tensor, sorted by name.
  std::vector<SafetensorsEntry> tensors;
  // The "__metadata__" object; non-string values are kept as their JSON text.
  std::map<std::string, std::string> metadata;

  // The entry named `name`, or nullptr.
  const SafetensorsEntry* Find(std::string_view name) const;
};

// Parses and validates the header of the safetensors file whose complete
// contents are `file_bytes`, including that every tensor's data lies inside
// `file_bytes`. `name_for_errors` (usually the path) prefixes every error
// message. Pure and thread-safe; never crashes on any input.
absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(absl::Span<const uint8_t> file_bytes,
                                                         const std::string& name_for_errors);

// A read-only memory-mapped safetensors file.
//
// Thread-safety: immutable after Open; all const methods may be called
// concurrently. Views point into the mapping and are valid until the
// SafetensorsFile is destroyed.
class SafetensorsFile {
 public:
  // Maps `path` and validates it (see the error codes above).
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  uint64_t file_size() const { return size_; }
  const SafetensorsHeader& header() const { return header_; }
  // Every tensor, sorted by name.
  const std::vector<SafetensorsEntry>& tensors() const { return header_.tensors; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }

  bool Contains(std::string_view name) const { return header_.Find(name) != nullptr; }
  // The entry named `name`, or nullptr.
  const SafetensorsEntry* Find(std::string_view name) const { return header_.Find(name); }
  // The stored tensor `name`; NotFound (naming file and tensor) if absent.
  absl::StatusOr<TensorView> View(std::string_view name) const;
  // The stored tensor of an entry of this file's header.
  TensorView View(const SafetensorsEntry& entry) const;

 private:
  SafetensorsFile(std::string path, const uint8_t* data, uint64_t size, SafetensorsHeader header);

  std::string path_;
  const uint8_t* data_;  // the mapping, size_ bytes
  uint64_t size_;
  SafetensorsHeader header_;
};

// A tensor's name, dtype and shape: what the header needs.
struct SafetensorsTensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
};

// A tensor with its data in memory, for WriteSafetensors.
struct SafetensorsTensor {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  // Exactly product(shape) * DTypeSize(dtype) bytes, little-endian row-major.
  absl::Span<const uint8_t> bytes;
};

// Bytes of a tensor of `dtype` and `shape`; InvalidArgument on a negative
// dimension or overflow.
absl::StatusOr<uint64_t> TensorByteSize(DType dtype, absl::Span<const int64_t> shape);

// Streams one safetensors file. Create writes the header; then the tensors'
// bytes are appended in the order given to Create, either whole
// (WriteTensor) or in pieces of any size (Append); Finish checks that every
// byte was written and moves the file into place. The data goes to
// `path`.tmp until Finish, so a failed or abandoned write never leaves a
// plausible-looking `path`; destroying an unfinished writer removes it.
//
// Thread-compatible: one thread at a time.
class SafetensorsWriter {
 public:
  // Errors: InvalidArgument for an empty or duplicate name, a name starting
  // with "__", a bad shape, or a non-UTF-8 name or metadata; filesystem
  // errors naming the path.
  static absl::StatusOr<std::unique_ptr<SafetensorsWriter>> Create(
      const std::string& path, std::vector<SafetensorsTensorInfo> tensors,
      const std::map<std::string, std::string>& metadata = {{"format", "pt"}});

  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  // Writes the whole of the next tensor, which must be named `name` and
  // have exactly its byte size; nothing of it may have been appended yet.
  absl::Status WriteTensor(std::string_view name, absl::Span<const uint8_t> bytes);
  // Appends bytes to the data section; pieces may span tensor boundaries.
  // FailedPrecondition past the end of the data.
  absl::Status Append(absl::Span<const uint8_t> bytes);
  // FailedPrecondition unless every byte of every tensor was written.
  absl::Status Finish();

  // Total bytes of the data section and bytes written so far.
  uint64_t data_bytes() const { return data_bytes_; }
  uint64_t bytes_written() const { return written_; }
  const std::string& path() const { return path_; }

 private:
  SafetensorsWriter(std::string path, int fd, std::vector<SafetensorsTensorInfo> tensors,
                    std::vector<uint64_t> ends);
  absl::Status WriteAll(const uint8_t* data, size_t size);
  uint64_t Begin(size_t i) const { return i == 0 ? 0 : ends_[i - 1]; }
  void Abandon();

  std::string path_;
  std::string tmp_path_;
  int fd_;
  std::vector<SafetensorsTensorInfo> tensors_;
  std::vector<uint64_t> ends_;  // data_end of each tensor
  uint64_t data_bytes_ = 0;
  uint64_t written_ = 0;
  size_t next_ = 0;  // the tensor WriteTensor expects next
  bool finished_ = false;
};

// Writes `tensors` (in that order) to `path` in one go.
absl::Status WriteSafetensors(const std::string& path, absl::Span<const SafetensorsTensor> tensors,
                              const std::map<std::string, std::string>& metadata = {
                                  {"format", "pt"}});

}  // namespace switchyard

#endif  // SWITCHYARD_CORE_SAFETENSORS_H_
