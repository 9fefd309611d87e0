"""Drive Herald with the official Svix Python SDK; verify deliveries with `standardwebhooks`.

Usage: HERALD_URL=http://127.0.0.1:6001 HERALD_TOKEN=... python webhooks_svix_sdk.py

Exits non-zero, naming what was off, if any call fails, any response does not parse into the
SDK's models, or any delivery is missing, duplicated, unfiltered or fails verification.
"""

import http.server
import json
import os
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

from standardwebhooks.webhooks import Webhook, WebhookVerificationError
from svix.api import (
    AppPortalAccessIn,
    ApplicationIn,
    EndpointIn,
    EndpointSecretRotateIn,
    EventExampleIn,
    EventTypeIn,
    MessageIn,
    MessageStatus,
    RecoverIn,
    Svix,
    SvixOptions,
)
from svix.api.endpoint import EndpointGetStatsOptions
from svix.api.message import MessageGetOptions, MessageListOptions
from svix.api.message_attempt import (
    MessageAttemptListAttemptedDestinationsOptions,
    MessageAttemptListAttemptedMessagesOptions,
    MessageAttemptListByEndpointOptions,
)
from svix.exceptions import HttpError

TIMEOUT = 30.0


class Receiver:
    """A local endpoint that verifies every delivery with the reference library."""

    def __init__(self) -> None:
        self.secret: str | None = None
        self.previous_secret: str | None = None
        self.verified: list[dict] = []
        self.failures: list[str] = []
        self.lock = threading.Condition()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (stdlib naming)
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.record(self.path, headers, body)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def record(self, path: str, headers: dict, body: bytes) -> None:
        with self.lock:
            try:
                payload = Webhook(self.secret).verify(body, headers)
                if self.previous_secret:
                    # During a rotation the old secret must verify too.
                    Webhook(self.previous_secret).verify(body, headers)
                self.verified.append(
                    {"id": headers["webhook-id"], "payload": payload, "path": path}
                )
            except (WebhookVerificationError, KeyError) as e:
                self.failures.append(f"delivery {headers.get('webhook-id')}: {e!r}")
            self.lock.notify_all()

    def wait_for(self, count: int) -> list[dict]:
        deadline = time.monotonic() + TIMEOUT
        with self.lock:
            while len(self.verified) < count and not self.failures:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.lock.wait(left)
            return list(self.verified)


def check(condition: bool, what: str) -> None:
    if not condition:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


