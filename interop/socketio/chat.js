// Drives Herald's Socket.IO endpoint with the official client (socket.io-client, Node build),
// next to pusher-js and the pusher server SDK in the same rooms.
// Usage: HERALD_URL=http://127.0.0.1:6001 HERALD_TOKEN=... node chat.js
// Prints one `ok: <check>` line per passed check; exits non-zero, naming the check, on any
// mismatch.
"use strict";
const assert = require("node:assert/strict");
const crypto = require("node:crypto");
const PusherClient = require("pusher-js");
const PusherServer = require("pusher");
const { nodes, tag, PATIENCE, createApp, tokenFor, pusherChannelAuth, open, connect, ok, run } = require("./common");

const N = 10; // messages per client in the chat check (under the burst of 20 per socket)
const NAMESPACE_CHANNEL = "socket.io"; // the default `namespaceChannel`

const RULES = {
  events: [
    { event: "chat message", relay: "everyone" },
    { event: "file", relay: "rooms" },
    { event: "note", relay: "rooms" },
    { event: "typing", relay: "rooms" },
  ],
};
const HISTORY = [{ pattern: "history-*", maxEvents: 1000, maxAgeSecs: 3600 }];

/** Asserts the trailing meta argument names `channel`. */
function assertMeta(meta, channel, what) {
  assert.ok(meta && typeof meta === "object", `${what}: a meta object is the last argument`);
  assert.equal(meta.channel, channel, `${what}: meta.channel`);
}

/** 'chat message' events of this check (data objects carrying `check`). */
const ofCheck = (check) => ({ data }) => data && typeof data === "object" && data.check === check;

async function chatExample(app) {
  const ns = app.uid;
  const lobby = `lobby-${tag}`;
  const names = ["alice", "bob", "carol"];
  const clients = [];
  for (const name of names) {
    clients.push(await connect(name, ns, { auth: { token: tokenFor(app, name, [lobby]) } }, [lobby]));
  }
  for (const [i, client] of clients.entries()) {
    for (let n = 1; n <= N; n++) client.socket.emit("chat message", { check: "chat", from: names[i], n });
  }
  for (const client of clients) {
    const got = await client.received("chat message", 3 * N, ofCheck("chat"), `all ${3 * N} chat messages`);
    for (const { meta } of got) assertMeta(meta, NAMESPACE_CHANNEL, `${client.name}'s chat message`);
    for (const from of names) {
      const sequence = got.filter(({ data }) => data.from === from).map(({ data }) => data.n);
      assert.deepEqual(sequence, Array.from({ length: N }, (_, i) => i + 1), `${from}'s messages at ${client.name}, in order, once`);
    }
  }
  for (const client of clients) client.close();
  ok(`chat example: three clients on /${ns} with JWT auth each emit ${N} 'chat message'; relay "everyone" delivers all ${3 * N} to every client (sender included), each sender's in order, meta.channel "${NAMESPACE_CHANNEL}"`);
}

async function acknowledgements(app) {
  const ns = app.uid;
  const alice = await connect("alice (acks)", ns, { auth: { token: tokenFor(app, "alice") } });
  assert.deepEqual(await alice.ack("chat message", { check: "ack", n: 1 }), { ok: true }, "ack of a relayed event");
  const unknown = await alice.ack("no such event", { check: "ack" });
  assert.equal(unknown && unknown.ok, false, `an event without a rule is refused: ${JSON.stringify(unknown)}`);
  assert.equal(unknown.error && unknown.error.code, "unknown_event", `error code: ${JSON.stringify(unknown)}`);
  assert.equal(typeof unknown.error.message, "string", "the refusal has a message");
  assert.deepEqual(await alice.socket.timeout(PATIENCE).emitWithAck("chat message", { check: "ack", n: 2 }), { ok: true }, "emitWithAck");
  const extra = await alice.ack("chat message", { check: "ack", n: 3 }, "a second argument");
  assert.equal(extra && extra.error && extra.error.code, "too_many_arguments", `two arguments: ${JSON.stringify(extra)}`);
  // Without an acknowledgement a refusal comes back as herald:error.
  alice.socket.emit("no such event", { check: "ack" });
  const error = await alice.waitFor("herald:error for the unknown event", (log) => {
    const entry = log.find((e) => e.event === "herald:error");
    return entry && entry.args[0];
  });
  assert.equal(error.event, "no such event", `herald:error names the event: ${JSON.stringify(error)}`);
  assert.equal(error.code, "unknown_event", `herald:error code: ${JSON.stringify(error)}`);
  // The two accepted ones were relayed (sender included), the refused ones were not.
  const relayed = await alice.received("chat message", 2, ofCheck("ack"), "the two acknowledged chat messages");
  assert.deepEqual(relayed.map(({ data }) => data.n), [1, 2]);
  alice.close();
  ok("acknowledgements: emit(…, cb) gets {ok:true}; no rule gets {ok:false, error:{code:\"unknown_event\"}}; emitWithAck works; two arguments get too_many_arguments; without an ack a refusal arrives as herald:error");
}

