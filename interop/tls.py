"""Herald over TLS with other ecosystems' clients: the Svix Python SDK over https://,
pusher-js and the pusher server SDK over wss:// and https:// (tls.js, in Node), and the
browser's EventSource over https:// in headless Chromium; a certificate swapped on disk and
reloaded by SIGHUP while a pusher-js connection and the browser's stream stay open; the plain
health listener; `herald serve --dev --dev-tls`.

Starts its own Herald (HERALD_BIN) with a certificate signed by a test CA it makes with the
openssl CLI. Each client trusts that CA its own ecosystem's way: httpx (under the Svix SDK)
through SSL_CERT_FILE, Node through NODE_EXTRA_CA_CERTS. Chromium is given the SHA-256 of the
two leaf keys (--ignore-certificate-errors-spki-list): it accepts exactly those keys, on a
throwaway profile, with no certificate database to build (an NSS db needs certutil, another
package, and a HOME of its own), and it is still a real TLS handshake and HTTP/1.1 over it.

Usage: HERALD_BIN=target/debug/herald python tls.py   (CHROMIUM=/usr/bin/chromium; run
`npm ci` in interop/pusher first). Prints one `ok: ...` line per check; exits non-zero,
naming the check, on any mismatch.
"""

import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import browser_harness
from browser_harness import CHROMIUM, HERALD_BIN, PATIENCE, Checks, Reports, run

TOKEN = "tls-interop-admin-token-0123456789"
CHANNEL = "ticker"
HERE = os.path.dirname(os.path.abspath(__file__))
checks = Checks()
ok = checks.ok


def openssl(*args, stdin=None):
    """Runs the openssl CLI; its stdout (bytes)."""
    done = subprocess.run(["openssl", *args], input=stdin, capture_output=True, check=False)
    if done.returncode != 0:
        raise AssertionError(f"openssl {' '.join(args)}: {done.stderr.decode(errors='replace')}")
    return done.stdout


def make_ca(directory):
    key, cert = os.path.join(directory, "ca.key"), os.path.join(directory, "ca.pem")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", key, "-out", cert, "-days", "2", "-subj", "/CN=Herald interop test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def make_leaf(directory, name, ca_cert, ca_key):
    """A leaf for 127.0.0.1 and localhost signed by the CA: (cert, key) paths."""
    key, csr, cert = (os.path.join(directory, f"{name}.{ext}") for ext in ("key", "csr", "pem"))
    extensions = os.path.join(directory, f"{name}.ext")
    with open(extensions, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\n"
                "basicConstraints=critical,CA:FALSE\n"
                "keyUsage=critical,digitalSignature\n"
                "extendedKeyUsage=serverAuth\n")
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
    openssl("x509", "-req", "-in", csr, "-CA", ca_cert, "-CAkey", ca_key, "-CAcreateserial",
            "-days", "2", "-extfile", extensions, "-out", cert)
    return cert, key


def fingerprint(cert):
    """SHA-256 of the certificate, AB:CD:... (as openssl, Node and Herald print it)."""
    line = openssl("x509", "-in", cert, "-noout", "-fingerprint", "-sha256").decode().strip()
    return line.split("=", 1)[1]


def spki_hash(cert):
    """base64(SHA-256(SubjectPublicKeyInfo)), the form Chromium's SPKI list takes."""
    public_pem = openssl("x509", "-in", cert, "-pubkey", "-noout")
    der = openssl("pkey", "-pubin", "-outform", "der", stdin=public_pem)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def der_of(cert):
    return openssl("x509", "-in", cert, "-outform", "der")


def start_herald(args, settings, banner_lines):
    """`herald serve` with `args` and HERALD_* `settings`; its first `banner_lines` stdout lines."""
    # Herald reads HERALD_* variables as configuration: pass only these.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
    env.update(settings)
    proc = subprocess.Popen([HERALD_BIN, "serve", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    banner = []
    for _ in range(banner_lines):
        line = proc.stdout.readline()
        if not line:
            proc.kill()
            raise AssertionError(f"herald did not start: {banner} {proc.stderr.read()}")
        banner.append(line.rstrip("\n"))
    log = []
    # Keep draining its output so a chatty server never blocks on a full pipe; stderr is kept
    # for failure messages.
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
    threading.Thread(target=lambda: [log.append(line) for line in proc.stderr], daemon=True).start()
    proc.log = log
    return proc, banner


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=PATIENCE)
    assert code == 0, f"herald exited with {code}: {''.join(proc.log)}"


def served_der(port, cafile):
    """The leaf a new handshake gets, the chain checked against `cafile`."""
    context = ssl.create_default_context(cafile=cafile)
    with context.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=10),
                             server_hostname="localhost") as s:
        return s.getpeercert(binary_form=True)


def http_status(url, context=None):
    try:
        with urllib.request.urlopen(url, timeout=10, context=context) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