def main() -> None:
    url = os.environ["HERALD_URL"]
    svix = Svix(os.environ["HERALD_TOKEN"], SvixOptions(server_url=url))
    receiver = Receiver()
    suffix = str(int(time.time() * 1000))

    app = svix.application.create(ApplicationIn(name="Interop shop", uid=f"shop-{suffix}"))
    again = svix.application.get_or_create(ApplicationIn(name="Interop shop", uid=f"shop-{suffix}"))
    check(again.id == app.id, "application get_or_create returns the existing app")
    check(svix.application.get(app.uid).id == app.id, "application get by uid")

    svix.event_type.create(
        EventTypeIn(
            name=f"invoice.paid.{suffix}",
            description="An invoice was paid",
            schemas={"1": {"type": "object", "examples": [{"invoice": 99, "example": True}]}},
        )
    )
    check(
        any(et.name == f"invoice.paid.{suffix}" for et in svix.event_type.list().data),
        "event type listed",
    )

    endpoint = svix.endpoint.create(
        app.id,
        EndpointIn(url=receiver.url, event_types=[f"invoice.paid.{suffix}"], description="interop"),
    )
    check(endpoint.event_types == [f"invoice.paid.{suffix}"], "endpoint keeps its eventTypes filter")
    receiver.secret = svix.endpoint.get_secret(app.id, endpoint.id).key
    check(receiver.secret.startswith("whsec_"), "endpoint secret is whsec_-prefixed")

    sent = []
    for i in range(10):
        msg = svix.message.create(
            app.id,
            MessageIn(
                event_type=f"invoice.paid.{suffix}",
                payload={"invoice": i, "amount": 1000 + i, "note": "paid ✓"},
                channels=["billing"],
            ),
        )
        sent.append(msg.id)
    # Filtered out by the endpoint's event types: must never arrive.
    skipped = svix.message.create(app.id, MessageIn(event_type="invoice.failed", payload={"x": 1}))

    got = receiver.wait_for(len(sent))
    check(not receiver.failures, f"every delivery verifies with standardwebhooks ({receiver.failures})")
    ids = [d["id"] for d in got]
    check(sorted(ids) == sorted(sent), "each message delivered exactly once")
    check(skipped.id not in ids, "message of a filtered-out event type not delivered")
    by_id = {d["id"]: d["payload"] for d in got}
    check(by_id[sent[3]] == {"invoice": 3, "amount": 1003, "note": "paid ✓"}, "payload intact")

    # The SDK sends with_content=false unless asked, and Herald honours it.
    bare = svix.message.get(app.id, sent[0])
    check(bare.payload == {}, "message get without content omits the payload")
    fetched = svix.message.get(app.id, sent[0], MessageGetOptions(with_content=True))
    check(fetched.payload == {"invoice": 0, "amount": 1000, "note": "paid ✓"}, "message get returns payload")
    listed = svix.message.list(app.id, MessageListOptions(with_content=True))
    check(len(listed.data) == 11 and listed.done, "message list sees all 11 messages")
    check(listed.data[0].id == skipped.id, "message list is newest first")
    billing = svix.message.list(app.id, MessageListOptions(channel="billing"))
    check(len(billing.data) == 10, "message list filters by channel")

    deadline = time.monotonic() + TIMEOUT
    while True:
        stats = svix.endpoint.get_stats(app.id, endpoint.id)
        if stats.success == 10 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    check(stats.success == 10 and stats.fail == 0, f"endpoint stats count 10 successes ({stats})")
    hour = timedelta(hours=1)
    window = svix.endpoint.get_stats(
        app.id,
        endpoint.id,
        EndpointGetStatsOptions(since=datetime.now(timezone.utc) - hour, until=datetime.now(timezone.utc) + hour),
    )
    check(window.success == 10, f"endpoint stats within since/until count the 10 ({window})")
    later = svix.endpoint.get_stats(
        app.id, endpoint.id, EndpointGetStatsOptions(since=datetime.now(timezone.utc) + hour)
    )
    check(later.success == 0, f"endpoint stats since a later time count none ({later})")

    attempts = svix.message_attempt.list_by_endpoint(
        app.id, endpoint.id, MessageAttemptListByEndpointOptions(limit=5, with_content=True)
    )
    check(len(attempts.data) == 5 and not attempts.done, "attempts paginate (limit 5 of 10)")
    check(all(a.response_status_code == 200 for a in attempts.data), "attempts record status 200")
    check(all(a.response == "ok" for a in attempts.data), "attempts record the response body")
    # The SDK asks for no content by default (with_content=false): the bodies are left out.
    bare = svix.message_attempt.list_by_endpoint(
        app.id, endpoint.id, MessageAttemptListByEndpointOptions(limit=5)
    )
    check(
        len(bare.data) == 5 and all(a.response == "" for a in bare.data),
        "attempts listed without content leave the response body out (the SDK's default)",
    )
    # Filters by the message, and the message itself (without its payload) on request.
    with_msg = svix.message_attempt.list_by_endpoint(
        app.id,
        endpoint.id,
        MessageAttemptListByEndpointOptions(channel="billing", with_msg=True),
    )
    check(
        len(with_msg.data) == 10
        and all(a.msg is not None and a.msg.id == a.msg_id for a in with_msg.data)
        and all(a.msg.event_type == f"invoice.paid.{suffix}" for a in with_msg.data),
        "attempts filtered by channel carry their messages with with_msg",
    )
    elsewhere = svix.message_attempt.list_by_endpoint(
        app.id, endpoint.id, MessageAttemptListByEndpointOptions(channel="elsewhere")
    )
    check(len(elsewhere.data) == 0 and elsewhere.done, "attempts of another channel: none")
    by_msg = svix.message_attempt.list_by_msg(app.id, sent[0])
    check(len(by_msg.data) == 1 and by_msg.data[0].endpoint_id == endpoint.id, "attempts by message")

    # messageAttempt.get: one attempt, as the lists show it.
    one = svix.message_attempt.get(app.id, sent[0], by_msg.data[0].id)
    check(
        one.id == by_msg.data[0].id and one.msg_id == sent[0] and one.status == MessageStatus.SUCCESS,
        "message attempt get returns the attempt",
    )
    try:
        svix.message_attempt.get(app.id, sent[1], one.id)
        check(False, "another message's attempt raises")
    except HttpError as e:
        check(e.status_code == 404, f"another message's attempt is 404 ({e})")

    # messageAttempt.listAttemptedMessages: the endpoint's messages with their delivery status.
    attempted = svix.message_attempt.list_attempted_messages(
        app.id, endpoint.id, MessageAttemptListAttemptedMessagesOptions(limit=20)
    )
    attempted_ids = [m.id for m in attempted.data]
    # Ids made within one clock tick (about 4 ms) may sort either way: newest first is id order.
    check(
        sorted(attempted_ids, reverse=True) == attempted_ids
        and sorted(attempted_ids) == sorted(sent)
        and attempted.done,
        "attempted messages: the endpoint's 10 messages, newest first",
    )
    check(
        all(m.status == MessageStatus.SUCCESS and m.next_attempt is None for m in attempted.data),
        "attempted messages are delivered, with no next attempt",
    )
    check(all(m.payload == {} for m in attempted.data), "attempted messages omit payloads by default")
    with_content = svix.message_attempt.list_attempted_messages(
        app.id, endpoint.id, MessageAttemptListAttemptedMessagesOptions(limit=1, with_content=True)
    )
    newest = with_content.data[0] if with_content.data else None
    check(
        len(with_content.data) == 1
        and not with_content.done
        and newest.id == attempted_ids[0]
        and newest.payload == by_id[newest.id],
        "attempted messages page and carry payloads with with_content",
    )
    check(
        len(
            svix.message_attempt.list_attempted_messages(
                app.id, endpoint.id, MessageAttemptListAttemptedMessagesOptions(status=MessageStatus.FAIL)
            ).data
        )
        == 0,
        "attempted messages filter by status",
    )
    check(
        len(
            svix.message_attempt.list_attempted_messages(
                app.id, endpoint.id, MessageAttemptListAttemptedMessagesOptions(channel="billing")
            ).data
        )
        == 10,
        "attempted messages filter by channel",
    )

    # messageAttempt.listAttemptedDestinations: the message's endpoints with its status there.
    destinations = svix.message_attempt.list_attempted_destinations(
        app.id, sent[0], MessageAttemptListAttemptedDestinationsOptions(limit=10)
    )
    check(
        [d.id for d in destinations.data] == [endpoint.id] and destinations.done,
        "attempted destinations: the one endpoint",
    )
    destination = destinations.data[0]
    check(
        destination.url == receiver.url
        and destination.status == MessageStatus.SUCCESS
        and destination.next_attempt is None,
        "attempted destination carries the endpoint and the delivery status",
    )
    check(
        svix.message_attempt.list_attempted_destinations(app.id, skipped.id).data == [],
        "a message no endpoint wanted has no destinations",
    )

    receiver.previous_secret = receiver.secret
    svix.endpoint.rotate_secret(app.id, endpoint.id, EndpointSecretRotateIn())
    receiver.secret = svix.endpoint.get_secret(app.id, endpoint.id).key
    check(receiver.secret != receiver.previous_secret, "secret rotated")
    svix.message_attempt.resend(app.id, sent[0], endpoint.id)
    got = receiver.wait_for(len(sent) + 1)
    check(len(got) == 11 and got[-1]["id"] == sent[0], "resend delivers again, signed by both secrets")
    check(not receiver.failures, f"rotated deliveries verify ({receiver.failures})")

    recovered = svix.endpoint.recover(
        app.id,
        endpoint.id,
        RecoverIn(since=datetime.now(timezone.utc) - timedelta(hours=1)),
    )
    check(recovered.task == "endpoint.recover", "recover returns a background task")

    example = svix.endpoint.send_example(
        app.id, endpoint.id, EventExampleIn(event_type=f"invoice.paid.{suffix}")
    )
    got = receiver.wait_for(len(sent) + 2)
    check(
        got[-1]["id"] == example.id and got[-1]["payload"] == {"invoice": 99, "example": True},
        "send_example delivers the event type's schema example",
    )

    portal = svix.authentication.app_portal_access(app.id, AppPortalAccessIn())
    customer = Svix(portal.token, SvixOptions(server_url=url))
    check(len(customer.endpoint.list(app.id).data) == 1, "the portal token reads the app")
    customer.authentication.logout()
    try:
        customer.endpoint.list(app.id)
        check(False, "a logged-out token is refused")
    except HttpError as e:
        check(e.status_code == 401, f"a logged-out token is 401 ({e})")

    try:
        svix.application.get("no-such-app")
        check(False, "unknown app raises")
    except HttpError as e:
        check(e.status_code == 404 and e.code == "not_found", f"unknown app is 404 not_found ({e})")

    svix.endpoint.delete(app.id, endpoint.id)
    svix.application.delete(app.id)
    print("svix SDK interop: all checks passed")


if __name__ == "__main__":
    main()