async function binary(app) {
  const ns = app.uid;
  const room = `files-${tag}`;
  // The sender joins through its token, the receiver with a `join` event (a public room).
  const sender = await connect("sender", ns, { auth: { token: tokenFor(app, "sender", [room]) } }, [room]);
  const receiver = await connect("receiver", ns, {});
  receiver.socket.emit("join", room);
  await receiver.subscribed(room);

  const bytes = Buffer.concat([Buffer.from(Array.from({ length: 256 }, (_, i) => i)), crypto.randomBytes(64 * 1024)]);
  assert.deepEqual(await sender.ack("file", bytes), { ok: true }, "ack of the binary event");
  const [got] = await receiver.received("file", 1, () => true, "the binary file");
  assert.ok(Buffer.isBuffer(got.data), `arrives as a Buffer, not ${typeof got.data}: ${JSON.stringify(got.data).slice(0, 80)}`);
  assert.ok(got.data.equals(bytes), `identical bytes (${got.data.length} received, ${bytes.length} sent)`);
  assertMeta(got.meta, room, "the binary event");

  // Binary inside an object, back the other way: the sender gets it and never got its own.
  const nested = { name: "notes.bin", parts: [Buffer.from("hello"), Buffer.from([0, 255, 0x1e, 0x0a])] };
  assert.deepEqual(await receiver.ack("file", nested), { ok: true });
  const [back] = await sender.received("file", 1, () => true, "the nested binary reply");
  assert.deepEqual(back.data, nested, "nested Buffers arrive in place");
  assert.equal(sender.events("file").length, 1, "relay \"rooms\" excludes the sender");
  assert.equal(receiver.events("file").length, 1, "relay \"rooms\" excludes the sender");
  sender.close();
  receiver.close();
  ok(`binary: a ${bytes.length}-byte Buffer (relay "rooms") arrives as a Buffer with identical bytes; Buffers nested in an object too; the sender is excluded`);
}

