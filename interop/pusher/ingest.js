// Webhooks in, signed by the providers' own libraries: npm `stripe`
// (webhooks.generateTestHeaderString) and `@octokit/webhooks-methods` (sign). Valid
// signatures are accepted, altered ones refused. Then the seeds' story end to end: a
// Stripe-signed payment_intent.succeeded reaches a pusher-js client on the order's private
// channel and a backend endpoint (verified with `standardwebhooks`), each exactly once
// although Stripe retries.
// Usage: HERALD_URL=http://127.0.0.1:6001 HERALD_TOKEN=... node ingest.js
"use strict";
const assert = require("node:assert/strict");
const Stripe = require("stripe");
const { Webhook } = require("standardwebhooks");
const { base, api, serverSdk, next, startReceiver, arrival, connect, subscribed, run } = require("./common");

let passed = 0;
const ok = (what) => {
  passed += 1;
  console.log(`ok: ${what}`);
};

async function ingest(source, headers, body) {
  const response = await fetch(`${base}${source.ingestPath}`, {
    method: "POST",
    headers: { "content-type": "application/json", ...headers },
    body,
  });
  return { status: response.status, body: await response.json() };
}

async function main() {
  const { sign: octokitSign } = await import("@octokit/webhooks-methods");
  const stripe = new Stripe("sk_test_herald_interop");
  const app = (await api("POST", "/api/v1/app", { name: "shop", uid: `shop-${Date.now()}` })).body;
  const creds = app.pusher;

  // The shop's backend: an endpoint for paid orders, verified with standardwebhooks.
  const backend = await startReceiver("/webhooks");
  const endpoint = (
    await api("POST", `/api/v1/app/${app.id}/endpoint`, {
      url: backend.url,
      eventTypes: ["payment_intent.succeeded"],
    })
  ).body;
  const endpointSecret = (await api("GET", `/api/v1/app/${app.id}/endpoint/${endpoint.id}/secret`)).body.key;

  const stripeSecret = "whsec_interop_stripe_secret";
  const source = await api("POST", `/api/v1/app/${app.id}/ingest/source`, {
    kind: "stripe",
    secrets: [stripeSecret],
    channels: ["private-order-{data.object.metadata.order_id}"],
  });
  assert.equal(source.status, 201, JSON.stringify(source.body));
  const stripeSource = source.body;

  // The order page, open in a browser.
  const server = serverSdk(creds);
  const page = await connect(creds, server, "customer");
  const order = await subscribed(page, "private-order-42");
  const seen = [];
  order.bind("payment_intent.succeeded", (data) => seen.push(data));
  const paid = next(order, "payment_intent.succeeded", "the payment on the order page");

  const payload = JSON.stringify({
    id: "evt_interop_1",
    object: "event",
    type: "payment_intent.succeeded",
    data: { object: { id: "pi_1", amount: 4200, metadata: { order_id: "42" } } },
  });
  const header = () => stripe.webhooks.generateTestHeaderString({ payload, secret: stripeSecret });
  const first = await ingest(stripeSource, { "stripe-signature": header() }, payload);
  assert.equal(first.status, 200, JSON.stringify(first.body));
  assert.equal(first.body.duplicate, false);
  ok("a payload signed with stripe.webhooks.generateTestHeaderString is accepted");
  for (let retry = 0; retry < 2; retry++) {
    const again = await ingest(stripeSource, { "stripe-signature": header() }, payload);
    assert.equal(again.status, 200);
    assert.equal(again.body.duplicate, true);
    assert.equal(again.body.msgId, first.body.msgId);
  }
  ok("Stripe's retries of the same event are acknowledged (200) and not published again");
  const altered = await ingest(stripeSource, { "stripe-signature": header() }, payload.replace("4200", "1"));
  assert.equal(altered.status, 401);
  const wrongKey = stripe.webhooks.generateTestHeaderString({ payload, secret: "whsec_other" });
  assert.equal((await ingest(stripeSource, { "stripe-signature": wrongKey }, payload)).status, 401);
  ok(`an altered Stripe payload and another secret are refused with 401 (${altered.body.detail})`);

  // Exactly once on the page: a marker sent afterwards arrives right after the payment.
  assert.equal((await paid).data.object.amount, 4200);
  const marker = next(order, "marker", "the marker");
  await server.trigger("private-order-42", "marker", {});
  await marker;
  assert.equal(seen.length, 1);
  ok("pusher-js on private-order-42 received payment_intent.succeeded exactly once");

  // Exactly once at the backend, verified by the reference library.
  const delivered = await arrival(backend, () => backend.received[0], "the backend delivery");
  const verified = new Webhook(endpointSecret).verify(delivered.rawBody, delivered.headers);
  assert.equal(verified.data.object.metadata.order_id, "42");
  assert.equal(delivered.rawBody, payload, "the bytes Stripe sent");
  const settleBy = Date.now() + 20_000;
  for (;;) {
    const stats = (await api("GET", `/api/v1/app/${app.id}/endpoint/${endpoint.id}/stats`)).body;
    if (stats.pending === 0 && stats.sending === 0) break;
    if (Date.now() > settleBy) throw new Error(`the endpoint's deliveries did not settle within 20 s: ${JSON.stringify(stats)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  assert.equal(backend.received.length, 1);
  ok("the backend got one delivery, verified with standardwebhooks' Webhook.verify");

  // GitHub, signed with @octokit/webhooks-methods.
  const ghSecret = "octokit-interop-secret";
  const github = (
    await api("POST", `/api/v1/app/${app.id}/ingest/source`, { kind: "github", secrets: [ghSecret], trustUnsignedHeaders: true })
  ).body;
  const ghBody = JSON.stringify({ action: "opened", issue: { number: 1 } });
  const ghHeaders = {
    "x-hub-signature-256": await octokitSign(ghSecret, ghBody),
    "x-github-event": "issues",
    "x-github-delivery": "a8d3b2c0-interop",
  };
  const gh = await ingest(github, ghHeaders, ghBody);
  assert.equal(gh.status, 200, JSON.stringify(gh.body));
  assert.equal(gh.body.eventType, "issues.opened");
  assert.equal((await ingest(github, ghHeaders, ghBody.replace("opened", "closed"))).status, 401);
  const otherSig = await octokitSign("another-secret", ghBody);
  assert.equal((await ingest(github, { ...ghHeaders, "x-hub-signature-256": otherSig }, ghBody)).status, 401);
  ok("a GitHub delivery signed with @octokit/webhooks-methods sign() is accepted; altered ones refused");

  page.disconnect();
  backend.server.close();
  console.log(`ingest interop (node): all ${passed} checks passed`);
}

run("ingest interop", main);
