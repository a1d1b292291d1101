// Reading small secret files (TLS keys and certificates, bearer tokens):
// bounded, with errors that name the file and its role, and with the bytes
// wiped from memory once no longer needed.
//
// Thread-safety: ReadSecretFile is thread-safe; a SecretString is a value.
#ifndef SWITCHYARD_RPC_SECRET_FILE_H_
#define SWITCHYARD_RPC_SECRET_FILE_H_

#include <string>
#include <utility>

#include "absl/status/statusor.h"

namespace switchyard::rpc {

// A string holding key material: wiped before its memory is released.
class SecretString {
 public:
  SecretString() = default;
  explicit SecretString(std::string value) : value_(std::move(value)) {}
  SecretString(SecretString&& other) noexcept : value_(std::move(other.value_)) { other.Wipe(); }
  SecretString& operator=(SecretString&& other) noexcept;
  ~SecretString() { Wipe(); }
  const std::string& value() const { return value_; }

 private:
  void Wipe();
  std::string value_;
};

// Files larger than this are refused: a secret is small, a larger file is a
// wrong path (a log, a device).
inline constexpr size_t kMaxSecretFileBytes = 1 << 20;

// Reads `path` whole. Errors are FAILED_PRECONDITION and start with `where`
// (e.g. "TLS key file '/etc/key.pem'"): it does not exist, is a directory,
// cannot be read (with the system's reason), or is larger than 1 MiB. For
// the last two kinds of wrong file, `not_a` is appended (e.g. ", not a PEM
// file"); it may be empty.
absl::StatusOr<SecretString> ReadSecretFile(const std::string& path, const std::string& where,
                                            const std::string& not_a);

}  // namespace switchyard::rpc

#endif  // SWITCHYARD_RPC_SECRET_FILE_H_
