#include "core/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/status_macros.h"
#include "nlohmann/json.hpp"

namespace switchyard {
namespace {

using nlohmann::json;

absl::Status ErrnoError(int err, const std::string& path, const char* what) {
  const std::string msg = absl::StrCat(path, ": ", what, ": ", std::strerror(err));
  switch (err) {
    case ENOENT:
    case ENOTDIR:
      return absl::NotFoundError(msg);
    case EACCES:
    case EPERM:
      return absl::PermissionDeniedError(msg);
    default:
      return absl::InternalError(msg);
  }
}

// Reads a JSON value that must be a non-negative integer.
absl::StatusOr<uint64_t> ReadUnsigned(const json& v) {
  if (v.is_number_unsigned()) return v.get<uint64_t>();
  if (v.is_number_integer()) {
    return absl::InvalidArgumentError(absl::StrCat("negative value ", v.get<int64_t>()));
  }
  return absl::InvalidArgumentError("not an integer");
}

std::string ShapeString(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// JSON string literal for `s`; InvalidArgument if `s` is not valid UTF-8.
absl::StatusOr<std::string> JsonString(const std::string& s) {
  // dump() with the "replace" handler never throws; compare against the
  // strict result by checking for a changed round trip.
  const std::string out = json(s).dump(-1, ' ', false, json::error_handler_t::replace);
  json back = json::parse(out, nullptr, /*allow_exceptions=*/false);
  if (back.is_discarded() || !back.is_string() || back.get_ref<const std::string&>() != s) {
    return absl::InvalidArgumentError(absl::StrCat("'", out, "' is not valid UTF-8"));
  }
  return out;
}

// A safetensors header nests 3 deep; anything much deeper is hostile input
// that would only cost the JSON parser memory.
constexpr int kMaxJsonDepth = 16;

// The deepest nesting of objects and arrays in [begin, end), ignoring
// brackets inside strings. Stops counting once past kMaxJsonDepth.
int JsonNestingDepth(const uint8_t* begin, const uint8_t* end) {
  int depth = 0, max_depth = 0;
  bool in_string = false;
  for (const uint8_t* p = begin; p < end; ++p) {
    if (in_string) {
      if (*p == '\\') {
        ++p;
      } else if (*p == '"') {
        in_string = false;
      }
    } else if (*p == '"') {
      in_string = true;
    } else if (*p == '{' || *p == '[') {
      max_depth = std::max(max_depth, ++depth);
      if (max_depth > kMaxJsonDepth) break;
    } else if (*p == '}' || *p == ']') {
      --depth;
    }
  }
  return max_depth;
}

}  // namespace

int64_t TensorView::num_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

const SafetensorsEntry* SafetensorsHeader::Find(std::string_view name) const {
  auto it = std::lower_bound(
      tensors.begin(), tensors.end(), name,
      [](const SafetensorsEntry& e, std::string_view n) { return std::string_view(e.name) < n; });
  if (it == tensors.end() || it->name != name) return nullptr;
  return &*it;
}

absl::StatusOr<uint64_t> TensorByteSize(DType dtype, absl::Span<const int64_t> shape) {
  uint64_t n = DTypeSize(dtype);
  for (int64_t d : shape) {
    if (d < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("negative dimension in shape ", ShapeString(shape)));
    }
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n)) {
      return absl::InvalidArgumentError(
          absl::StrCat("shape ", ShapeString(shape), " is too large"));
    }
  }
  return n;
}

