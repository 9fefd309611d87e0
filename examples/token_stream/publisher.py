"""Streams a long generated answer token by token into one Herald channel.

One publisher, every consumer: the browser page reads it over Server-Sent Events
(page.html), a pusher-js client over WebSocket (ws_client.js). The channel keeps history
(`history-*`), so a reader that drops out and comes back resumes mid-answer without losing
or repeating a token.

Usage: python3 publisher.py [--url http://127.0.0.1:6001] [--app-id 1] [--key demo-key]
                            [--secret demo-secret] [--channel history-answer] [--rate 25]
Standard library only. Pairs with `herald serve --dev` out of the box.
"""

import argparse
import hashlib
import hmac
import json
import random
import time
import urllib.request

WORDS = (
    "Herald takes each event once and delivers it every way the world consumes events: "
    "signed webhooks that retry until they land, WebSockets that speak the Pusher protocol, "
    "and Server-Sent Events for streams that flow one way, like this answer. Because the "
    "channel keeps its history with gap-free offsets, a reader that loses its connection "
    "picks up exactly where it left off."
).split(" ")


def answer(length):
    """A long, plausible-looking answer, one token at a time (words and their spaces)."""
    rng = random.Random(42)
    for i in range(length):
        yield ("" if i == 0 else " ") + WORDS[i % len(WORDS)] if i < len(WORDS) else " " + rng.choice(WORDS)


def publish(args, name, data):
    path = f"/apps/{args.app_id}/events"
    body = json.dumps({"name": name, "channel": args.channel, "data": json.dumps(data)}).encode()
    params = {
        "auth_key": args.key,
        "auth_timestamp": str(int(time.time())),
        "auth_version": "1.0",
        "body_md5": hashlib.md5(body).hexdigest(),
    }
    query = "&".join(f"{k}={params[k]}" for k in sorted(params))
    signature = hmac.new(args.secret.encode(), f"POST\n{path}\n{query}".encode(), hashlib.sha256)
    request = urllib.request.Request(
        f"{args.url}{path}?{query}&auth_signature={signature.hexdigest()}", data=body, method="POST"
    )
    request.add_header("content-type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:6001")
    parser.add_argument("--app-id", default="1")
    parser.add_argument("--key", default="demo-key")
    parser.add_argument("--secret", default="demo-secret")
    parser.add_argument("--channel", default="history-answer")
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--rate", type=float, default=25.0, help="tokens per second")
    args = parser.parse_args()
    publish(args, "answer-start", {"tokens": args.tokens})
    for n, token in enumerate(answer(args.tokens), start=1):
        publish(args, "token", {"n": n, "text": token})
        time.sleep(1 / args.rate)
    publish(args, "answer-done", {"tokens": args.tokens})
    print(f"published {args.tokens} tokens to {args.channel}")


if __name__ == "__main__":
    main()
