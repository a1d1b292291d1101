#include "rpc/tls.h"

#include <openssl/asn1.h>
#include <openssl/bio.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "core/status_macros.h"
#include "rpc/secret_file.h"

namespace switchyard::rpc {
namespace {

// Clears OpenSSL's thread-local error queue when it goes out of scope, so
// our failed parses leave nothing behind for gRPC's own TLS code to misread.
struct OpenSslErrorQueueGuard {
  ~OpenSslErrorQueueGuard() { ERR_clear_error(); }
};

struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};
struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct PkeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
using UniqueBio = std::unique_ptr<BIO, BioFree>;
using UniqueX509 = std::unique_ptr<X509, X509Free>;
using UniquePkey = std::unique_ptr<EVP_PKEY, PkeyFree>;

std::string Quoted(const std::string& path) { return absl::StrCat("'", path, "'"); }

// Reads `path` whole. `what` names the role in errors ("TLS key file").
// Checks it exists, is a readable regular file, is not empty and holds a PEM
// block.
absl::StatusOr<SecretString> ReadPemFile(const std::string& path, std::string_view what) {
  const std::string role(what);
  SY_ASSIGN_OR_RETURN(
      SecretString secret,
      ReadSecretFile(path, absl::StrCat(role, " ", Quoted(path)), ", not a PEM file"));
  if (secret.value().empty()) {
    return absl::FailedPreconditionError(absl::StrCat(role, " ", Quoted(path), " is empty"));
  }
  if (secret.value().find("-----BEGIN ") == std::string::npos) {
    return absl::FailedPreconditionError(
        absl::StrCat(role, " ", Quoted(path), " is not a PEM file (no '-----BEGIN' line)"));
  }
  return secret;
}

size_t CountOccurrences(const std::string& text, std::string_view needle) {
  size_t count = 0;
  for (size_t pos = text.find(needle); pos != std::string::npos;
       pos = text.find(needle, pos + needle.size())) {
    ++count;
  }
  return count;
}

std::string AsnTimeText(const ASN1_TIME* t) {
  UniqueBio bio(BIO_new(BIO_s_mem()));
  if (bio == nullptr || ASN1_TIME_print(bio.get(), t) != 1) return "?";
  char* data = nullptr;
  const long len = BIO_get_mem_data(bio.get(), &data);
  return std::string(data, static_cast<size_t>(len));
}

// Parses every certificate in `pem` (read from `path`): at least one, every
// CERTIFICATE block well-formed, each currently valid.
absl::StatusOr<std::vector<UniqueX509>> ParseCertificates(const std::string& pem,
                                                          const std::string& path,
                                                          std::string_view what) {
  OpenSslErrorQueueGuard guard;
  const std::string role(what);
  UniqueBio bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (bio == nullptr) return absl::ResourceExhaustedError("out of memory reading a certificate");
  std::vector<UniqueX509> certs;
  while (X509* cert = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)) {
    certs.emplace_back(cert);
  }
  const size_t blocks = CountOccurrences(pem, "-----BEGIN CERTIFICATE-----") +
                        CountOccurrences(pem, "-----BEGIN TRUSTED CERTIFICATE-----");
  if (certs.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat(role, " ", Quoted(path),
                     blocks == 0 ? " has no PEM certificate ('-----BEGIN CERTIFICATE-----')"
                                 : " has a PEM certificate that cannot be parsed"));
  }
  if (certs.size() < blocks) {
    return absl::FailedPreconditionError(absl::StrCat(role, " ", Quoted(path), ": certificate ",
                                                      certs.size() + 1, " of ", blocks,
                                                      " cannot be parsed"));
  }
  for (size_t i = 0; i < certs.size(); ++i) {
    const std::string which =
        certs.size() == 1 ? "the certificate" : absl::StrCat("certificate ", i + 1);
    const ASN1_TIME* not_after = X509_get0_notAfter(certs[i].get());
    const ASN1_TIME* not_before = X509_get0_notBefore(certs[i].get());
    if (X509_cmp_current_time(not_after) < 0) {
      return absl::FailedPreconditionError(absl::StrCat(role, " ", Quoted(path), ": ", which,
                                                        " expired on ", AsnTimeText(not_after)));
    }
    if (X509_cmp_current_time(not_before) > 0) {
      return absl::FailedPreconditionError(absl::StrCat(
          role, " ", Quoted(path), ": ", which, " is not valid before ", AsnTimeText(not_before)));
    }
  }
  return certs;
}

