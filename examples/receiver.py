"""A webhook receiver for trying Herald by hand: prints each delivery and checks its
Standard Webhooks signature with nothing but the Python standard library.

    python3 examples/receiver.py 8000 whsec_...        # secret from GET .../endpoint/{id}/secret
    FAIL=1 python3 examples/receiver.py 8000 whsec_... # answer 500, to watch retries
"""

import base64
import hashlib
import hmac
import http.server
import os
import sys
import time


def verify(secret: str, headers, body: bytes) -> bool:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    fresh = abs(time.time() - int(headers["webhook-timestamp"])) < 300
    return fresh and any(
        hmac.compare_digest(f"v1,{expected}", s) for s in headers["webhook-signature"].split()
    )


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (stdlib naming)
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        ok = verify(SECRET, self.headers, body) if SECRET else None
        print(f"{self.headers['webhook-id']} signature={'ok' if ok else ok} {body.decode()}")
        status = 500 if os.environ.get("FAIL") else 200
        self.send_response(status)
        self.end_headers()
        self.wfile.write(b"thanks\n")

    def log_message(self, *args) -> None:
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8000
    SECRET = sys.argv[2] if len(sys.argv) > 2 else ""
    print(f"listening on http://127.0.0.1:{port}/")
    http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
