"""The browser's own EventSource, in headless Chromium, against Herald's SSE stream.

The page subscribes to a history channel and reports every message to this script. After
three events the script restarts Herald (same port, same embedded store) and publishes three
more before the browser's reconnection delay is up; the browser must reconnect by itself,
send its Last-Event-ID, and receive exactly the three it missed, in order, with the stream
saying recovery was complete.

Usage: HERALD_BIN=target/debug/herald python sse_browser.py   (CHROMIUM=/usr/bin/chromium)
Exits non-zero, naming the check, on any mismatch.
"""

import hashlib
import hmac
import json
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request

import browser_harness
from browser_harness import CHROMIUM, PATIENCE, Checks, Reports, call, run, start_herald

TOKEN = "sse-browser-admin-token-0123456789"
CHANNEL = "history-ticker"
checks = Checks()
ok = checks.ok

PAGE = """<!doctype html><meta charset="utf-8"><title>herald sse</title><script>
const params = new URLSearchParams(location.search);
let seq = 0;
const report = (body) => fetch("/report", {method: "POST", body: JSON.stringify({seq: seq++, ...body})});
const source = new EventSource(`${params.get("herald")}/apps/${params.get("app")}/sse?channels=%s&retry=3000`);
source.onmessage = (m) => report({id: m.lastEventId, data: JSON.parse(m.data)});
source.onerror = () => report({error: source.readyState});
</script>""" % CHANNEL


def page_server(reports):
    return browser_harness.page_server(reports, {"/": (PAGE.encode(), "text/html")})


def trigger(base, creds, n):
    """Publishes through the Pusher HTTP API, signed as the server SDKs sign."""
    path = f"/apps/{creds['appId']}/events"
    body = json.dumps({"name": "tick", "channel": CHANNEL, "data": json.dumps({"n": n})}).encode()
    params = {
        "auth_key": creds["key"],
        "auth_timestamp": str(int(time.time())),
        "auth_version": "1.0",
        "body_md5": hashlib.md5(body).hexdigest(),
    }
    query = "&".join(f"{k}={params[k]}" for k in sorted(params))
    signature = hmac.new(creds["secret"].encode(), f"POST\n{path}\n{query}".encode(), hashlib.sha256)
    url = f"{base}{path}?{query}&auth_signature={signature.hexdigest()}"
    request = urllib.request.Request(url, data=body, method="POST")
    request.add_header("content-type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


def main():
    data = tempfile.mkdtemp(prefix="herald-sse-")
    profile = tempfile.mkdtemp(prefix="chromium-")
    herald = start_herald(TOKEN, 0, data)
    # The restart below takes the same port again: the browser reconnects to it.
    port, base = herald.port, herald.base
    reports = Reports()
    pages = page_server(reports)
    browser = None
    try:
        creds = call(base, TOKEN, "POST", "/api/v1/app", {"name": "sse browser", "uid": "sse-browser"})["pusher"]
        url = f"http://127.0.0.1:{pages.server_port}/?herald={base}&app={creds['appId']}"
        browser = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--remote-debugging-port=0", url],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        hello = lambda items: [m for m in items if "data" in m and m["data"]["event"] == "herald:subscription_succeeded"]
        offsets = lambda items: [m["data"]["offset"] for m in items if "data" in m and m["data"].get("event") == "tick"]
        reports.wait_for("the stream to open", lambda items: len(hello(items)) == 1)
        first = hello(reports.ordered())[0]["data"]["data"][CHANNEL]
        epoch = first["epoch"]
        for n in range(1, 4):
            trigger(base, creds, n)
        reports.wait_for("events 1-3", lambda items: offsets(items) == [1, 2, 3])
        ok("EventSource in headless Chromium receives the SSE stream (events 1-3, ids = channel positions)")

        # Restart Herald on the same port and store, and publish while the browser waits.
        herald.send_signal(signal.SIGTERM)
        assert herald.wait(timeout=PATIENCE) == 0, "herald exits cleanly on SIGTERM"
        herald = start_herald(TOKEN, port, data)
        for n in range(4, 7):
            trigger(base, creds, n)
        reports.wait_for("events 4-6 after the reconnection", lambda items: offsets(items) == [1, 2, 3, 4, 5, 6])
        second = hello(reports.ordered())[1]["data"]["data"][CHANNEL]
        assert second == {"epoch": epoch, "offset": 6, "recovered": True, "missed": 3}, second
        last = reports.messages()[-1]
        assert last["id"] == f"{CHANNEL}:{epoch}:6", last
        for message in reports.messages():
            if message["data"].get("event") == "tick":
                assert json.loads(message["data"]["data"])["n"] == message["data"]["offset"]
        ok("after a server restart the browser reconnected with Last-Event-ID and got exactly events 4-6 (recovered, missed 3)")
    finally:
        if browser:
            browser.kill()
            browser.wait()
        herald.kill()
        herald.wait()
        pages.shutdown()
        # The store and Chromium's profile are throwaway; left behind, every run kept them.
        for path in (data, profile):
            shutil.rmtree(path, ignore_errors=True)
    print(f"sse browser interop: all {checks.passed} checks passed")


if __name__ == "__main__":
    run(main)