int RefusePassphrase(char*, int, int, void*) { return -1; }

// Parses the private key in `pem` (read from `path`) and checks it belongs to
// `leaf` (from `cert_path`). Never puts key bytes in an error.
absl::Status CheckPrivateKey(const std::string& pem, const std::string& path, X509* leaf,
                             const std::string& cert_path) {
  OpenSslErrorQueueGuard guard;
  const std::string where = absl::StrCat("TLS key file ", Quoted(path));
  if (pem.find("-----BEGIN ENCRYPTED PRIVATE KEY-----") != std::string::npos ||
      pem.find("Proc-Type: 4,ENCRYPTED") != std::string::npos) {
    return absl::FailedPreconditionError(
        absl::StrCat(where, " holds an encrypted private key; an unencrypted one is needed"));
  }
  UniqueBio bio(BIO_new_mem_buf(pem.data(), static_cast<int>(pem.size())));
  if (bio == nullptr) return absl::ResourceExhaustedError("out of memory reading a private key");
  UniquePkey key(PEM_read_bio_PrivateKey(bio.get(), nullptr, RefusePassphrase, nullptr));
  if (key == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat(where, pem.find("PRIVATE KEY-----") == std::string::npos
                                ? " has no PEM private key ('-----BEGIN PRIVATE KEY-----')"
                                : " has a PEM private key that cannot be parsed"));
  }
  if (X509_check_private_key(leaf, key.get()) != 1) {
    return absl::FailedPreconditionError(absl::StrCat(
        where, " does not match the certificate in TLS certificate file ", Quoted(cert_path)));
  }
  return absl::OkStatus();
}

struct KeyCertPair {
  std::string cert_chain;
  SecretString key;
};

// Reads and checks cert_file and key_file together.
absl::StatusOr<KeyCertPair> LoadKeyCertPair(const TlsFiles& files) {
  SY_ASSIGN_OR_RETURN(SecretString cert, ReadPemFile(files.cert_file, "TLS certificate file"));
  SY_ASSIGN_OR_RETURN(std::vector<UniqueX509> chain,
                      ParseCertificates(cert.value(), files.cert_file, "TLS certificate file"));
  SY_ASSIGN_OR_RETURN(SecretString key, ReadPemFile(files.key_file, "TLS key file"));
  SY_RETURN_IF_ERROR(
      CheckPrivateKey(key.value(), files.key_file, chain.front().get(), files.cert_file));
  return KeyCertPair{cert.value(), std::move(key)};
}

absl::StatusOr<std::string> LoadCa(const std::string& path) {
  SY_ASSIGN_OR_RETURN(SecretString ca, ReadPemFile(path, "TLS CA file"));
  SY_ASSIGN_OR_RETURN(std::vector<UniqueX509> certs,
                      ParseCertificates(ca.value(), path, "TLS CA file"));
  return ca.value();
}

// The arguments a server side needs (the files are checked when read).
absl::Status CheckServerArguments(const TlsFiles& files, bool require_client_cert) {
  if (files.cert_file.empty() || files.key_file.empty()) {
    return absl::InvalidArgumentError("a TLS server needs both a certificate file and a key file");
  }
  if (require_client_cert && files.ca_file.empty()) {
    return absl::InvalidArgumentError(
        "requiring client certificates needs a CA file to verify them against");
  }
  return absl::OkStatus();
}

// The same for a client side: a certificate comes with its key.
absl::Status CheckClientArguments(const TlsFiles& files) {
  if (files.cert_file.empty() != files.key_file.empty()) {
    return absl::InvalidArgumentError(
        "a TLS client certificate needs both a certificate file and a key file");
  }
  return absl::OkStatus();
}

