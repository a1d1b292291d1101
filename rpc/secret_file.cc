#include "rpc/secret_file.h"

#include <openssl/crypto.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>

#include "absl/strings/str_cat.h"

namespace switchyard::rpc {

SecretString& SecretString::operator=(SecretString&& other) noexcept {
  Wipe();
  value_ = std::move(other.value_);
  other.Wipe();
  return *this;
}

void SecretString::Wipe() {
  if (!value_.empty()) OPENSSL_cleanse(value_.data(), value_.size());
  value_.clear();
}

absl::StatusOr<SecretString> ReadSecretFile(const std::string& path, const std::string& where,
                                            const std::string& not_a) {
  std::error_code ec;
  const auto status = std::filesystem::status(path, ec);
  if (!std::filesystem::exists(status)) {
    return absl::FailedPreconditionError(absl::StrCat(where, " does not exist"));
  }
  if (std::filesystem::is_directory(status)) {
    return absl::FailedPreconditionError(absl::StrCat(where, " is a directory", not_a));
  }
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat(where, " cannot be read: ", std::strerror(errno)));
  }
  std::string contents;
  char buffer[4096];
  size_t n;
  bool too_large = false;
  while ((n = std::fread(buffer, 1, sizeof(buffer), f)) > 0) {
    contents.append(buffer, n);
    if (contents.size() > kMaxSecretFileBytes) {
      too_large = true;
      break;
    }
  }
  const bool failed = std::ferror(f) != 0;
  const int read_errno = errno;
  std::fclose(f);
  OPENSSL_cleanse(buffer, sizeof(buffer));
  SecretString secret(std::move(contents));
  if (failed) {
    return absl::FailedPreconditionError(
        absl::StrCat(where, " cannot be read: ", std::strerror(read_errno)));
  }
  if (too_large) {
    return absl::FailedPreconditionError(absl::StrCat(where, " is larger than 1 MiB", not_a));
  }
  return secret;
}

}  // namespace switchyard::rpc
