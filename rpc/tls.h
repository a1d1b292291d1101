// Transport security from PEM files: TLS and mutual TLS credentials for
// Switchyard servers (gateway, experts) and their clients (gateway -> expert
// channels, the `switchyard` CLI), and the same for the expert frame sockets
// (rpc/frame_socket.h), which speak TLS through OpenSSL rather than gRPC.
//
// Every file is read and checked when the credentials are built, so a bad
// deployment fails at start-up with an error naming the file (missing,
// unreadable, empty, not PEM, no certificate / private key in it, key not
// matching the certificate, certificate expired) instead of failing every
// handshake later. Errors and logs never contain key material.
//
// Hostname verification: clients check the server certificate's
// subjectAltName against the host part of the target they dial
// ("localhost", "127.0.0.1", "expert-3.ns.svc", ...), so server certificates
// must name every address clients use.
//
// Thread-safety: the functions are stateless and thread-safe.
#ifndef SWITCHYARD_RPC_TLS_H_
#define SWITCHYARD_RPC_TLS_H_

#include <grpcpp/security/credentials.h>
#include <grpcpp/security/server_credentials.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "rpc/frame_socket.h"

namespace switchyard::rpc {

// PEM file paths. Which ones are needed depends on the function.
struct TlsFiles {
  // Certificate chain (leaf first) presented to the peer.
  std::string cert_file = {};
  // Unencrypted private key of the leaf certificate (PKCS#8, PKCS#1 or SEC1).
  std::string key_file = {};
  // CA certificate(s) the peer's certificate must chain to.
  std::string ca_file = {};
};

// Credentials for a TLS server. cert_file and key_file are required.
// require_client_cert: mutual TLS: the handshake fails unless the client
// presents a certificate signed by a CA in ca_file (required then); this holds
// for every service of the server, health and reflection included. Without
// it, a non-empty ca_file still verifies a client certificate if one is sent,
// but clients without one are accepted.
// Errors: INVALID_ARGUMENT (missing arguments) or FAILED_PRECONDITION naming
// the bad file.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> ServerCredentialsFromFiles(
    const TlsFiles& files, bool require_client_cert);

// Credentials for a TLS client channel. ca_file: the CAs the server
// certificate must chain to (empty: gRPC's default roots). cert_file and
// key_file, both or neither: the client certificate for mutual TLS.
// Errors as for ServerCredentialsFromFiles.
absl::StatusOr<std::shared_ptr<grpc::ChannelCredentials>> ChannelCredentialsFromFiles(
    const TlsFiles& files);

// The frame socket's counterparts of the two above: the same files, checks,
// errors and client-certificate rule. The server side sends no session
// tickets; the client side verifies the server's certificate against
// ca_file (empty: the system's default CAs) and the host it is given at
// each handshake (StartClientTls).
absl::StatusOr<std::shared_ptr<const FrameTlsContext>> FrameServerTlsFromFiles(
    const TlsFiles& files, bool require_client_cert);
absl::StatusOr<std::shared_ptr<const FrameTlsContext>> FrameClientTlsFromFiles(
    const TlsFiles& files);

}  // namespace switchyard::rpc

#endif  // SWITCHYARD_RPC_TLS_H_