PAGE = """<!doctype html><meta charset="utf-8"><title>herald sse over https</title><script>
const params = new URLSearchParams(location.search);
let seq = 0;
const report = (body) => fetch("/report", {method: "POST", body: JSON.stringify({seq: seq++, ...body})});
const source = new EventSource(`${params.get("herald")}/apps/${params.get("app")}/sse?channels=%s`);
source.onmessage = (m) => report({data: JSON.parse(m.data)});
source.onerror = () => report({error: source.readyState});
</script>""" % CHANNEL


def chromium(url, profile, flags):
    """Headless Chromium on `url` with a throwaway profile (the SPKI list needs one)."""
    return subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-quic", "--no-first-run", "--disable-component-update", "--disable-sync",
         *flags, f"--user-data-dir={profile}", "--remote-debugging-port=0", url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def svix_checks(base, ca_cert):
    """The Svix SDK refuses the server without the CA and works with it; returns (svix, app)."""
    from standardwebhooks.webhooks import Webhook
    from svix.api import ApplicationIn, EndpointIn, MessageIn, Svix, SvixOptions

    os.environ.pop("SSL_CERT_FILE", None)
    untrusting = Svix(TOKEN, SvixOptions(server_url=base))
    try:
        untrusting.application.list()
        raise AssertionError("the Svix SDK accepted the server's certificate without the test CA")
    except Exception as e:  # httpx.ConnectError, wrapping ssl.SSLCertVerificationError
        assert "CERTIFICATE_VERIFY_FAILED" in repr(e) or "certificate verify failed" in str(e), repr(e)
    # httpx, under the SDK, reads SSL_CERT_FILE when a client is made.
    os.environ["SSL_CERT_FILE"] = ca_cert
    svix = Svix(TOKEN, SvixOptions(server_url=base))
    ok("without the test CA the Svix Python SDK refuses Herald's certificate (CERTIFICATE_VERIFY_FAILED)")

    received = []
    arrived = threading.Condition()

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            with arrived:
                received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                arrived.notify_all()
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    app = svix.application.create(ApplicationIn(name="tls interop", uid="tls-interop"))
    endpoint = svix.endpoint.create(
        app.id, EndpointIn(url=f"http://127.0.0.1:{receiver.server_address[1]}/hooks", version=1))
    secret = svix.endpoint.get_secret(app.id, endpoint.id).key
    message = svix.message.create(
        app.id, MessageIn(event_type="order.paid", payload={"id": 1}, event_id="tls-order-1"))
    assert svix.message.get(app.id, message.id).event_id == "tls-order-1"
    with arrived:
        assert arrived.wait_for(lambda: received, timeout=PATIENCE), "no delivery"
    headers, body = received[0]
    assert Webhook(secret).verify(body, headers) == {"id": 1}
    receiver.shutdown()
    ok("the Svix Python SDK over https:// (test CA via SSL_CERT_FILE): app, endpoint, message; the delivery verifies with standardwebhooks")
    return svix, app


