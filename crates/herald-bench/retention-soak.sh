#!/usr/bin/env bash
# The retention soak at full scale: a steady stream of RATE messages/s (PAYLOAD bytes each, to
# one webhook endpoint that answers 200) for DUR seconds, with every retention shortened to
# RETENTION seconds (payloads and the attempt log; received requests keep their 3-day
# minimum, i.e. 3 x RETENTION). Prints the store's size every SAMPLE seconds (SQLite: the
# database file and its WAL; PostgreSQL: every table of the database with its indexes and
# TOAST), then compares the end with the middle of the run, and fails if the store grew by
# more than MAX_GROWTH (10%) over the second half.
#
#   cargo build --release -p herald
#   crates/herald-bench/retention-soak.sh                       # 1 hour, 5-minute retention
#   DUR=120 RETENTION=20 SAMPLE=10 crates/herald-bench/retention-soak.sh          # a quick look
#   STORE_URL=postgres://herald:herald@127.0.0.1:5432/soak crates/herald-bench/retention-soak.sh
#
# STORE_URL names an empty PostgreSQL database (its tables are created); without it the store
# is SQLite in a temporary directory. Needs python3 (and psql for PostgreSQL).
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-target/release}
DUR=${DUR:-3600}; RETENTION=${RETENTION:-300}; RATE=${RATE:-50}; PAYLOAD=${PAYLOAD:-1024}
SAMPLE=${SAMPLE:-60}; MAX_GROWTH=${MAX_GROWTH:-0.10}; STORE_URL=${STORE_URL:-}

data=$(mktemp -d)
export HERALD_RETENTION__DAY_SECS="$RETENTION" HERALD_RETENTION__PAYLOAD_DAYS=1 \
  HERALD_RETENTION__ATTEMPT_DAYS=1 HERALD_RETENTION__INGEST_DAYS=3 \
  HERALD_RETENTION__SWEEP_INTERVAL_SECS=${SWEEP:-10}
# One client sends everything: lift the publish limit for the benchmark.
export HERALD_API__PUBLISH_PER_SECOND_PER_APP=0
if [ -n "$STORE_URL" ]; then export HERALD_STORE__URL="$STORE_URL"; fi
: >"$data/log" # there before the first read below: the backgrounded server opens it itself
"$BIN/herald" serve --dev --listen 127.0.0.1:0 --data "$data" >"$data/log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; rm -rf "$data"' EXIT
port=""
for _ in $(seq 1 100); do
  port=$(sed -n 's/^herald listening on http:\/\/127.0.0.1://p' "$data/log" | head -n 1)
  [ -n "$port" ] && break
  sleep 0.1
done
[ -n "$port" ] || { cat "$data/log"; echo "herald did not start"; exit 1; }
echo "herald on port $port (pid $pid), store ${STORE_URL:-sqlite in $data}; $RATE msg/s of $PAYLOAD bytes for $DUR s, retention $RETENTION s"

PORT=$port DATA=$data DUR=$DUR RATE=$RATE PAYLOAD=$PAYLOAD SAMPLE=$SAMPLE MAX_GROWTH=$MAX_GROWTH \
  STORE_URL=$STORE_URL python3 - <<'EOF'
import http.client, http.server, json, os, subprocess, sys, threading, time

port, data = int(os.environ["PORT"]), os.environ["DATA"]
dur, rate, payload = float(os.environ["DUR"]), float(os.environ["RATE"]), int(os.environ["PAYLOAD"])
sample, max_growth, store_url = float(os.environ["SAMPLE"]), float(os.environ["MAX_GROWTH"]), os.environ["STORE_URL"]

class Receiver(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200); self.send_header("content-length", "0"); self.end_headers()
    def log_message(self, *args):
        pass

receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
threading.Thread(target=receiver.serve_forever, daemon=True).start()

api = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
headers = {"authorization": "Bearer demo-token", "content-type": "application/json"}
def call(method, path, body):
    api.request(method, path, json.dumps(body), headers)
    response = api.getresponse()
    text = response.read()
    if response.status >= 300:
        sys.exit(f"{method} {path}: {response.status} {text[:300]!r}")
call("POST", "/api/v1/app/demo/endpoint", {"url": f"http://127.0.0.1:{receiver.server_port}/"})

def store_bytes():
    if store_url:
        out = subprocess.run(["psql", store_url, "-Atc",
            "SELECT SUM(pg_total_relation_size(c.oid)) FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE n.nspname = current_schema() AND c.relkind = 'r'"],
            check=True, capture_output=True, text=True)
        return int(out.stdout.strip() or 0)
    return sum(os.path.getsize(os.path.join(data, f)) for f in ("herald.db", "herald.db-wal")
               if os.path.exists(os.path.join(data, f)))

padding = "x" * max(0, payload - 40)
start, sent, samples, next_sample = time.monotonic(), 0, [], sample
while (elapsed := time.monotonic() - start) < dur:
    # Behind schedule (a busy machine), the next message goes at once.
    time.sleep(max(0.0, start + sent / rate - time.monotonic()))
    call("POST", "/api/v1/app/demo/msg", {"eventType": "soak.tick", "payload": {"n": sent, "p": padding}})
    sent += 1
    if elapsed >= next_sample:
        size = store_bytes()
        samples.append((elapsed, sent, size))
        print(f"{elapsed:8.0f} s  {sent:9d} messages sent  store {size / 1048576:9.2f} MiB", flush=True)
        next_sample += sample

if len(samples) < 2:
    sys.exit("too short a run to compare: raise DUR or lower SAMPLE")
middle, end = samples[len(samples) // 2 - 1], samples[-1]
growth = end[2] / middle[2] - 1 if middle[2] else 0.0
print(f"middle ({middle[0]:.0f} s, {middle[1]} sent): {middle[2] / 1048576:.2f} MiB; "
      f"end ({end[0]:.0f} s, {end[1]} sent): {end[2] / 1048576:.2f} MiB; growth {growth * 100:+.1f}% "
      f"(limit {max_growth * 100:.0f}%)")
if growth > max_growth:
    sys.exit("the store kept growing")
EOF
