// The test PKI of the security tests, made by the `openssl` command in a
// temporary folder once per test binary and removed after its tests: a CA
// ("ca") with a server certificate ("server": localhost, 127.0.0.1), a client
// certificate ("client") and a Kubernetes-style server certificate naming
// only a Service ("service": switchyard-expert-0.switchyard.svc.cluster.local),
// and an unrelated CA ("wrong-ca") with its own "wrong-server" and
// "wrong-client". Pki("NAME.pem") / Pki("NAME.key") are the files.
#ifndef SWITCHYARD_TESTS_SECURITY_TEST_PKI_H_
#define SWITCHYARD_TESTS_SECURITY_TEST_PKI_H_

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "gtest/gtest.h"
#include "rpc/tls.h"
#include "tests/test_util.h"

namespace switchyard::testing {

// Makes the test PKI with the openssl command line.
inline constexpr char kMakeCertificates[] = R"sh(
set -eu
mkca() {
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$1.key" -out "$1.pem" -days 2 -subj "/CN=$1" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
}
mkcert() {  # name ca extensions
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$1.key" -out "$1.csr" -subj "/CN=$1"
  printf "$3" > "$1.ext"
  openssl x509 -req -in "$1.csr" -CA "$2.pem" -CAkey "$2.key" -CAcreateserial \
    -out "$1.pem" -days 2 -extfile "$1.ext"
}
SERVER='basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n'
CLIENT='basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n'
mkca ca
mkca wrong-ca
mkcert server ca "$SERVER"
mkcert client ca "$CLIENT"
mkcert wrong-server wrong-ca "$SERVER"
mkcert wrong-client wrong-ca "$CLIENT"
mkcert service ca 'basicConstraints=CA:FALSE\nsubjectAltName=DNS:switchyard-expert-0.switchyard.svc.cluster.local\nextendedKeyUsage=serverAuth\n'
)sh";

inline void WriteFile(const std::string& path, const std::string& contents) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << contents;
}

// The folder with the certificates, made once per test binary.
inline const std::string& PkiDir() {
  static const std::string* dir = [] {
    auto* d =
        new std::string(absl::StrCat(::testing::TempDir(), "/switchyard_tls_test_", getpid()));
    std::filesystem::create_directories(*d);
    WriteFile(*d + "/make.sh", kMakeCertificates);
    const std::string command = absl::StrCat("cd '", *d, "' && bash make.sh > make.log 2>&1");
    const int rc = std::system(command.c_str());
    EXPECT_EQ(rc, 0) << "making certificates failed:\n" << testing::ReadAll(*d + "/make.log");
    return d;
  }();
  return *dir;
}

inline std::string Pki(const std::string& name) { return PkiDir() + "/" + name; }

// Removes the certificates (private keys included) after the tests.
class PkiCleanup : public ::testing::Environment {
 public:
  void TearDown() override {
    std::error_code ec;
    std::filesystem::remove_all(
        absl::StrCat(::testing::TempDir(), "/switchyard_tls_test_", getpid()), ec);
  }
};
[[maybe_unused]] inline ::testing::Environment* const kPkiCleanup =
    ::testing::AddGlobalTestEnvironment(new PkiCleanup);

inline rpc::TlsFiles ServerFiles() {
  return {.cert_file = Pki("server.pem"), .key_file = Pki("server.key"), .ca_file = Pki("ca.pem")};
}
inline rpc::TlsFiles ClientFiles() {
  return {.cert_file = Pki("client.pem"), .key_file = Pki("client.key"), .ca_file = Pki("ca.pem")};
}

// Frame TLS contexts from `files`; null, with a test failure naming why,
// when they do not load.
inline std::shared_ptr<const rpc::FrameTlsContext> ServerTls(const rpc::TlsFiles& files,
                                                             bool require_client_cert) {
  auto tls = rpc::FrameServerTlsFromFiles(files, require_client_cert);
  EXPECT_TRUE(tls.ok()) << tls.status();
  return tls.ok() ? *tls : nullptr;
}
inline std::shared_ptr<const rpc::FrameTlsContext> ClientTls(const rpc::TlsFiles& files) {
  auto tls = rpc::FrameClientTlsFromFiles(files);
  EXPECT_TRUE(tls.ok()) << tls.status();
  return tls.ok() ? *tls : nullptr;
}

}  // namespace switchyard::testing

#endif  // SWITCHYARD_TESTS_SECURITY_TEST_PKI_H_
