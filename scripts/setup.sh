#!/usr/bin/env bash
# Installs the system packages Pontoon needs on a fresh Debian/Ubuntu machine.
#   libclang-dev      RocksDB's Rust bindings are generated with libclang
#   g++               RocksDB is built from C++ source (and mimalloc from C: g++
#                     brings gcc)
#   protobuf-compiler the etcd-client crate (used by the tests) compiles its protos
#   etcd-server, etcd-client  real etcd 3.4 and etcdctl, for the comparison tests
#   openssl, curl     the TLS tests make their own CA and certificates; the gateway
#                     tests speak HTTP with curl
#   procps            `kill`: the tests stop, pause and resume server processes
set -euo pipefail

want=(libclang-dev g++ protobuf-compiler)
if [[ "${1:-}" == "--test" ]]; then
  want+=(etcd-server etcd-client openssl curl procps)
fi

missing=()
for p in "${want[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""
  if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
  echo "installing: ${missing[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust from https://rustup.rs" >&2; exit 1; }
