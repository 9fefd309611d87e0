"""What the headless-Chromium checks share: a Herald of their own, its admin API, reports from
the page (or a helper process) to wait on, and the `ok:` lines `.ci/run` counts.

Used by sse_browser.py and socketio_browser.py, which sit next to this file.
"""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERALD_BIN = os.environ.get("HERALD_BIN", "target/debug/herald")  # not passed on to herald
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
PATIENCE = 30


class Checks:
    """Counts the checks that passed and prints each as `.ci/run` counts them."""

    def __init__(self):
        self.passed = 0

    def ok(self, what):
        self.passed += 1
        print(f"ok: {what}", flush=True)


class Reports:
    """JSON objects arriving from a page or a process, with waiting on a predicate."""

    def __init__(self, name="the page"):
        self.name = name
        self.items = []
        self.cond = threading.Condition()

    def add(self, item):
        with self.cond:
            self.items.append(item)
            self.cond.notify_all()

    def wait_for(self, what, predicate, patience=PATIENCE):
        deadline = time.monotonic() + patience
        with self.cond:
            while True:
                found = predicate(self.ordered())
                if found:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}; {self.name} reported {self.ordered()}")
                self.cond.wait(left)

    def ordered(self):
        return sorted(self.items, key=lambda r: r.get("seq", 0))

    def messages(self):
        return [r for r in self.ordered() if "data" in r]


def page_server(reports, files):
    """Serves `files` ({path: (bytes, content type)}, the query string ignored) on a free
    loopback port; each POST (to any path) is a JSON report added to `reports`."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            path = urllib.parse.urlsplit(self.path).path
            if path not in files:
                self.send_error(404)
                return
            body, kind = files[path]
            self.send_response(200)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            length = int(self.headers.get("content-length", "0"))
            reports.add(json.loads(self.rfile.read(length)))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def start_herald(token, port, data, settings=None):
    """`herald serve` with this admin token, on this port (0: one the system picks, so no other
    process can take it between a pick and the bind) and data directory, and any more
    `settings` ({HERALD_... variable: value}). The process's `port` and `base` say where it
    listens, from its banner."""
    # Herald reads HERALD_* variables as configuration: pass only its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env.update(settings or {})
    env["HERALD_ADMIN_TOKEN"] = token
    proc = subprocess.Popen(
        [HERALD_BIN, "serve", "--listen", f"127.0.0.1:{port}", "--data", data],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("herald listening on"):
        proc.kill()
        raise AssertionError(f"herald did not start: {line!r} {proc.stderr.read()}")
    proc.base = line.split()[-1]
    proc.port = int(proc.base.rsplit(":", 1)[1])
    # Keep draining its output so a chatty server never blocks on a full pipe.
    for stream in (proc.stdout, proc.stderr):
        threading.Thread(target=lambda s=stream: [None for _ in s], daemon=True).start()
    return proc


def call(base, token, method, path, body=None):
    """The admin API; an HTTP error fails the check with its answer."""
    request = urllib.request.Request(
        base + path, method=method, data=None if body is None else json.dumps(body).encode()
    )
    request.add_header("authorization", f"Bearer {token}")
    request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        raise AssertionError(f"{method} {path}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None


def run(main):
    """Runs a check script's `main`; any mismatch fails CI, naming the check."""
    try:
        main()
    except Exception as e:
        print(f"FAIL: {e!r}", file=sys.stderr)
        raise
