#include "rpc/auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <utility>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "rpc/secret_file.h"

namespace switchyard::rpc {
namespace {

constexpr size_t kMaxTokenBytes = 4096;
constexpr std::string_view kScheme = "bearer";

bool IsSpace(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

bool EqualsIgnoreAsciiCase(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    const auto lower = [](char c) { return c >= 'A' && c <= 'Z' ? static_cast<char>(c + 32) : c; };
    if (lower(a[i]) != lower(b[i])) return false;
  }
  return true;
}

std::string_view Trim(std::string_view s) {
  while (!s.empty() && IsSpace(s.front())) s.remove_prefix(1);
  while (!s.empty() && IsSpace(s.back())) s.remove_suffix(1);
  return s;
}

// Why `token` cannot be a token, or "" if it can. Never quotes the token.
std::string TokenProblem(std::string_view token) {
  if (token.empty()) return "is empty";
  if (token.size() > kMaxTokenBytes) {
    return absl::StrCat("is longer than ", kMaxTokenBytes, " bytes");
  }
  for (char c : token) {
    const unsigned char u = static_cast<unsigned char>(c);
    if (u < 0x21 || u > 0x7e) {
      return "has a character that is not visible ASCII (spaces and control characters are not "
             "allowed)";
    }
  }
  return "";
}

std::array<unsigned char, 32> Sha256(std::string_view data) {
  std::array<unsigned char, 32> digest{};
  unsigned int length = 0;
  EVP_Digest(data.data(), data.size(), digest.data(), &length, EVP_sha256(), nullptr);
  return digest;
}

class BearerTokenPlugin final : public grpc::MetadataCredentialsPlugin {
 public:
  explicit BearerTokenPlugin(const std::string& token) : header_("Bearer " + token) {}
  ~BearerTokenPlugin() override { OPENSSL_cleanse(header_.data(), header_.size()); }

  bool IsBlocking() const override { return false; }
  const char* GetType() const override { return "switchyard.bearer_token"; }
  grpc::Status GetMetadata(grpc::string_ref /*service_url*/, grpc::string_ref /*method_name*/,
                           const grpc::AuthContext& /*channel_auth_context*/,
                           std::multimap<std::string, std::string>* metadata) override {
    metadata->emplace("authorization", header_);
    return grpc::Status::OK;
  }
  std::string DebugString() override { return "switchyard bearer token (redacted)"; }

 private:
  std::string header_;
};

}  // namespace

absl::StatusOr<std::vector<std::string>> ReadBearerTokens(const std::string& path) {
  const std::string where = absl::StrCat("auth token file '", path, "'");
  if (path.empty()) return absl::InvalidArgumentError("no auth token file given");
  SY_ASSIGN_OR_RETURN(SecretString contents, ReadSecretFile(path, where, ""));
  absl::Status error;
  std::vector<std::string> tokens;
  std::string_view rest(contents.value());
  for (int line = 1; error.ok() && !rest.empty(); ++line) {
    const size_t end = rest.find('\n');
    const std::string_view token = Trim(rest.substr(0, end));
    rest = end == std::string_view::npos ? std::string_view() : rest.substr(end + 1);
    if (token.empty()) continue;
    if (std::string problem = TokenProblem(token); !problem.empty()) {
      error = absl::FailedPreconditionError(
          absl::StrCat(where, ": the token on line ", line, " ", problem));
      break;
    }
    tokens.emplace_back(token);
  }
  if (error.ok() && tokens.empty()) {
    error = absl::FailedPreconditionError(absl::StrCat(where, " has no token"));
  }
  if (!error.ok()) {
    for (std::string& t : tokens) OPENSSL_cleanse(t.data(), t.size());
    return error;
  }
  return tokens;
}

absl::StatusOr<std::string> ReadBearerTokenFile(const std::string& path) {
  SY_ASSIGN_OR_RETURN(std::vector<std::string> tokens, ReadBearerTokens(path));
  return std::move(tokens.front());
}

absl::StatusOr<std::unique_ptr<BearerTokenAuthenticator>> BearerTokenAuthenticator::FromFile(
    const std::string& path) {
  SY_ASSIGN_OR_RETURN(std::vector<std::string> tokens, ReadBearerTokens(path));
  auto authenticator = FromTokens(tokens);
  for (std::string& t : tokens) OPENSSL_cleanse(t.data(), t.size());
  return authenticator;
}

absl::StatusOr<std::unique_ptr<BearerTokenAuthenticator>> BearerTokenAuthenticator::FromTokens(
    const std::vector<std::string>& tokens) {
  if (tokens.empty()) return absl::InvalidArgumentError("no bearer token given");
  std::vector<Digest> digests;
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (std::string problem = TokenProblem(tokens[i]); !problem.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("bearer token ", i + 1, " ", problem));
    }
    digests.push_back(Sha256(tokens[i]));
  }
  return std::unique_ptr<BearerTokenAuthenticator>(
      new BearerTokenAuthenticator(std::move(digests)));
}

bool BearerTokenAuthenticator::AcceptsAuthorizationValue(std::string_view value) const {
  value = Trim(value);
  if (value.size() <= kScheme.size() || !IsSpace(value[kScheme.size()]) ||
      !EqualsIgnoreAsciiCase(value.substr(0, kScheme.size()), kScheme)) {
    return false;
  }
  const std::string_view token = Trim(value.substr(kScheme.size()));
  if (token.empty()) return false;
  // Comparing fixed-size digests, all of them, keeps the time independent of
  // the token's length and of how much of it matches.
  const Digest digest = Sha256(token);
  int matched = 0;
  for (const Digest& accepted : digests_) {
    matched |= CRYPTO_memcmp(digest.data(), accepted.data(), digest.size()) == 0;
  }
  return matched != 0;
}

absl::Status BearerTokenAuthenticator::Check(
    const std::multimap<grpc::string_ref, grpc::string_ref>& client_metadata) const {
  const auto [begin, end] = client_metadata.equal_range("authorization");
  for (auto it = begin; it != end; ++it) {
    if (AcceptsAuthorizationValue(std::string_view(it->second.data(), it->second.size()))) {
      return absl::OkStatus();
    }
  }
  return absl::UnauthenticatedError(kInvalidBearerTokenMessage);
}

grpc::ServerUnaryReactor* FinishedUnaryReactor(grpc::CallbackServerContext* context,
                                               const absl::Status& status) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(ToGrpcStatus(status));
  return reactor;
}

void AddBearerToken(grpc::ClientContext* context, std::string_view token) {
  context->AddMetadata("authorization", absl::StrCat("Bearer ", std::string(token)));
}

std::shared_ptr<grpc::CallCredentials> BearerTokenCredentials(const std::string& token) {
  return grpc::MetadataCredentialsFromPlugin(std::make_unique<BearerTokenPlugin>(token));
}

}  // namespace switchyard::rpc
