#!/usr/bin/env bash
# Longer fault-injection runs against Pontoon and etcd (not part of ./scripts/test.sh).
# Usage: ./scripts/jepsen.sh [seconds per run]
set -euo pipefail
cd "$(dirname "$0")/.."
TIME="${1:-120}"
./scripts/setup.sh --test
cargo build --workspace
J=./target/debug/pontoon-jepsen
if [ -n "${CARGO_TARGET_DIR:-}" ]; then J="$CARGO_TARGET_DIR/debug/pontoon-jepsen"; fi
status=0
for target in pontoon etcd; do
  for nemesis in kill pause partition kill,pause,partition; do
    for seed in 1 2; do
      dir="jepsen-report/$target-${nemesis//,/+}-$seed"
      echo "== $target, nemesis $nemesis, seed $seed -> $dir"
      if ! "$J" --target "$target" --nodes 3 --nemesis "$nemesis" --time "$TIME" \
          --rate 500 --seed "$seed" --report "$dir"; then
        status=1
      fi
    done
  done
done
exit $status
