"""Webhooks in, signed by the reference libraries: slack-sdk's SignatureVerifier and the
standardwebhooks library (also sent under Svix's svix-* header names). Valid signatures are
accepted, altered ones refused.

Usage: HERALD_URL=http://127.0.0.1:6001 HERALD_TOKEN=... python ingest_signers.py
Exits non-zero, naming the check, on any mismatch.
"""

import json
import os
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone

from slack_sdk.signature import SignatureVerifier
from standardwebhooks.webhooks import Webhook

BASE = os.environ["HERALD_URL"]
TOKEN = os.environ["HERALD_TOKEN"]
passed = 0


def ok(what):
    global passed
    passed += 1
    print(f"ok: {what}")


def call(method, path, body=None, headers=None, token=True):
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    request = urllib.request.Request(BASE + path, data=data, method=method)
    request.add_header("content-type", "application/json")
    if token:
        request.add_header("authorization", f"Bearer {TOKEN}")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def source(app_id, spec):
    status, body = call("POST", f"/api/v1/app/{app_id}/ingest/source", spec)
    assert status == 201, body
    return body


def ingest(src, body, headers):
    return call("POST", src["ingestPath"], body, headers, token=False)


def main():
    status, app = call("POST", "/api/v1/app", {"name": "signers", "uid": f"signers-{time.time_ns()}"})
    assert status == 201, app

    # Slack.
    slack_secret = "8f742231b10e8888abcd99yyyzzz85a5"
    slack = source(app["id"], {"kind": "slack", "secrets": [slack_secret]})
    body = json.dumps({"type": "event_callback", "event_id": "Ev01", "event": {"type": "app_mention"}}).encode()
    ts = str(int(time.time()))
    signature = SignatureVerifier(slack_secret).generate_signature(timestamp=ts, body=body)
    headers = {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": signature}
    status, answer = ingest(slack, body, headers)
    assert status == 200 and answer["eventType"] == "app_mention", (status, answer)
    assert ingest(slack, body, headers)[1]["duplicate"] is True
    ok("a Slack request signed by slack_sdk SignatureVerifier is accepted (event app_mention; retry deduplicated)")
    status, refused = ingest(slack, body.replace(b"Ev01", b"Ev02"), headers)
    assert status == 401, (status, refused)
    old_ts = str(int(time.time()) - 600)
    stale = SignatureVerifier(slack_secret).generate_signature(timestamp=old_ts, body=body)
    status, refused_stale = ingest(slack, body, {"X-Slack-Request-Timestamp": old_ts, "X-Slack-Signature": stale})
    assert status == 401 and "at most 300 s" in refused_stale["detail"], refused_stale
    ok("an altered Slack body and a 10-minute-old timestamp are refused with 401")

    # Standard Webhooks, under both header families.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    std = source(app["id"], {"kind": "standard-webhooks", "secrets": [secret], "defaultChannel": "partner"})
    wh = Webhook(secret)
    for prefix in ("webhook", "svix"):
        msg_id = f"msg_{prefix}_1"
        body = json.dumps({"type": "invoice.paid", "data": {"n": 1}})
        now = datetime.now(tz=timezone.utc)
        headers = {
            f"{prefix}-id": msg_id,
            f"{prefix}-timestamp": str(int(now.timestamp())),
            f"{prefix}-signature": wh.sign(msg_id, now, body),
        }
        status, answer = ingest(std, body.encode(), headers)
        assert status == 200 and answer["eventType"] == "invoice.paid", (status, answer)
        assert answer["channels"] == ["partner"], answer
        status, _ = ingest(std, body.replace("invoice", "invoicE").encode(), headers)
        assert status == 401
        ok(f"a request signed by standardwebhooks Webhook.sign under {prefix}-* headers is accepted; altered refused")

    print(f"ingest interop (python): all {passed} checks passed")


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # any mismatch fails CI, naming the check
        print(f"FAIL: {e!r}", file=sys.stderr)
        raise
