#!/usr/bin/env bash
# Fan-out per face: Pusher WebSocket clients beside Socket.IO clients on one `herald serve
# --dev` (SQLite), a fresh server per run, alternating, three runs each. The events are
# published through the Pusher HTTP API in both cases, so the runs differ only in the face the
# subscribers use. Needs release builds (`cargo build --release -p herald -p herald-bench`).
#
#   RATE=200 CONN=1000 CH=10 DUR=10 crates/herald-bench/faces.sh
#
# Prints each run's pusher-bench report; compare medians.
set -uo pipefail
cd "$(dirname "$0")/../.."
CONN=${CONN:-1000}; CH=${CH:-10}; RATE=${RATE:-200}; DUR=${DUR:-10}; RUNS=${RUNS:-3}
# Thousands of sockets from one address: lift the per-address limits for the benchmark.
export HERALD_WS__MAX_CONNECTIONS_PER_IP=0 HERALD_WS__CONNECTIONS_PER_SECOND_PER_IP=0 HERALD_LISTENER__MAX_CONNECTIONS_PER_IP=0
for run in $(seq 1 "$RUNS"); do
  for protocol in pusher socketio; do
    port=$((6310 + RANDOM % 500)); data=$(mktemp -d)
    ./target/release/herald serve --dev --listen 127.0.0.1:$port --data "$data" >"$data/log" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do grep -q "listening" "$data/log" && break; sleep 0.1; done
    echo "== run $run $protocol: $CONN connections, $CH channels, $RATE events/s"
    ./target/release/pusher-bench --protocol $protocol --port $port --connections "$CONN" \
        --channels "$CH" --rate "$RATE" --duration "$DUR" --server-pid $pid 2>&1 | grep -v '^pusher-bench:'
    kill $pid; wait $pid 2>/dev/null; rm -rf "$data"
  done
done