def main():
    work = tempfile.mkdtemp(prefix="herald-tls-")
    ca_cert, ca_key = make_ca(work)
    first_cert, first_key = make_leaf(work, "first", ca_cert, ca_key)
    next_cert, next_key = make_leaf(work, "second", ca_cert, ca_key)
    # Herald serves these two paths; tls.js later renames the second pair onto them.
    served_cert, served_key = os.path.join(work, "tls.crt"), os.path.join(work, "tls.key")
    for source, target in ((first_cert, served_cert), (first_key, served_key)):
        with open(source, "rb") as f, open(target, "wb") as g:
            g.write(f.read())

    herald, banner = start_herald(
        ["--listen", "127.0.0.1:0", "--data", os.path.join(work, "data")],
        {
            "HERALD_ADMIN_TOKEN": TOKEN,
            "HERALD_DELIVERY__ALLOW_PRIVATE_TARGETS": "true",
            "HERALD_TLS__CERT": served_cert,
            "HERALD_TLS__KEY": served_key,
            # SIGHUP alone reloads here, so the swap below proves it does.
            "HERALD_TLS__WATCH_INTERVAL_MS": "0",
            "HERALD_TLS__HEALTH_LISTEN": "127.0.0.1:0",
        },
        banner_lines=2,
    )
    reports = Reports()
    pages = browser_harness.page_server(reports, {"/": (PAGE.encode(), "text/html")})
    profile = tempfile.mkdtemp(prefix="chromium-", dir=work)
    browser = None
    try:
        base = banner[0].removeprefix("herald listening on ")
        assert base.startswith("https://127.0.0.1:"), banner
        port = int(base.rsplit(":", 1)[1])
        health = banner[1].removeprefix("health checks on ").split()[0].removesuffix("/health/live")
        assert health.startswith("http://127.0.0.1:"), banner
        assert http_status(f"{health}/health/live") == 204
        assert http_status(f"{health}/health/ready") == 204
        assert http_status(f"{health}/api/v1/app") == 404
        ok("the plain health listener answers /health/live and /health/ready without TLS, and nothing else")

        svix, app = svix_checks(base, ca_cert)
        from svix.api import MessageIn

        # The SDK's model has no Pusher credentials: read them with the stdlib, trusting the CA.
        context = ssl.create_default_context(cafile=ca_cert)
        request = urllib.request.Request(f"{base}/api/v1/app/{app.id}")
        request.add_header("authorization", f"Bearer {TOKEN}")
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            creds = json.loads(response.read())["pusher"]

        hello = lambda items: [m for m in items if "data" in m and m["data"]["event"] == "herald:subscription_succeeded"]
        page = lambda server: f"http://127.0.0.1:{server.server_port}/?herald={base}&app={creds['appId']}"

        # First a browser that was told nothing: the TLS handshake fails, so the pin below is
        # what lets the real one through.
        refusals = Reports("the page without the pinned keys")
        refusing_pages = browser_harness.page_server(refusals, {"/": (PAGE.encode(), "text/html")})
        untrusting = chromium(page(refusing_pages), tempfile.mkdtemp(prefix="chromium-", dir=work), [])
        try:
            refusals.wait_for("the EventSource to fail", lambda items: [r for r in items if "error" in r])
            assert not hello(refusals.ordered()), refusals.ordered()
        finally:
            untrusting.kill()
            untrusting.wait()
            refusing_pages.shutdown()
        ok("without the leaf keys pinned, Chromium refuses the certificate: the EventSource errors, no stream")

        spki = ",".join(spki_hash(c) for c in (first_cert, next_cert))
        browser = chromium(page(pages), profile, [f"--ignore-certificate-errors-spki-list={spki}"])
        ticks = lambda items: [json.loads(m["data"]["data"])["n"] for m in items if "data" in m and m["data"]["event"] == "tick"]
        reports.wait_for("the https stream to open", lambda items: len(hello(items)) == 1)
        for n in (1, 2):
            svix.message.create(app.id, MessageIn(event_type="tick", payload={"n": n}, channels=[CHANNEL]))
        reports.wait_for("ticks 1-2", lambda items: ticks(items) == [1, 2])
        ok("EventSource in headless Chromium streams Herald's SSE over https:// (events published with the Svix SDK)")

        # pusher-js and the pusher server SDK; tls.js swaps the certificate and sends SIGHUP.
        env = dict(os.environ)
        env.update({
            "HERALD_URL": base,
            "HERALD_TOKEN": TOKEN,
            "HERALD_PID": str(herald.pid),
            "TLS_CERT": served_cert,
            "TLS_KEY": served_key,
            "NEXT_CERT": next_cert,
            "NEXT_KEY": next_key,
            "OLD_FINGERPRINT": fingerprint(first_cert),
            "NEW_FINGERPRINT": fingerprint(next_cert),
            "NODE_EXTRA_CA_CERTS": ca_cert,
        })
        node = subprocess.run(["node", os.path.join(HERE, "tls.js")], env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        for line in node.stdout.splitlines():
            print(line, flush=True)
            if line.startswith("ok: "):
                checks.passed += 1
        if node.returncode != 0:
            raise AssertionError(f"tls.js failed: {node.stderr}\nherald: {''.join(herald.log)}")

        assert served_der(port, ca_cert) == der_of(next_cert), "the new certificate is served"
        svix.message.create(app.id, MessageIn(event_type="tick", payload={"n": 3}, channels=[CHANNEL]))
        reports.wait_for("tick 3 after the reload", lambda items: ticks(items) == [1, 2, 3])
        assert len(hello(reports.ordered())) == 1, "the browser reconnected"
        assert not [r for r in reports.ordered() if "error" in r], reports.ordered()
        ok("the browser's EventSource opened before the SIGHUP reload kept its stream and got the next event without reconnecting")
        stop(herald)
        herald = None

        # --dev --dev-tls: a self-signed certificate in the data directory, with its fingerprint.
        dev_data = os.path.join(work, "dev")
        dev, lines = start_herald(["--dev", "--dev-tls", "--listen", "127.0.0.1:0", "--data", dev_data],
                                  {}, banner_lines=3)
        try:
            dev_base = lines[0].removeprefix("herald listening on ")
            assert dev_base.startswith("https://127.0.0.1:"), lines
            dev_cert = os.path.join(dev_data, "dev-tls-cert.pem")
            assert lines[1].startswith("dev TLS: made a self-signed certificate " + dev_cert), lines
            printed = lines[2].split("SHA-256 fingerprint ", 1)[1].split()[0]
            assert printed == fingerprint(dev_cert), (printed, fingerprint(dev_cert))
            dev_port = int(dev_base.rsplit(":", 1)[1])
            trusting = ssl.create_default_context(cafile=dev_cert)
            assert http_status(f"https://localhost:{dev_port}/health/live", trusting) == 204
            ok("herald serve --dev --dev-tls makes a self-signed certificate for localhost, prints its path and SHA-256 fingerprint, and serves https:// with it")
        finally:
            stop(dev)
    finally:
        if browser:
            browser.kill()
            browser.wait()
        if herald:
            herald.kill()
            herald.wait()
        pages.shutdown()
        # Certificates, stores and Chromium's profiles all live under `work`; left behind,
        # every run kept them.
        shutil.rmtree(work, ignore_errors=True)
    print(f"tls interop: all {checks.passed} checks passed")


if __name__ == "__main__":
    run(main)
