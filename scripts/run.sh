#!/usr/bin/env bash
# Sets up a fresh machine and runs a single-member Pontoon store on 127.0.0.1:2379,
# with its data in ./default.pontoon. Extra arguments go to `pontoon store`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec cargo run --release --bin pontoon -- store "$@"
