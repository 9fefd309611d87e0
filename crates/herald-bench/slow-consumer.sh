#!/usr/bin/env bash
# A slow consumer beside a steady stream: CONN Pusher connections receive RATE events/s of
# PAYLOAD bytes over CH channels, once alone and once with STALLED more connections that
# subscribe to every channel and stop reading. A fresh `herald serve --dev` (SQLite) per run,
# the two kinds alternating, RUNS runs each. Prints each run's p99 and the server's peak
# memory, then the medians and their ratio; fails if a stalled connection was never closed,
# and (unless MAX_RATIO=0) if the median p99 with it exceeds MAX_RATIO times the one without.
#
#   BIN=target/release crates/herald-bench/slow-consumer.sh
#
# Needs `cargo build [--release] -p herald -p herald-bench` (BIN names the directory).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-target/release}
CONN=${CONN:-1000}; CH=${CH:-10}; RATE=${RATE:-200}; PAYLOAD=${PAYLOAD:-4000}; DUR=${DUR:-10}
RUNS=${RUNS:-3}; STALLED=${STALLED:-1}; MAX_RATIO=${MAX_RATIO:-2}
# Thousands of sockets from one address: lift the per-address limits for the benchmark.
export HERALD_WS__MAX_CONNECTIONS_PER_IP=0 HERALD_WS__CONNECTIONS_PER_SECOND_PER_IP=0 HERALD_LISTENER__MAX_CONNECTIONS_PER_IP=0

median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

alone=(); with=()
for run in $(seq 1 "$RUNS"); do
  for stalled in 0 "$STALLED"; do
    data=$(mktemp -d)
    # The backgrounded server opens its log itself, possibly after the first read below: make it
    # exist first, or that read fails (and `set -e` ends the script).
    : >"$data/log"
    "$BIN/herald" serve --dev --listen 127.0.0.1:0 --data "$data" >"$data/log" 2>&1 &
    pid=$!
    port=""
    for _ in $(seq 1 100); do
      port=$(sed -n 's/^herald listening on http:\/\/127.0.0.1://p' "$data/log" | head -n 1)
      [ -n "$port" ] && break
      sleep 0.1
    done
    [ -n "$port" ] || { cat "$data/log"; echo "herald did not start"; exit 1; }
    out=$("$BIN/pusher-bench" --port "$port" --connections "$CONN" --channels "$CH" --rate "$RATE" \
        --payload "$PAYLOAD" --duration "$DUR" --stalled "$stalled" --server-pid "$pid" 2>&1) || {
      echo "$out"; kill "$pid"; exit 1; }
    p99=$(echo "$out" | sed -n 's/.*p99 \([0-9.]*\) ms.*/\1/p')
    peak=$(echo "$out" | sed -n 's/^memory: server RSS peak \([0-9.]*\) MiB.*/\1/p')
    closed=$(echo "$out" | sed -n 's/^stalled: \(.*\)/\1/p')
    echo "run $run, $stalled stalled: p99 $p99 ms, server peak RSS $peak MiB${closed:+; $closed}"
    if [ "$stalled" = 0 ]; then alone+=("$p99"); else with+=("$p99"); fi
    kill "$pid"; wait "$pid" 2>/dev/null || true; rm -rf "$data"
  done
done
m_alone=$(printf '%s\n' "${alone[@]}" | median)
m_with=$(printf '%s\n' "${with[@]}" | median)
ratio=$(awk -v a="$m_alone" -v w="$m_with" 'BEGIN { printf "%.2f", w / a }')
echo "median p99: $m_alone ms alone, $m_with ms with $STALLED stalled (ratio $ratio, limit ${MAX_RATIO/#0/none})"
if [ "$MAX_RATIO" != 0 ]; then
  awk -v r="$ratio" -v m="$MAX_RATIO" 'BEGIN { exit !(r <= m) }' || { echo "the stalled connection slowed the others down"; exit 1; }
fi
