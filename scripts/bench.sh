#!/usr/bin/env bash
# Side-by-side load test: etcd 3.4 (Debian's etcd-server) and Pontoon (release build),
# one member each, same flags, same machine, one at a time, the same matrix against
# each. Writes a markdown report to bench/results/<date>.md and prints it.
#
# Usage: ./scripts/bench.sh [seconds per step]   (default 15)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-15}"
./scripts/setup.sh --test
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
cargo build --release -p pontoon --bin pontoon
cargo build --release -p pontoon-bench --bin pontoon-bench
PONTOON="$TARGET_DIR/release/pontoon"
BENCH="$TARGET_DIR/release/pontoon-bench"
WORK="$(mktemp -d)"
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
mkdir -p bench/results
RESULTS="$WORK/results.jsonl"

# step name | bench flags
MATRIX=(
  "put c1|--workload put --clients 1 --conns 1"
  "put c16|--workload put --clients 16 --conns 4"
  "put c256|--workload put --clients 256 --conns 16"
  "range c256|--workload range --clients 256 --conns 16 --key-space 10000"
  "range-serializable c256|--workload range-serializable --clients 256 --conns 16 --key-space 10000"
  "txn-put c64|--workload txn-put --clients 64 --conns 8"
)

for target in etcd pontoon; do
  data="$WORK/$target"
  flags=(--name bench --data-dir "$data" --listen-client-urls http://127.0.0.1:23790
         --advertise-client-urls http://127.0.0.1:23790 --listen-peer-urls http://127.0.0.1:23800
         --initial-advertise-peer-urls http://127.0.0.1:23800
         --initial-cluster bench=http://127.0.0.1:23800)
  if [ "$target" = etcd ]; then
    etcd "${flags[@]}" > "$WORK/$target.log" 2>&1 &
  else
    "$PONTOON" store "${flags[@]}" > "$WORK/$target.log" 2>&1 &
  fi
  pid=$!
  for _ in $(seq 1 100); do
    ETCDCTL_API=3 etcdctl --endpoints 127.0.0.1:23790 get probe >/dev/null 2>&1 && break
    sleep 0.1
  done
  for step in "${MATRIX[@]}"; do
    name="${step%%|*}"; args="${step#*|}"
    echo "== $target: $name" >&2
    # shellcheck disable=SC2086
    line=$("$BENCH" --endpoints 127.0.0.1:23790 --duration "$SECS" $args | tail -1)
    echo "{\"target\":\"$target\",\"step\":\"$name\",\"result\":$line}" >> "$RESULTS"
  done
  rss=$(awk '/VmHWM/ {print $2}' "/proc/$pid/status")
  echo "{\"target\":\"$target\",\"step\":\"peak RSS\",\"rss_kb\":$rss}" >> "$RESULTS"
  kill "$pid"; wait "$pid" 2>/dev/null || true
done

REPORT="bench/results/$(date +%F).md"
python3 - "$RESULTS" "$SECS" > "$REPORT" <<'PY'
import json, sys, platform, os
rows = [json.loads(l) for l in open(sys.argv[1])]
secs = sys.argv[2]
by = {}
for r in rows:
    by.setdefault(r["step"], {})[r["target"]] = r
print(f"# Pontoon vs etcd 3.4, single member, {secs} s per step\n")
print(f"Machine: {os.cpu_count()} cores, {platform.platform()}. Same flags, fsync on, one server at a time.\n")
print("| step | etcd req/s | pontoon req/s | ratio | etcd p50 / p99 ms | pontoon p50 / p99 ms |")
print("|---|---:|---:|---:|---|---|")
for step, t in by.items():
    if step == "peak RSS":
        continue
    e, p = t["etcd"]["result"], t["pontoon"]["result"]
    ratio = p["rps"] / e["rps"] if e["rps"] else float("nan")
    print(f"| {step} | {e['rps']:.0f} | {p['rps']:.0f} | {ratio:.2f}x | {e['p50_ms']:.2f} / {e['p99_ms']:.2f} | {p['p50_ms']:.2f} / {p['p99_ms']:.2f} |")
r = by.get("peak RSS", {})
if r:
    e, p = r["etcd"]["rss_kb"], r["pontoon"]["rss_kb"]
    print(f"\nPeak RSS after the matrix: etcd {e/1024:.0f} MiB, pontoon {p/1024:.0f} MiB ({p/e:.2f}x).")
PY
cat "$REPORT"