// Puts the (already checked) certificate chain and key of `pair` into `ctx`.
absl::Status UseKeyCertPair(SSL_CTX* ctx, const KeyCertPair& pair) {
  OpenSslErrorQueueGuard guard;
  UniqueBio certs(
      BIO_new_mem_buf(pair.cert_chain.data(), static_cast<int>(pair.cert_chain.size())));
  UniqueBio key_bio(
      BIO_new_mem_buf(pair.key.value().data(), static_cast<int>(pair.key.value().size())));
  if (certs == nullptr || key_bio == nullptr) {
    return absl::ResourceExhaustedError("out of memory reading a certificate");
  }
  UniqueX509 leaf(PEM_read_bio_X509(certs.get(), nullptr, nullptr, nullptr));
  UniquePkey key(PEM_read_bio_PrivateKey(key_bio.get(), nullptr, RefusePassphrase, nullptr));
  if (leaf == nullptr || key == nullptr || SSL_CTX_use_certificate(ctx, leaf.get()) != 1 ||
      SSL_CTX_use_PrivateKey(ctx, key.get()) != 1) {
    return absl::InternalError("OpenSSL refused the frame socket's certificate or key");
  }
  while (X509* intermediate = PEM_read_bio_X509(certs.get(), nullptr, nullptr, nullptr)) {
    if (SSL_CTX_add0_chain_cert(ctx, intermediate) != 1) {
      X509_free(intermediate);
      return absl::InternalError("OpenSSL refused the frame socket's certificate chain");
    }
  }
  return absl::OkStatus();
}

// Trusts every certificate of `ca_pem` (already checked) in `ctx`.
absl::Status TrustCa(SSL_CTX* ctx, const std::string& ca_pem, const std::string& path) {
  SY_ASSIGN_OR_RETURN(std::vector<UniqueX509> certs,
                      ParseCertificates(ca_pem, path, "TLS CA file"));
  OpenSslErrorQueueGuard guard;
  X509_STORE* store = SSL_CTX_get_cert_store(ctx);
  for (const UniqueX509& cert : certs) {
    if (X509_STORE_add_cert(store, cert.get()) != 1) {
      return absl::InternalError(absl::StrCat("OpenSSL refused a CA of ", Quoted(path)));
    }
  }
  return absl::OkStatus();
}

// A context for one side of frame sockets: TLS 1.2 at least, no session
// tickets or renegotiation (an idle connection must carry no bytes), an end
// of stream without close_notify read as a close, partial writes.
absl::StatusOr<std::shared_ptr<const FrameTlsContext>> NewFrameTlsContext(bool server) {
  OpenSslErrorQueueGuard guard;
  SSL_CTX* ctx = SSL_CTX_new(server ? TLS_server_method() : TLS_client_method());
  if (ctx == nullptr) return absl::InternalError("OpenSSL could not make a TLS context");
  auto context = std::make_shared<const FrameTlsContext>(ctx, server);
  SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
  SSL_CTX_set_options(ctx,
                      SSL_OP_NO_TICKET | SSL_OP_NO_RENEGOTIATION | SSL_OP_IGNORE_UNEXPECTED_EOF);
  SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  // Read whatever has arrived (up to 256 KiB), several records at once,
  // rather than each record's header and then its body: fewer reads for a
  // large frame.
  SSL_CTX_set_read_ahead(ctx, 1);
  SSL_CTX_set_default_read_buffer_len(ctx, 256 << 10);
  if (server) SSL_CTX_set_num_tickets(ctx, 0);
  return context;
}

}  // namespace

