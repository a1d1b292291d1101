#!/usr/bin/env python3
"""The switchyard client against a gateway with TLS and bearer-token auth,
as a user runs it: the right CA and token work; plaintext, an unknown CA, a
missing or wrong token fail with the status code name, and no token leaks.

usage: cli_security_test.py BUILD_DIR SOURCE_DIR
"""
import os
import subprocess
import sys
import tempfile
import time

build, source = sys.argv[1], sys.argv[2]
bin_dir = os.path.join(build, "bin")
model = os.path.join(source, "tests", "data", "tiny-mixtral")
tmp = tempfile.mkdtemp(prefix="switchyard-cli-security-")
failures, passed = [], 0


def check(name, ok, detail=""):
    global passed
    if ok:
        passed += 1
        print(f"ok   {name}")
    else:
        failures.append(name)
        print(f"FAIL {name}: {detail}")


def openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp)


def make_ca(name):
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
            "-keyout", f"{name}.key", "-out", f"{name}.pem")


make_ca("ca")
make_ca("other-ca")
with open(os.path.join(tmp, "san.ext"), "w") as f:
    f.write("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key",
        "-out", "server.csr")
openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-days", "2", "-extfile", "san.ext", "-out", "server.pem")
token = "s3cret-token-for-test"
with open(os.path.join(tmp, "tokens"), "w") as f:
    f.write(token + "\n")
with open(os.path.join(tmp, "wrong-token"), "w") as f:
    f.write("not-the-token\n")

gateway = subprocess.Popen(
    [os.path.join(bin_dir, "switchyard-gateway"), "--model", model, "--listen", "127.0.0.1:0",
     "--experts", "local", "--tls-cert", os.path.join(tmp, "server.pem"), "--tls-key",
     os.path.join(tmp, "server.key"), "--auth-token-file", os.path.join(tmp, "tokens")],
    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
line = gateway.stdout.readline()
address = line.split("listening on ")[1].split()[0]


def client(*extra):
    return subprocess.run([os.path.join(bin_dir, "switchyard"), "generate", "--server", address,
                           "--prompt", "Hello", "--max-new-tokens", "4", "--json", *extra],
                          capture_output=True, text=True, timeout=120)


ca = ["--tls-ca", os.path.join(tmp, "ca.pem")]
tok = ["--auth-token-file", os.path.join(tmp, "tokens")]
r = client(*ca, *tok)
check("TLS + token works", r.returncode == 0 and '"token_ids"' in r.stdout, r.stderr)
r = client(*ca)
check("no token -> UNAUTHENTICATED", r.returncode == 1 and "UNAUTHENTICATED" in r.stderr, r.stderr)
r = client(*ca, "--auth-token-file", os.path.join(tmp, "wrong-token"))
check("wrong token -> UNAUTHENTICATED", r.returncode == 1 and "UNAUTHENTICATED" in r.stderr, r.stderr)
check("wrong token not echoed", "not-the-token" not in r.stderr + r.stdout, r.stderr)
r = client(*tok)
check("plaintext client -> UNAVAILABLE", r.returncode == 1 and "UNAVAILABLE" in r.stderr, r.stderr)
r = client("--tls-ca", os.path.join(tmp, "other-ca.pem"), *tok)
check("unknown CA -> UNAVAILABLE", r.returncode == 1 and "UNAVAILABLE" in r.stderr, r.stderr)
r = client("--tls-ca", os.path.join(tmp, "missing.pem"))
check("missing CA file named", r.returncode == 1 and "missing.pem" in r.stderr, r.stderr)

# `switchyard health`, the exec probe for TLS servers: no token needed.
def health(*extra):
    return subprocess.run([os.path.join(bin_dir, "switchyard"), "health", "--server", address,
                           "--timeout-ms", "5000", *extra], capture_output=True, text=True, timeout=60)


r = health(*ca)
check("health over TLS: SERVING, exit 0", r.returncode == 0 and "SERVING" in r.stdout, r.stderr)
r = health(*ca, "--service", "switchyard.v1.GenerationService")
check("health of the Generation service", r.returncode == 0, r.stderr)
r = health(*ca, "--service", "no.such.Service")
check("health of an unknown service: NOT_FOUND, exit 1",
      r.returncode == 1 and "NOT_FOUND" in r.stderr and "no.such.Service" in r.stderr, r.stderr)
r = health()
check("plaintext health against TLS: exit 1", r.returncode == 1 and "UNAVAILABLE" in r.stderr, r.stderr)

gateway.terminate()
out, err = gateway.communicate(timeout=60)
check("gateway exits 0 on SIGTERM", gateway.returncode == 0, err)
check("token never logged", token not in out + err and "not-the-token" not in out + err, err)
print(f"{passed} passed, {len(failures)} failed")
sys.exit(1 if failures else 0)
