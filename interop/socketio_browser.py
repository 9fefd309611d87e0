"""The official Socket.IO client bundle, in headless Chromium, chatting through Herald.

The example page (examples/socketio-chat/index.html, with socket.io.min.js from
interop/socketio/node_modules next to it) is served from a local static server; the app's
allowedOrigins names that server's origin. The page connects to Herald's Socket.IO endpoint
(long-polling, then the upgrade to WebSocket), sends a chat message, and a Node
socket.io-client (interop/socketio/browser_peer.js) on the same namespace answers with a text
and a binary message. The same page served from another origin is refused at CONNECT.

Usage: HERALD_BIN=target/debug/herald python socketio_browser.py   (CHROMIUM=/usr/bin/chromium)
Needs `npm ci` in interop/socketio first. Exits non-zero, naming the check, on any mismatch.
"""

import base64
import hashlib
import hmac
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import browser_harness
from browser_harness import CHROMIUM, Checks, Reports, call, run, start_herald

NODE = os.environ.get("NODE", "node")
ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "examples" / "socketio-chat" / "index.html"
PEER = ROOT / "interop" / "socketio" / "browser_peer.js"
BUNDLE = ROOT / "interop" / "socketio" / "node_modules" / "socket.io-client" / "dist" / "socket.io.min.js"
TOKEN = "socketio-browser-admin-token-0123456789"
checks = Checks()
ok = checks.ok


def page_server(reports):
    """Serves the example page and the client bundle next to it; POSTs feed `reports`."""
    page = (PAGE.read_bytes(), "text/html")
    return browser_harness.page_server(
        reports, {"/": page, "/index.html": page, "/socket.io.min.js": (BUNDLE.read_bytes(), "text/javascript")}
    )


def b64url(raw):
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def jwt(secret, claims):
    """An HS256 JWT, signed with the app's Pusher secret."""
    signed = f"{b64url(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64url(json.dumps(claims).encode())}"
    signature = hmac.new(secret.encode(), signed.encode(), hashlib.sha256).digest()
    return f"{signed}.{b64url(signature)}"