absl::StatusOr<SafetensorsHeader> ParseSafetensorsHeader(absl::Span<const uint8_t> file_bytes,
                                                         const std::string& name_for_errors) {
  const std::string& file = name_for_errors;
  const uint64_t size = file_bytes.size();
  if (size < 8) {
    return absl::DataLossError(absl::StrCat(
        file, ": file is ", size, " bytes, shorter than the 8-byte safetensors header length"));
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | file_bytes[i];
  if (header_len > size - 8) {
    return absl::DataLossError(absl::StrCat(file, ": header length ", header_len,
                                            " extends past the end of the file (", size,
                                            " bytes); truncated or not a safetensors file"));
  }
  if (header_len > kMaxSafetensorsHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": header length ", header_len,
                                                   " is absurd (limit ", kMaxSafetensorsHeaderBytes,
                                                   " bytes)"));
  }
  const uint8_t* hbegin = file_bytes.data() + 8;
  const uint8_t* hend = hbegin + header_len;
  if (header_len == 0 || *hbegin != '{') {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": header is not a JSON object (does not start with '{')"));
  }
  if (JsonNestingDepth(hbegin, hend) > kMaxJsonDepth) {
    return absl::InvalidArgumentError(
        absl::StrCat(file, ": header JSON is nested more than ", kMaxJsonDepth, " levels deep"));
  }
  json j = json::parse(hbegin, hend, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": header is not valid JSON"));
  }
  if (!j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(file, ": header is not a JSON object"));
  }

  SafetensorsHeader header;
  header.data_section_offset = 8 + header_len;
  const uint64_t data_size = size - header.data_section_offset;
  header.tensors.reserve(j.size());
  for (const auto& item : j.items()) {
    // Plain references, not a structured binding: lambdas below capture them.
    const std::string& key = item.key();
    const json& value = item.value();
    if (key == "__metadata__") {
      if (!value.is_object()) {
        return absl::InvalidArgumentError(
            absl::StrCat(file, ": '__metadata__' is not a JSON object"));
      }
      for (const auto& [mk, mv] : value.items()) {
        header.metadata[mk] = mv.is_string()
                                  ? mv.get<std::string>()
                                  : mv.dump(-1, ' ', false, json::error_handler_t::replace);
      }
      continue;
    }
    auto bad = [&](const std::string& what) {
      return absl::InvalidArgumentError(absl::StrCat(file, ": tensor '", key, "': ", what));
    };
    if (!value.is_object()) return bad("header entry is not a JSON object");
    SafetensorsEntry e;
    e.name = key;

    auto dt = value.find("dtype");
    if (dt == value.end()) return bad("missing 'dtype'");
    if (!dt->is_string()) return bad("'dtype' is not a string");
    const std::string& dtype_name = dt->get_ref<const std::string&>();
    absl::StatusOr<DType> dtype = ParseDType(dtype_name);
    if (!dtype.ok()) return bad(absl::StrCat("unsupported dtype '", dtype_name, "'"));
    e.dtype = *dtype;

    auto sh = value.find("shape");
    if (sh == value.end()) return bad("missing 'shape'");
    if (!sh->is_array()) return bad("'shape' is not an array");
    e.shape.reserve(sh->size());
    for (const json& d : *sh) {
      absl::StatusOr<uint64_t> dim = ReadUnsigned(d);
      if (!dim.ok()) return bad(absl::StrCat("bad 'shape' dimension: ", dim.status().message()));
      if (*dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return bad("'shape' dimension too large");
      }
      e.shape.push_back(static_cast<int64_t>(*dim));
    }

    auto off = value.find("data_offsets");
    if (off == value.end()) return bad("missing 'data_offsets'");
    if (!off->is_array() || off->size() != 2) return bad("'data_offsets' is not [begin, end]");
    absl::StatusOr<uint64_t> begin = ReadUnsigned((*off)[0]);
    absl::StatusOr<uint64_t> end = ReadUnsigned((*off)[1]);
    if (!begin.ok()) return bad(absl::StrCat("bad 'data_offsets': ", begin.status().message()));
    if (!end.ok()) return bad(absl::StrCat("bad 'data_offsets': ", end.status().message()));
    if (*end < *begin) {
      return bad(absl::StrCat("data_offsets end ", *end, " < begin ", *begin));
    }
    e.data_begin = *begin;
    e.data_end = *end;

    absl::StatusOr<uint64_t> expected = TensorByteSize(e.dtype, e.shape);
    if (!expected.ok()) return bad(std::string(expected.status().message()));
    if (*expected != e.nbytes()) {
      return bad(absl::StrCat("data_offsets [", e.data_begin, ", ", e.data_end, ") hold ",
                              e.nbytes(), " bytes but ", dtype_name, " ", ShapeString(e.shape),
                              " needs ", *expected));
    }
    if (e.data_end > data_size) {
      return absl::DataLossError(absl::StrCat(file, ": tensor '", key, "': data_offsets [",
                                              e.data_begin, ", ", e.data_end,
                                              ") extend past the end of the file (data section is ",
                                              data_size, " bytes); the file is truncated"));
    }
    header.tensors.push_back(std::move(e));
  }

  // No two tensors may share bytes.
  std::vector<const SafetensorsEntry*> by_offset;
  by_offset.reserve(header.tensors.size());
  for (const SafetensorsEntry& e : header.tensors) by_offset.push_back(&e);
  std::sort(by_offset.begin(), by_offset.end(), [](const auto* a, const auto* b) {
    return std::pair(a->data_begin, a->data_end) < std::pair(b->data_begin, b->data_end);
  });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    if (by_offset[i]->data_begin < by_offset[i - 1]->data_end) {
      return absl::InvalidArgumentError(absl::StrCat(file, ": tensor '", by_offset[i]->name,
                                                     "' overlaps tensor '", by_offset[i - 1]->name,
                                                     "'"));
    }
  }
  // json objects iterate in key order, so tensors are already sorted; keep
  // the invariant explicit.
  std::sort(header.tensors.begin(), header.tensors.end(),
            [](const auto& a, const auto& b) { return a.name < b.name; });
  return header;
}

