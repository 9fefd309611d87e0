"""`herald listen --forward-to`: events forwarded to a local receiver that verifies them with the
reference Standard Webhooks library (`standardwebhooks`), as a developer's server would.

Usage: HERALD_URL=http://127.0.0.1:6001 HERALD_TOKEN=... HERALD_BIN=./target/debug/herald \
       python cli_listen.py

Makes its own app with `herald app create`, starts `herald listen` on it with a secret the
receiver knows, publishes with `herald send`, and exits non-zero, naming what was off, if a
forwarded event is missing, fails verification, or carries another body than the one sent.
"""

import http.server
import json
import os
import subprocess
import sys
import threading
import time

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

TIMEOUT = 30.0
SECRET = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD"
EVENTS = 3


class Receiver:
    """A local server that verifies every POST with the reference library."""

    def __init__(self) -> None:
        self.verified: list[dict] = []
        self.bodies: list[str] = []
        self.failures: list[str] = []
        self.lock = threading.Condition()
        receiver = self
        verifier = Webhook(SECRET)

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                try:
                    payload = verifier.verify(body, dict(self.headers))
                    outcome = ("ok", payload)
                except WebhookVerificationError as e:
                    outcome = ("bad", f"verification failed: {e}")
                self.send_response(200 if outcome[0] == "ok" else 400)
                self.end_headers()
                with receiver.lock:
                    if outcome[0] == "ok":
                        receiver.verified.append(outcome[1])
                        receiver.bodies.append(body.decode())
                    else:
                        receiver.failures.append(outcome[1])
                    receiver.lock.notify_all()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def wait_for(self, count: int) -> list[dict]:
        deadline = time.monotonic() + TIMEOUT
        with self.lock:
            while len(self.verified) + len(self.failures) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.lock.wait(left)
            return list(self.verified)


def herald(*args: str) -> str:
    done = subprocess.run(
        [os.environ["HERALD_BIN"], *args], capture_output=True, text=True, timeout=TIMEOUT
    )
    if done.returncode != 0:
        sys.exit(f"FAIL: herald {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def main() -> None:
    app = json.loads(herald("app", "create", "CLI listen interop", "--json"))["id"]
    receiver = Receiver()
    listen = subprocess.Popen(
        [
            os.environ["HERALD_BIN"], "listen", "--app", app, "--forward-to", receiver.url,
            "--secret", SECRET, "--count", str(EVENTS),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while True:
            line = listen.stderr.readline()
            if line.startswith("ready:"):
                break
            if not line or time.monotonic() > deadline:
                sys.exit(f"FAIL: herald listen did not get ready: {line!r}")
        print("ok: herald listen is ready")

        sent = [{"order": n, "note": "paid ✓"} for n in range(EVENTS)]
        # Spacing and key order of the producer's own: forwarded byte for byte.
        texts = [f'{{ "order":{p["order"]},   "note": "{p["note"]}" }}' for p in sent]
        for text in texts:
            herald("send", app, "order.paid", "--data", text, "--channel", "orders")
        verified = receiver.wait_for(EVENTS)
        if receiver.failures:
            sys.exit(f"FAIL: {receiver.failures}")
        if sorted(verified, key=lambda p: p["order"]) != sent:
            sys.exit(f"FAIL: forwarded bodies {verified} are not the payloads sent {sent}")
        if sorted(receiver.bodies) != sorted(texts):
            sys.exit(f"FAIL: forwarded bytes {receiver.bodies!r} are not those sent {texts!r}")
        print(f"ok: {EVENTS} forwarded events verified by standardwebhooks, bodies byte for byte as sent")

        out, _ = listen.communicate(timeout=TIMEOUT)
        if listen.returncode != 0:
            sys.exit(f"FAIL: herald listen exited with {listen.returncode}")
        shown = [line for line in out.splitlines() if "order.paid" in line]
        if len(shown) != EVENTS:
            sys.exit(f"FAIL: herald listen printed {shown!r}, not {EVENTS} events")
        print("ok: herald listen printed each event and stopped after --count")
    finally:
        if listen.poll() is None:
            listen.kill()


if __name__ == "__main__":
    main()
