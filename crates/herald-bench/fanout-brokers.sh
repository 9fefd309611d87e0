#!/usr/bin/env bash
# Fan-out per broker: one node on SQLite (in-process broker) beside three nodes on PostgreSQL
# with the PostgreSQL, Redis and NATS brokers (publish to node 1, subscribers over all three),
# alternating, three runs each. Needs release builds (`cargo build --release -p herald -p
# herald-bench`), PostgreSQL on 127.0.0.1:5432 with the role herald/herald (run as root: it
# creates and drops a database per run as the postgres user), redis-server on 6379 and
# nats-server on 4222 (`.ci/broker start redis`, `.ci/broker start nats`). Ports 6101-6103.
#
#   RATE=200 DUR=10 PREFIX=bench- MODES="sqlite1 pg3 redis3 nats3" crates/herald-bench/fanout-brokers.sh
#
# PREFIX=history-bench- measures history channels.
set -uo pipefail
cd "$(dirname "$0")/../.."
CONN=${CONN:-1000}; CH=${CH:-10}; RATE=${RATE:-200}; DUR=${DUR:-10}; PREFIX=${PREFIX:-bench-}
MODES=${MODES:-"sqlite1 pg3 redis3 nats3"}
export HERALD_WS__MAX_CONNECTIONS_PER_IP=0 HERALD_WS__CONNECTIONS_PER_SECOND_PER_IP=0 HERALD_LISTENER__MAX_CONNECTIONS_PER_IP=0
start_node() { # port store_url(or empty) dir broker_url topic
  local log=$3/log
  mkdir -p $3
  local extra=()
  [ -n "${4:-}" ] && extra=(HERALD_BROKER__URL=$4 HERALD_BROKER__TOPIC=$5)
  if [ -n "$2" ]; then env HERALD_STORE__URL=$2 "${extra[@]}" ./target/release/herald serve --dev --listen 127.0.0.1:$1 --data $3 >$log 2>&1 &
  else ./target/release/herald serve --dev --listen 127.0.0.1:$1 --data $3 >$log 2>&1 & fi
  echo $! > $3/pid
  for i in $(seq 1 200); do [ "$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:$1/health/ready)" = 204 ] && return 0; sleep 0.1; done
  echo "node on $1 did not start"; cat $log; return 1
}
run_mode() { # mode run
  local mode=$1 run=$2 db="" url="" ports="" broker="" topic="bench.$RANDOM$RANDOM"
  local base=$(mktemp -d)
  case $mode in
    sqlite1) start_node 6101 "" $base/n1; ports=6101;;
    *)
      case $mode in redis3) broker=redis://127.0.0.1:6379;; nats3) broker=nats://127.0.0.1:4222;; esac
      db=bench_fan_$$_${run}_$RANDOM
      su postgres -c "psql -qc 'CREATE DATABASE $db OWNER herald'"
      url=postgres://herald:herald@127.0.0.1:5432/$db
      start_node 6101 $url $base/n1 "$broker" $topic
      start_node 6102 $url $base/n2 "$broker" $topic
      start_node 6103 $url $base/n3 "$broker" $topic
      ports=6101,6102,6103;;
  esac
  local out=$(./target/release/pusher-bench --port 6101 --subscribe-ports $ports --connections $CONN --channels $CH --rate $RATE --duration $DUR --channel-prefix $PREFIX 2>&1)
  echo "$mode run $run: $(echo "$out" | grep -E 'deliveries|latency|missing|lost' | tr '\n' ' ')"
  for p in $base/n*/pid; do kill -TERM $(cat $p) 2>/dev/null; done
  wait 2>/dev/null
  [ -n "$db" ] && su postgres -c "psql -qc 'DROP DATABASE $db WITH (FORCE)'"
  rm -rf $base
}
for run in 1 2 3; do for mode in $MODES; do run_mode $mode $run; done; done