// ---------------------------------------------------------------------------
// SafetensorsFile

SafetensorsFile::SafetensorsFile(std::string path, const uint8_t* data, uint64_t size,
                                 SafetensorsHeader header)
    : path_(std::move(path)), data_(data), size_(size), header_(std::move(header)) {}

SafetensorsFile::~SafetensorsFile() {
  if (data_ != nullptr) munmap(const_cast<uint8_t*>(data_), size_);
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError(errno, path, "cannot open");
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int err = errno;
    close(fd);
    return ErrnoError(err, path, "cannot stat");
  }
  if (!S_ISREG(st.st_mode)) {
    close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  if (size < 8) {
    close(fd);
    return absl::DataLossError(absl::StrCat(
        path, ": file is ", size, " bytes, shorter than the 8-byte safetensors header length"));
  }
  void* map = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int map_err = errno;
  close(fd);
  if (map == MAP_FAILED) return ErrnoError(map_err, path, "cannot mmap");
  const auto* data = static_cast<const uint8_t*>(map);
  absl::StatusOr<SafetensorsHeader> header =
      ParseSafetensorsHeader(absl::MakeConstSpan(data, size), path);
  if (!header.ok()) {
    munmap(map, size);
    return header.status();
  }
  return std::unique_ptr<SafetensorsFile>(
      new SafetensorsFile(path, data, size, *std::move(header)));
}

TensorView SafetensorsFile::View(const SafetensorsEntry& entry) const {
  TensorView v;
  v.dtype = entry.dtype;
  v.shape = entry.shape;
  v.data = data_ + header_.data_section_offset + entry.data_begin;
  v.nbytes = entry.nbytes();
  return v;
}

absl::StatusOr<TensorView> SafetensorsFile::View(std::string_view name) const {
  const SafetensorsEntry* e = Find(name);
  if (e == nullptr) {
    return absl::NotFoundError(absl::StrCat(path_, ": no tensor '", std::string(name), "'"));
  }
  return View(*e);
}

// ---------------------------------------------------------------------------
// SafetensorsWriter

SafetensorsWriter::SafetensorsWriter(std::string path, int fd,
                                     std::vector<SafetensorsTensorInfo> tensors,
                                     std::vector<uint64_t> ends)
    : path_(std::move(path)),
      tmp_path_(path_ + ".tmp"),
      fd_(fd),
      tensors_(std::move(tensors)),
      ends_(std::move(ends)),
      data_bytes_(ends_.empty() ? 0 : ends_.back()) {}

SafetensorsWriter::~SafetensorsWriter() {
  if (!finished_) Abandon();
}

void SafetensorsWriter::Abandon() {
  if (fd_ >= 0) {
    close(fd_);
    fd_ = -1;
    unlink(tmp_path_.c_str());
  }
  finished_ = true;
}

absl::StatusOr<std::unique_ptr<SafetensorsWriter>> SafetensorsWriter::Create(
    const std::string& path, std::vector<SafetensorsTensorInfo> tensors,
    const std::map<std::string, std::string>& metadata) {
  std::string header = "{";
  bool first = true;
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    for (const auto& [k, v] : metadata) {
      absl::StatusOr<std::string> ks = JsonString(k);
      absl::StatusOr<std::string> vs = JsonString(v);
      if (!ks.ok() || !vs.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": metadata entry is not valid UTF-8"));
      }
      if (!first) header += ",";
      first = false;
      absl::StrAppend(&header, *ks, ":", *vs);
    }
    header += "}";
    first = false;
  }
  std::set<std::string_view> names;
  std::vector<uint64_t> ends;
  ends.reserve(tensors.size());
  uint64_t offset = 0;
  for (const SafetensorsTensorInfo& t : tensors) {
    auto bad = [&](const std::string& what) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor '", t.name, "': ", what));
    };
    if (t.name.empty()) return bad("empty tensor name");
    if (t.name.rfind("__", 0) == 0) return bad("tensor names may not start with '__'");
    if (!names.insert(t.name).second) return bad("duplicate tensor name");
    absl::StatusOr<std::string> name = JsonString(t.name);
    if (!name.ok()) return bad("name is not valid UTF-8");
    absl::StatusOr<uint64_t> nbytes = TensorByteSize(t.dtype, t.shape);
    if (!nbytes.ok()) return bad(std::string(nbytes.status().message()));
    const uint64_t end = offset + *nbytes;
    if (!first) header += ",";
    first = false;
    absl::StrAppend(&header, *name, ":{\"dtype\":\"", std::string(DTypeName(t.dtype)),
                    "\",\"shape\":[", absl::StrJoin(t.shape, ","), "],\"data_offsets\":[", offset,
                    ",", end, "]}");
    ends.push_back(end);
    offset = end;
  }
  header += "}";
  // Pad with spaces so the data section starts 8-byte aligned.
  header.append((8 - header.size() % 8) % 8, ' ');

  const std::string tmp = path + ".tmp";
  const int fd = open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError(errno, tmp, "cannot create");
  std::unique_ptr<SafetensorsWriter> w(
      new SafetensorsWriter(path, fd, std::move(tensors), std::move(ends)));
  uint8_t len[8];
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(n >> (8 * i));
  SY_RETURN_IF_ERROR(w->WriteAll(len, 8));
  SY_RETURN_IF_ERROR(w->WriteAll(reinterpret_cast<const uint8_t*>(header.data()), header.size()));
  return w;
}