absl::StatusOr<std::shared_ptr<const FrameTlsContext>> FrameServerTlsFromFiles(
    const TlsFiles& files, bool require_client_cert) {
  SY_RETURN_IF_ERROR(CheckServerArguments(files, require_client_cert));
  SY_ASSIGN_OR_RETURN(KeyCertPair pair, LoadKeyCertPair(files));
  SY_ASSIGN_OR_RETURN(std::shared_ptr<const FrameTlsContext> context, NewFrameTlsContext(true));
  SY_RETURN_IF_ERROR(UseKeyCertPair(context->get(), pair));
  if (!files.ca_file.empty()) {
    SY_ASSIGN_OR_RETURN(const std::string ca, LoadCa(files.ca_file));
    SY_RETURN_IF_ERROR(TrustCa(context->get(), ca, files.ca_file));
    // As the gRPC server: a certificate sent is verified; required with mTLS.
    SSL_CTX_set_verify(
        context->get(),
        SSL_VERIFY_PEER | (require_client_cert ? SSL_VERIFY_FAIL_IF_NO_PEER_CERT : 0), nullptr);
  }
  return context;
}

absl::StatusOr<std::shared_ptr<const FrameTlsContext>> FrameClientTlsFromFiles(
    const TlsFiles& files) {
  SY_RETURN_IF_ERROR(CheckClientArguments(files));
  SY_ASSIGN_OR_RETURN(std::shared_ptr<const FrameTlsContext> context, NewFrameTlsContext(false));
  if (files.ca_file.empty()) {
    SSL_CTX_set_default_verify_paths(context->get());
  } else {
    SY_ASSIGN_OR_RETURN(const std::string ca, LoadCa(files.ca_file));
    SY_RETURN_IF_ERROR(TrustCa(context->get(), ca, files.ca_file));
  }
  SSL_CTX_set_verify(context->get(), SSL_VERIFY_PEER, nullptr);
  if (!files.cert_file.empty()) {
    SY_ASSIGN_OR_RETURN(KeyCertPair pair, LoadKeyCertPair(files));
    SY_RETURN_IF_ERROR(UseKeyCertPair(context->get(), pair));
  }
  return context;
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentialsFromFiles(
    const TlsFiles& files, bool require_client_cert) {
  SY_RETURN_IF_ERROR(CheckServerArguments(files, require_client_cert));
  SY_ASSIGN_OR_RETURN(KeyCertPair pair, LoadKeyCertPair(files));
  std::string ca;
  if (!files.ca_file.empty()) {
    SY_ASSIGN_OR_RETURN(ca, LoadCa(files.ca_file));
  }
  grpc::SslServerCredentialsOptions options(
      require_client_cert ? GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY
      : ca.empty()        ? GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE
                          : GRPC_SSL_REQUEST_CLIENT_CERTIFICATE_AND_VERIFY);
  options.pem_root_certs = ca;
  options.pem_key_cert_pairs.push_back({pair.key.value(), pair.cert_chain});
  std::shared_ptr<grpc::ServerCredentials> credentials = grpc::SslServerCredentials(options);
  OPENSSL_cleanse(options.pem_key_cert_pairs[0].private_key.data(),
                  options.pem_key_cert_pairs[0].private_key.size());
  if (credentials == nullptr) {
    return absl::InternalError(absl::StrCat("gRPC refused the TLS server credentials from ",
                                            Quoted(files.cert_file), " and ",
                                            Quoted(files.key_file)));
  }
  return credentials;
}

absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentialsFromFiles(
    const TlsFiles& files) {
  SY_RETURN_IF_ERROR(CheckClientArguments(files));
  grpc::SslCredentialsOptions options;
  if (!files.ca_file.empty()) {
    SY_ASSIGN_OR_RETURN(options.pem_root_certs, LoadCa(files.ca_file));
  }
  if (!files.cert_file.empty()) {
    SY_ASSIGN_OR_RETURN(KeyCertPair pair, LoadKeyCertPair(files));
    options.pem_cert_chain = pair.cert_chain;
    options.pem_private_key = pair.key.value();
  }
  std::shared_ptr<grpc::ChannelCredentials> credentials = grpc::SslCredentials(options);
  OPENSSL_cleanse(options.pem_private_key.data(), options.pem_private_key.size());
  if (credentials == nullptr) {
    return absl::InternalError("gRPC refused the TLS channel credentials");
  }
  return credentials;
}

}  // namespace switchyard::rpc