async function pollingOnly(app) {
  const ns = app.uid;
  const room = `polling-${tag}`;
  const auth = (who) => ({ token: tokenFor(app, who, [room]) });
  const poller = await connect("poller", ns, { auth: auth("poller"), transports: ["polling"] }, [room]);
  const ws = await connect("ws", ns, { auth: auth("ws"), transports: ["websocket"] }, [room]);
  assert.equal(ws.socket.io.engine.transport.name, "websocket");

  // Bursts are batched into one long-polling request or response; order must hold.
  for (let n = 1; n <= 5; n++) poller.socket.emit("chat message", { check: "polling", from: "poller", n });
  const big = "x".repeat(100 * 1024);
  poller.socket.emit("chat message", { check: "polling", from: "poller", n: 6, big });
  for (let n = 1; n <= 5; n++) ws.socket.emit("chat message", { check: "polling", from: "ws", n });
  const order = (client, from, count) =>
    client
      .received("chat message", count, (e) => ofCheck("polling")(e) && e.data.from === from, `${count} messages from ${from}`)
      .then((got) => got.map(({ data }) => data.n));
  assert.deepEqual(await order(ws, "poller", 6), [1, 2, 3, 4, 5, 6], "poller → ws, in order");
  assert.equal(ws.events("chat message", (e) => ofCheck("polling")(e) && e.data.n === 6)[0].data.big, big, "a 100 KB message over polling");
  assert.deepEqual(await order(poller, "ws", 5), [1, 2, 3, 4, 5], "ws → poller, in order");

  // Binary both ways: base64 packets on the polling side, binary frames on the WebSocket side.
  const up = crypto.randomBytes(2048);
  const down = crypto.randomBytes(2048);
  poller.socket.emit("file", up);
  ws.socket.emit("file", down);
  const [atWs] = await ws.received("file", 1, () => true, "binary from the poller");
  const [atPoller] = await poller.received("file", 1, () => true, "binary from the ws client");
  assert.ok(Buffer.isBuffer(atWs.data) && atWs.data.equals(up), "poller → ws bytes identical");
  assert.ok(Buffer.isBuffer(atPoller.data) && atPoller.data.equals(down), "ws → poller bytes identical");
  assert.equal(poller.socket.io.engine.transport.name, "polling", "the poller stayed on long-polling");
  poller.close();
  ws.close();
  ok("long-polling only (transports: ['polling']) exchanges messages (batched bursts in order, 100 KB text, binary) with a WebSocket-only client");
}