absl::Status SafetensorsWriter::WriteAll(const uint8_t* data, size_t size) {
  while (size > 0) {
    const ssize_t n = write(fd_, data, std::min<size_t>(size, 1u << 30));
    if (n < 0) {
      if (errno == EINTR) continue;
      const absl::Status s = ErrnoError(errno, tmp_path_, "write failed");
      Abandon();
      return s;
    }
    data += n;
    size -= static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::Append(absl::Span<const uint8_t> bytes) {
  if (finished_) {
    return absl::FailedPreconditionError(absl::StrCat(path_, ": writer is finished"));
  }
  if (bytes.size() > data_bytes_ - written_) {
    return absl::FailedPreconditionError(
        absl::StrCat(path_, ": appending ", bytes.size(), " bytes at ", written_,
                     " overruns the data section of ", data_bytes_, " bytes"));
  }
  SY_RETURN_IF_ERROR(WriteAll(bytes.data(), bytes.size()));
  written_ += bytes.size();
  // Advance past completed tensors; an empty tensor starting exactly here
  // stays next, to be named by WriteTensor.
  while (next_ < tensors_.size() && ends_[next_] <= written_) {
    if (Begin(next_) == ends_[next_] && ends_[next_] == written_) break;
    ++next_;
  }
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::WriteTensor(std::string_view name,
                                            absl::Span<const uint8_t> bytes) {
  if (finished_) {
    return absl::FailedPreconditionError(absl::StrCat(path_, ": writer is finished"));
  }
  if (next_ >= tensors_.size() || Begin(next_) != written_ || tensors_[next_].name != name) {
    return absl::FailedPreconditionError(
        absl::StrCat(path_, ": tensor '", std::string(name), "' is not the next tensor to write",
                     next_ < tensors_.size() && Begin(next_) == written_
                         ? absl::StrCat(" (expected '", tensors_[next_].name, "')")
                         : ""));
  }
  const uint64_t size = ends_[next_] - written_;
  if (bytes.size() != size) {
    return absl::InvalidArgumentError(absl::StrCat(path_, ": tensor '", std::string(name),
                                                   "': got ", bytes.size(), " bytes, expected ",
                                                   size));
  }
  SY_RETURN_IF_ERROR(WriteAll(bytes.data(), bytes.size()));
  written_ += bytes.size();
  ++next_;
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::Finish() {
  if (finished_) {
    return absl::FailedPreconditionError(absl::StrCat(path_, ": writer is finished"));
  }
  if (written_ != data_bytes_) {
    const uint64_t missing = data_bytes_ - written_;
    Abandon();
    return absl::FailedPreconditionError(absl::StrCat(path_, ": finished with ", missing, " of ",
                                                      data_bytes_, " data bytes unwritten"));
  }
  const int fd = fd_;
  fd_ = -1;
  finished_ = true;
  if (close(fd) != 0) {
    const absl::Status s = ErrnoError(errno, tmp_path_, "close failed");
    unlink(tmp_path_.c_str());
    return s;
  }
  if (rename(tmp_path_.c_str(), path_.c_str()) != 0) {
    const absl::Status s = ErrnoError(errno, path_, "cannot rename temporary file into place");
    unlink(tmp_path_.c_str());
    return s;
  }
  return absl::OkStatus();
}

absl::Status WriteSafetensors(const std::string& path, absl::Span<const SafetensorsTensor> tensors,
                              const std::map<std::string, std::string>& metadata) {
  std::vector<SafetensorsTensorInfo> infos;
  infos.reserve(tensors.size());
  for (const SafetensorsTensor& t : tensors) infos.push_back({t.name, t.dtype, t.shape});
  SY_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsWriter> w,
                      SafetensorsWriter::Create(path, std::move(infos), metadata));
  for (const SafetensorsTensor& t : tensors) SY_RETURN_IF_ERROR(w->WriteTensor(t.name, t.bytes));
  return w->Finish();
}

}  // namespace switchyard