def start_peer(base, namespace, token):
    """browser_peer.js, its JSON lines fed to a Reports."""
    reports = Reports("the Node peer")
    env = dict(os.environ, PEER_URL=base, PEER_NAMESPACE=namespace, PEER_TOKEN=token)
    proc = subprocess.Popen([NODE, str(PEER)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def read():
        for seq, line in enumerate(proc.stdout):
            try:
                item = json.loads(line)
            except ValueError:
                item = {"error": f"not JSON: {line.strip()}"}
            reports.add({"seq": seq, **item})

    threading.Thread(target=read, daemon=True).start()
    return proc, reports


def chromium(url, profile):
    return subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={profile}", "--remote-debugging-port=0", url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def stop(proc):
    if proc and proc.poll() is None:
        proc.kill()
        proc.wait()


def page_url(pages, base, namespace, token, **extra):
    origin = f"http://127.0.0.1:{pages.server_port}"
    query = urllib.parse.urlencode({"server": base, "namespace": namespace, "token": token,
                                    "report": f"{origin}/report", **extra})
    return f"{origin}/index.html?{query}"


def main():
    if not BUNDLE.exists():
        raise AssertionError(f"{BUNDLE} is missing: run `npm ci` in interop/socketio first")
    data = tempfile.mkdtemp(prefix="herald-socketio-")
    profiles = [tempfile.mkdtemp(prefix="chromium-") for _ in range(2)]
    herald = start_herald(TOKEN, 0, data)
    base = herald.base
    allowed_reports, refused_reports = Reports("the page"), Reports("the page on the other origin")
    allowed_pages, refused_pages = page_server(allowed_reports), page_server(refused_reports)
    allowed_origin = f"http://127.0.0.1:{allowed_pages.server_port}"
    browsers, peer = [], None
    try:
        app = call(base, TOKEN, "POST", "/api/v1/app/", {
            "name": "socketio browser",
            "uid": "socketio-browser",
            "socketio": {
                "allowedOrigins": [allowed_origin],
                "events": [{"event": "chat message", "relay": "everyone"}],
            },
        })
        namespace, secret = app["uid"], app["pusher"]["secret"]
        token = lambda sub: jwt(secret, {"sub": sub, "exp": int(time.time()) + 600, "rooms": []})

        # The Node peer is connected before the page says anything.
        peer, peer_reports = start_peer(base, namespace, token("node"))
        peer_reports.wait_for("the Node peer to connect", lambda items: any(
            "ready" in i or "error" in i for i in items))
        errors = [i["error"] for i in peer_reports.ordered() if "error" in i]
        assert not errors, f"the Node peer failed: {errors}"

        # The page from an origin the app does not allow: refused at CONNECT.
        browsers.append(chromium(page_url(refused_pages, base, namespace, token("stranger")), profiles[1]))
        refusal = refused_reports.wait_for("connect_error on the other origin", lambda items: next(
            (i for i in items if i.get("state") in ("refused", "connected")), None))
        assert refusal["state"] == "refused", f"a page from another origin was let in: {refusal}"
        assert "not allowed" in refusal["error"], f"connect_error says the origin is not allowed: {refusal}"
        stop(browsers.pop())
        ok(f"a page from an origin not in allowedOrigins gets connect_error (\"{refusal['error']}\")")

        # The page from the allowed origin: connects, upgrades, chats with the Node peer.
        browsers.append(chromium(page_url(allowed_pages, base, namespace, token("chromium"),
                                          name="chromium", say="hello from chromium"), profiles[0]))
        connected = allowed_reports.wait_for("the page to connect", lambda items: next(
            (i for i in items if i.get("state") in ("refused", "connected")), None))
        assert connected["state"] == "connected", f"the page could not connect: {connected}"
        allowed_reports.wait_for("the upgrade to WebSocket", lambda items: any(
            i.get("upgrade") == "websocket" for i in items))
        ok(f"the socket.io-client bundle in headless Chromium connects to /{namespace} from an allowed origin "
           f"({connected['transport']}, then the upgrade to websocket)")

        chats = lambda items: [i for i in items if i.get("event") == "chat message"]
        peer_reports.wait_for("the page's message at the Node peer", lambda items: any(
            isinstance(i.get("received"), dict) and i["received"].get("from") == "chromium" for i in items))
        received = allowed_reports.wait_for("the page's own message and both answers", lambda items: len(chats(items)) >= 3
                                             and chats(items))
        texts = [m["data"] for m in received if isinstance(m["data"], dict) and "text" in m["data"]]
        assert {"from": "chromium", "text": "hello from chromium"} in texts, f"the page got its own message: {received}"
        assert {"from": "node", "text": "hello chromium, from socket.io-client"} in texts, f"the answer: {received}"
        binary = [m["data"] for m in received if isinstance(m["data"], dict) and "binaryHex" in m["data"]]
        assert binary == [{"binaryHex": "0001027f80ff"}], f"the binary answer arrives as an ArrayBuffer: {received}"
        for m in received:
            assert m["meta"] == {"channel": "socket.io"}, f"meta names the namespace channel: {m}"
        acks = [i["ack"] for i in allowed_reports.ordered() if "ack" in i]
        assert acks == [{"ok": True}], f"the page's emit was acknowledged: {acks}"
        errors = [i["error"] for i in peer_reports.ordered() if "error" in i]
        assert not errors, f"the Node peer reported: {errors}"
        ok("Chromium and a Node socket.io-client exchange 'chat message' through Herald: text both ways "
           "(acknowledged), binary arriving in the browser as an ArrayBuffer")
    finally:
        for browser in browsers:
            stop(browser)
        if peer:
            peer.stdin.close()
            try:
                peer.wait(timeout=5)
            except subprocess.TimeoutExpired:
                stop(peer)
        stop(herald)
        allowed_pages.shutdown()
        refused_pages.shutdown()
        for path in [data, *profiles]:
            shutil.rmtree(path, ignore_errors=True)
    print(f"socket.io browser interop: all {checks.passed} checks passed")


if __name__ == "__main__":
    run(main)
