// Drives Herald with the official Pusher client (pusher-js, Node build) and server SDK
// (pusher). Usage: HERALD_URL=http://127.0.0.1:6001 HERALD_TOKEN=... node pusher_sdk.js
// Exits non-zero, naming the check, on any mismatch.
"use strict";
const assert = require("node:assert/strict");
const { api, serverSdk, next, startReceiver, arrival, connect, subscribed, run } = require("./common");

let passed = 0;
const ok = (what) => {
  passed += 1;
  console.log(`ok: ${what}`);
};

async function createApp() {
  const { status, body } = await api("POST", "/api/v1/app", {
    name: "pusher interop",
    uid: `pusher-${Date.now()}`,
  });
  assert.equal(status, 201, "app created");
  return body;
}

/** Resolves once a received webhook holds an event matching `wanted`. */
function webhookEvent(receiver, pusher, wanted, what) {
  const find = () => receiver.received.flatMap((r) => pusher.webhook(r).getEvents()).find(wanted);
  return arrival(receiver, find, `the ${what} webhook`);
}

async function main() {
  const app = await createApp();
  const creds = app.pusher;
  // Channel webhooks go to a Pusher-format endpoint, created before anyone connects.
  const hooks = await startReceiver("/pusher-hooks");
  const endpoint = await api("POST", `/api/v1/app/${app.id}/endpoint`, { url: hooks.url, format: "pusher" });
  assert.equal(endpoint.status, 201, "pusher webhook endpoint created");
  const server = serverSdk(creds);
  const alice = await connect(creds, server, "alice");
  const bob = await connect(creds, server, "bob");
  ok("pusher-js connects (connection_established with socket id and activity timeout)");

  // Public channel, server SDK trigger, socket_id exclusion.
  const aOrders = await subscribed(alice, "orders");
  const bOrders = await subscribed(bob, "orders");
  let got = next(aOrders, "order.paid", "a public event");
  await server.trigger("orders", "order.paid", { id: 1, total: 1999 });
  assert.deepEqual(await got, { id: 1, total: 1999 });
  ok("public channel: event triggered with the server SDK is received");
  const aliceSaw = [];
  aOrders.bind("order.shipped", (d) => aliceSaw.push(d));
  got = next(bOrders, "order.shipped", "the event alice was excluded from");
  await server.trigger("orders", "order.shipped", { id: 1 }, { socket_id: alice.connection.socket_id });
  await got;
  const marker = next(aOrders, "marker", "the marker event");
  await server.trigger("orders", "marker", {});
  await marker;
  assert.equal(aliceSaw.length, 0, "the excluded socket got nothing");
  ok("socket_id excludes the sender's own connection");

  // Private channel with the SDK's signature.
  const aPrivate = await subscribed(alice, "private-account-7");
  got = next(aPrivate, "balance", "a private event");
  await server.trigger("private-account-7", "balance", { cents: 42 });
  assert.deepEqual(await got, { cents: 42 });
  ok("private channel: authorized with authorizeChannel, receives events");

  // A forged signature is refused and the connection stays usable.
  const mallory = await connect(creds, server, "mallory", { forgeAuth: true });
  const refused = next(mallory.subscribe("private-account-7"), "pusher:subscription_error", "a refusal");
  const error = await refused;
  assert.equal(error.status, 401);
  await subscribed(mallory, "orders");
  ok("forged private-channel auth gets pusher:subscription_error 401; the connection lives on");

  // Presence: members, member_added, users and channel info over the HTTP API.
  const aRoom = await subscribed(alice, "presence-room");
  const added = next(aRoom, "pusher:member_added", "bob joining");
  const bRoom = await subscribed(bob, "presence-room");
  assert.equal((await added).id, "bob");
  assert.equal(bRoom.members.count, 2);
  assert.deepEqual(bRoom.members.get("alice").info, { name: "alice" });
  const users = await (await server.get({ path: "/channels/presence-room/users" })).json();
  assert.deepEqual(users.users.map((u) => u.id).sort(), ["alice", "bob"]);
  const info = await (
    await server.get({ path: "/channels/presence-room", params: { info: "user_count,subscription_count" } })
  ).json();
  assert.deepEqual(info, { occupied: true, user_count: 2, subscription_count: 2 });
  const list = await (
    await server.get({ path: "/channels", params: { filter_by_prefix: "presence-", info: "user_count" } })
  ).json();
  assert.deepEqual(list, { channels: { "presence-room": { user_count: 2 } } });
  ok("presence: member list, member_added, users and channel info queries");

  // Client events between two pusher-js clients, not echoed.
  const aChat = await subscribed(alice, "private-chat");
  const bChat = await subscribed(bob, "private-chat");
  const echoed = [];
  aChat.bind("client-typing", (d) => echoed.push(d));
  got = next(bChat, "client-typing", "a client event");
  assert.ok(aChat.trigger("client-typing", { text: "hi bob" }));
  assert.deepEqual(await got, { text: "hi bob" });
  const marker2 = next(aChat, "marker", "the marker event");
  await server.trigger("private-chat", "marker", {});
  await marker2;
  assert.equal(echoed.length, 0);
  ok("client events reach the other client and are not echoed");

  // Batch trigger.
  const one = next(aOrders, "batch-one", "the first batch event");
  const two = next(aPrivate, "batch-two", "the second batch event");
  await server.triggerBatch([
    { channel: "orders", name: "batch-one", data: { n: 1 } },
    { channel: "private-account-7", name: "batch-two", data: { n: 2 } },
  ]);
  assert.deepEqual([await one, await two], [{ n: 1 }, { n: 2 }]);
  ok("triggerBatch delivers every event");

  // Presence member_removed when bob leaves.
  const removed = next(aRoom, "pusher:member_removed", "bob leaving");
  bob.disconnect();
  assert.equal((await removed).id, "bob");
  ok("member_removed when the last connection of a user closes");

  // Sign-in and terminateUserConnections.
  const carol = await connect(creds, server, "carol");
  const signedIn = new Promise((resolve) =>
    carol.connection.bind("message", (m) => m.event === "pusher:signin_success" && resolve()),
  );
  // pusher-js subscribes to the user's own channel as soon as it is signed in.
  const ownChannel = new Promise((resolve) =>
    carol.connection.bind(
      "message",
      (m) =>
        m.event === "pusher_internal:subscription_succeeded" &&
        m.channel === "#server-to-user-carol" &&
        resolve(),
    ),
  );
  carol.signin();
  await signedIn;
  await ownChannel;
  const gift = new Promise((resolve) => carol.user.bind("gift", resolve));
  await server.sendToUser("carol", "gift", { n: 1 });
  assert.deepEqual(await gift, { n: 1 });
  ok("signin subscribes pusher-js to the user's channel, and sendToUser reaches it (user.bind)");
  const terminated = next(carol.connection, "error", "the termination close");
  await server.terminateUserConnections("carol");
  const closeError = await terminated;
  assert.equal(closeError.type, "PusherError");
  assert.equal(closeError.data.code, 4009);
  ok("signin, then terminateUserConnections closes the user's connection (4009)");

  // A history channel: Herald adds epoch and offset to each event; pusher-js ignores them.
  const aHistory = await subscribed(alice, "history-room");
  const notes = [];
  aHistory.bind("note", (d) => notes.push(d));
  const lastNote = next(aHistory, "last", "the last history event");
  for (const i of [1, 2, 3]) await server.trigger("history-room", "note", { i });
  await server.trigger("history-room", "last", {});
  await lastNote;
  assert.deepEqual(notes, [{ i: 1 }, { i: 2 }, { i: 3 }]);
  ok("pusher-js works unchanged on a history channel (the extra epoch and offset are ignored)");

  // Channel webhooks, checked with the server SDK's own verifier and the app secret.
  const byName = (name, channel, extra = () => true) => (e) =>
    e.name === name && e.channel === channel && extra(e);
  await webhookEvent(hooks, server, byName("channel_occupied", "orders"), "channel_occupied");
  await webhookEvent(hooks, server, byName("member_added", "presence-room", (e) => e.user_id === "bob"), "member_added");
  await webhookEvent(hooks, server, byName("member_removed", "presence-room", (e) => e.user_id === "bob"), "member_removed");
  const clientEvent = await webhookEvent(hooks, server, byName("client_event", "private-chat"), "client_event");
  assert.equal(clientEvent.event, "client-typing");
  assert.deepEqual(JSON.parse(clientEvent.data), { text: "hi bob" });
  assert.equal(clientEvent.socket_id, alice.connection.socket_id);
  for (const client of [alice, mallory, carol]) client.disconnect();
  await webhookEvent(hooks, server, byName("channel_vacated", "orders"), "channel_vacated");
  for (const request of hooks.received) {
    const webhook = server.webhook(request);
    assert.ok(webhook.isValid(), `webhook signature valid: ${request.rawBody}`);
    assert.ok(Math.abs(webhook.getTime().getTime() - Date.now()) < 60000, "time_ms is now");
    const tampered = server.webhook({ headers: request.headers, rawBody: request.rawBody.replace("channel", "channeL") });
    assert.ok(!tampered.isValid(), "a tampered body is refused");
  }
  hooks.server.close();
  ok(`channel webhooks (occupied, member_added/removed, client_event, vacated) verified by pusher.webhook().isValid() (${hooks.received.length} requests)`);

  // Subscribes beyond the rate (ws.subscribes_per_second, bursts of ws.subscribe_burst: 10 and
  // 100 by default) wait their turn. Refused, they would stay pending in pusher-js for the
  // connection's life: it sends no second subscribe for a pending channel.
  const busy = await createApp();
  const busyServer = serverSdk(busy.pusher);
  const dave = await connect(busy.pusher, busyServer, "dave");
  const burst = Array.from({ length: 100 }, (_, i) => `burst-${i}`);
  await Promise.all(burst.map((name) => subscribed(dave, name)));
  for (const name of burst) dave.unsubscribe(name);
  const refusals = [];
  const beyond = Array.from({ length: 20 }, (_, i) => `beyond-${i}`);
  const confirmed = beyond.map((name) => {
    const channel = dave.subscribe(name);
    channel.bind("pusher:subscription_error", (e) => refusals.push({ name, e }));
    return next(channel, "pusher:subscription_succeeded", `subscription to ${name}`);
  });
  await Promise.all(confirmed);
  assert.deepEqual(refusals, [], "no subscribe was refused");
  const last = dave.channel(beyond[beyond.length - 1]);
  got = next(last, "hello", "an event on the last channel to be confirmed");
  await busyServer.trigger(last.name, "hello", { n: 1 });
  assert.deepEqual(await got, { n: 1 });
  dave.disconnect();
  ok("20 subscribes beyond the burst wait their turn: pusher-js ends with every channel subscribed");

  console.log(`pusher interop: all ${passed} checks passed`);
}

run("pusher interop", main);