async function upgrade(app) {
  const ns = app.uid;
  const peer = await connect("peer (ws)", ns, { transports: ["websocket"] });
  const client = open("upgrader", ns, { transports: ["polling", "websocket"] });
  const engine = client.socket.io.engine;
  const first = engine.transport.name;
  const upgraded = new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no engine 'upgrade' within ${PATIENCE / 1000} s (transport: ${engine.transport.name})`)), PATIENCE);
    engine.once("upgrade", (transport) => {
      clearTimeout(timer);
      resolve(transport.name);
    });
    engine.once("upgradeError", (e) => {
      clearTimeout(timer);
      reject(new Error(`upgradeError: ${e.message}`));
    });
  });
  await client.connected();
  assert.equal(first, "polling", "the default client opens with long-polling");
  assert.equal(await upgraded, "websocket", "the engine's upgrade event names websocket");
  assert.equal(client.socket.io.engine.transport.name, "websocket", "socket.io.engine.transport.name after the upgrade");
  client.socket.emit("chat message", { check: "upgrade", from: "upgrader" });
  peer.socket.emit("chat message", { check: "upgrade", from: "peer" });
  for (const side of [client, peer]) {
    const got = await side.received("chat message", 2, ofCheck("upgrade"), "both messages after the upgrade");
    assert.deepEqual(got.map(({ data }) => data.from).sort(), ["peer", "upgrader"]);
  }
  client.close();
  peer.close();
  ok("the default client (polling, then WebSocket) upgrades: the engine's 'upgrade' event, transport 'websocket', messages still flow both ways");
}

async function reconnect(app) {
  const ns = app.uid;
  const peer = await connect("peer", ns, { transports: ["websocket"] });
  const client = await connect("reconnecter", ns, { auth: { token: tokenFor(app, "reconnecter") } });
  const exchange = async (round) => {
    client.socket.emit("chat message", { check: "reconnect", round, from: "client" });
    peer.socket.emit("chat message", { check: "reconnect", round, from: "peer" });
    for (const side of [client, peer]) {
      const got = await side.received(
        "chat message", 2, (e) => ofCheck("reconnect")(e) && e.data.round === round, `both messages of round ${round}`);
      assert.deepEqual(got.map(({ data }) => data.from).sort(), ["client", "peer"], `round ${round} at ${side.name}`);
    }
  };
  await exchange(1);
  // By hand: disconnect(), then connect() on the same socket.
  let since = client.log.length;
  client.socket.disconnect();
  client.socket.connect();
  await client.connected(since);
  await exchange(2);
  // Forced: the transport dies and the Manager reconnects by itself.
  since = client.log.length;
  client.socket.io.engine.close();
  await client.connected(since);
  const reasons = client.log.slice(since).filter((e) => e.event === "$disconnect").map((e) => e.args[0]);
  assert.equal(reasons.length, 1, `one disconnect, then the automatic reconnection: ${JSON.stringify(reasons)}`);
  await exchange(3);
  client.close();
  peer.close();

  // A history room: what was published while away is replayed from auth.positions.
  const room = `history-${tag}`;
  const auth = (who) => ({ token: tokenFor(app, who, [room]) });
  const writer = await connect("writer", ns, { auth: auth("writer") }, [room]);
  const reader = await connect("reader", ns, { auth: auth("reader") }, [room]);
  const publish = async (n) => assert.deepEqual(await writer.ack("note", { n }), { ok: true }, `note ${n} acknowledged`);
  for (const n of [1, 2, 3]) await publish(n);
  const before = await reader.received("note", 3, () => true, "notes 1-3");
  assert.deepEqual(before.map(({ data }) => data.n), [1, 2, 3]);
  const { meta } = before[2];
  assertMeta(meta, room, "a history room's event");
  assert.equal(typeof meta.epoch, "string", `meta.epoch on a history room: ${JSON.stringify(meta)}`);
  assert.equal(typeof meta.offset, "number", `meta.offset on a history room: ${JSON.stringify(meta)}`);
  assert.deepEqual(before.map((e) => e.meta.offset), [meta.offset - 2, meta.offset - 1, meta.offset], "consecutive offsets");

  reader.socket.disconnect();
  for (const n of [4, 5, 6]) await publish(n);
  since = reader.log.length;
  reader.socket.auth = { ...auth("reader"), positions: { [room]: { epoch: meta.epoch, offset: meta.offset } } };
  reader.socket.connect();
  await reader.connected(since);
  const resubscribed = await reader.subscribed(room, since);
  assert.notEqual(resubscribed.recovered, false, `recovery from the given position: ${JSON.stringify(resubscribed)}`);
  await publish(7); // live, after the replay
  const after = await reader.waitFor("notes 4-7 after the reconnection", () => {
    const notes = reader.events("note").slice(3);
    return notes.some(({ data }) => data.n === 7) && notes;
  });
  assert.deepEqual(after.map(({ data }) => data.n), [4, 5, 6, 7], "replayed in order, exactly once, then live");
  assert.deepEqual(after.map((e) => e.meta.offset), [1, 2, 3, 4].map((i) => meta.offset + i), "offsets continue");
  for (const e of after) assert.equal(e.meta.epoch, meta.epoch, "same epoch");
  writer.close();
  reader.close();
  ok("reconnection: after disconnect()/connect() and after a forced transport close (auto-reconnect) messages flow again; auth.positions from the last meta replays notes 4-6 on a history room in order, exactly once, before live note 7");
}

async function badInput(app) {
  const ns = app.uid;
  const a = await connect("bystander a", ns, { transports: ["websocket"] });
  const b = await connect("bystander b", ns, {});
  const refusal = async (name, namespace, auth) => {
    const client = open(name, namespace, { auth });
    try {
      return await client.refused();
    } finally {
      client.close();
    }
  };
  const expired = await refusal("expired", ns, { token: tokenFor(app, "late", [], { ttl: -60 }) });
  assert.match(expired.message, /expired/i, `expired token: "${expired.message}"`);
  const forged = await refusal("forged", ns, { token: tokenFor(app, "mallory", [], { secret: "not-the-app-secret" }) });
  assert.match(forged.message, /signature/i, `wrong signature: "${forged.message}"`);
  const malformed = await refusal("malformed", ns, { token: "not-a-jwt" });
  assert.ok(malformed.message, "a malformed token is refused with a message");
  const unknown = await refusal("lost", `no-such-app-${tag}`, {});
  assert.match(unknown.message, /unknown app/i, `unknown namespace: "${unknown.message}"`);

  a.socket.emit("chat message", { check: "bad", from: "a" });
  b.socket.emit("chat message", { check: "bad", from: "b" });
  for (const side of [a, b]) {
    const got = await side.received("chat message", 2, ofCheck("bad"), "both messages after the refusals");
    assert.deepEqual(got.map(({ data }) => data.from).sort(), ["a", "b"]);
    assert.ok(side.socket.connected, `${side.name} still connected`);
  }
  a.close();
  b.close();
  ok(`bad input: expired token ("${expired.message}"), wrong signature ("${forged.message}"), malformed token and unknown namespace ("${unknown.message}") get connect_error; connected clients keep working`);
}

/** A pusher-js client (Node build) whose private-channel auth is computed locally. */
function pusherClient(creds, node) {
  const client = new PusherClient(creds.key, {
    cluster: "herald",
    wsHost: node.hostname,
    wsPort: Number(node.port),
    forceTLS: false,
    enabledTransports: ["ws"],
    disableStats: true,
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) =>
        callback(null, pusherChannelAuth(creds, socketId, channelName)),
    },
  });
  return client;
}

/** Resolves with the data of the next `event` bound on a pusher-js emitter. */
function pusherNext(emitter, event, what, ms = PATIENCE) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`pusher-js timed out waiting for ${what}`)), ms);
    const handler = (data) => {
      clearTimeout(timer);
      emitter.unbind(event, handler);
      resolve(data);
    };
    emitter.bind(event, handler);
  });
}

async function mixedRoom(app) {
  const ns = app.uid;
  const creds = app.pusher;
  const room = "private-mixed";
  const node = nodes[nodes.length - 1];
  const pusher = pusherClient(creds, node);
  try {
    await pusherNext(pusher.connection, "connected", "pusher-js to connect");
    const channel = pusher.subscribe(room);
    await pusherNext(channel, "pusher:subscription_succeeded", `the subscription to ${room}`);
    const sio = await connect("socket.io (mixed)", ns, { auth: { token: tokenFor(app, "sio-user", [room]) } }, [room]);

    // Socket.IO → pusher-js.
    const atPusher = pusherNext(channel, "typing", "the Socket.IO client's event");
    assert.deepEqual(await sio.ack("typing", { from: "socket.io", text: "hello pusher" }), { ok: true });
    assert.deepEqual(await atPusher, { from: "socket.io", text: "hello pusher" }, "pusher-js sees the event's data");

    // pusher-js client event → Socket.IO.
    assert.ok(channel.trigger("client-typing", { from: "pusher-js", text: "hello socket.io" }), "pusher-js sent the client event");
    const [clientEvent] = await sio.received("client-typing", 1, () => true, "pusher-js's client event");
    assert.deepEqual(clientEvent.data, { from: "pusher-js", text: "hello socket.io" });
    assertMeta(clientEvent.meta, room, "the client event");

    // Pusher HTTP API (the official server SDK) → Socket.IO.
    const server = new PusherServer({
      appId: creds.appId, key: creds.key, secret: creds.secret,
      host: nodes[0].hostname, port: nodes[0].port, useTLS: false,
    });
    await server.trigger(room, "order.paid", { id: 42, total: 1999 });
    const [triggered] = await sio.received("order.paid", 1, () => true, "the HTTP API trigger");
    assert.deepEqual(triggered.data, { id: 42, total: 1999 }, "JSON string data arrives parsed");
    assertMeta(triggered.meta, room, "the triggered event");
    sio.close();
  } finally {
    pusher.disconnect();
  }
  ok(`mixed room ${room}: a Socket.IO event (relay "rooms") reaches pusher-js; pusher-js's client-typing and a server SDK trigger reach the Socket.IO client`);
}

async function main() {
  const app = await createApp("socketio interop", RULES, HISTORY);
  await chatExample(app);
  await acknowledgements(app);
  await binary(app);
  await pollingOnly(app);
  await upgrade(app);
  await reconnect(app);
  await badInput(app);
  await mixedRoom(app);
}

run("socket.io interop", main);
