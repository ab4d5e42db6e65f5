#!/usr/bin/env bash
# Sets up a fresh machine and runs the default test suite: unit tests, integration
# tests against real `pontoon store` processes, and the etcdctl comparison with
# real etcd 3.4.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh --test
export RUST_BACKTRACE=1
cargo build --workspace --all-targets
cargo test --workspace -- --test-threads 2
