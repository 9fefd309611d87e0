// Socket.IO clients (the official socket.io-client) on different nodes of a Herald cluster.
// Usage: HERALD_URLS=http://127.0.0.1:6001,http://127.0.0.1:6002 HERALD_TOKEN=... node cluster.js
// (HERALD_URL, if set, should be the first node.) Prints one `ok: <check>` line per passed
// check; exits non-zero, naming the check, on any mismatch.
"use strict";
const assert = require("node:assert/strict");
const crypto = require("node:crypto");
const { nodes, tag, createApp, tokenFor, connect, ok, run } = require("./common");

const N = 10;

async function main() {
  if (nodes.length < 2) throw new Error(`HERALD_URLS must name two or more nodes (got ${nodes.length})`);
  const node = (i) => nodes[i % nodes.length];
  const app = await createApp(
    "socketio cluster",
    {
      events: [
        { event: "chat message", relay: "everyone" },
        { event: "typing", relay: "rooms" },
      ],
    },
    [{ pattern: "history-*", maxEvents: 1000, maxAgeSecs: 3600 }],
  );
  const ns = app.uid;

  // Two clients on different nodes in the same room (relay "rooms": the sender is excluded).
  const room = `room-${tag}`;
  const a = await connect(`a@${node(0).host}`, ns, { auth: { token: tokenFor(app, "a", [room]) }, node: node(0) }, [room]);
  const b = await connect(`b@${node(1).host}`, ns, { auth: { token: tokenFor(app, "b", [room]) }, node: node(1) }, [room]);
  const bytes = crypto.randomBytes(4096);
  assert.deepEqual(await a.ack("typing", { from: "a", text: "hi from node 1" }), { ok: true });
  assert.deepEqual(await b.ack("typing", { from: "b", text: "hi from node 2" }), { ok: true });
  assert.deepEqual(await a.ack("typing", bytes), { ok: true });
  const [atB] = await b.received("typing", 1, () => true, "a's message across nodes");
  assert.deepEqual(atB.data, { from: "a", text: "hi from node 1" });
  assert.equal(atB.meta.channel, room);
  const [atA] = await a.received("typing", 1, () => true, "b's message across nodes");
  assert.deepEqual(atA.data, { from: "b", text: "hi from node 2" });
  const [binary] = await b.received("typing", 2, () => true, "a's binary across nodes").then((got) => got.slice(1));
  assert.ok(Buffer.isBuffer(binary.data) && binary.data.equals(bytes), "binary crosses nodes intact");
  assert.equal(a.events("typing").length, 1, "a did not get its own");
  assert.equal(b.events("typing").length, 2, "b did not get its own");
  a.close();
  b.close();
  ok(`two Socket.IO clients on different nodes (${node(0).host}, ${node(1).host}) in room ${room} see each other's messages (text and binary), not their own`);

  // The chat example, one client per node in turn.
  const names = ["alice", "bob", "carol"];
  const clients = [];
  for (const [i, name] of names.entries()) {
    clients.push(await connect(`${name}@${node(i).host}`, ns, { auth: { token: tokenFor(app, name, [room]) }, node: node(i) }, [room]));
  }
  for (const [i, client] of clients.entries()) {
    for (let n = 1; n <= N; n++) client.socket.emit("chat message", { from: names[i], n });
  }
  for (const client of clients) {
    const got = await client.received("chat message", 3 * N, () => true, `all ${3 * N} chat messages`);
    for (const from of names) {
      const sequence = got.filter(({ data }) => data.from === from).map(({ data }) => data.n);
      assert.deepEqual(sequence, Array.from({ length: N }, (_, i) => i + 1), `${from}'s messages at ${client.name}, in order, once`);
    }
  }
  for (const client of clients) client.close();
  ok(`chat example across ${Math.min(3, nodes.length)} nodes: every client gets all ${3 * N} messages, each sender's in order`);

  // A history room: the reader leaves node 2 and comes back on node 1 with its position.
  const history = `history-${tag}`;
  const auth = (who) => ({ token: tokenFor(app, who, [history]) });
  const writer = await connect("writer", ns, { auth: auth("writer"), node: node(0) }, [history]);
  const reader = await connect("reader", ns, { auth: auth("reader"), node: node(1) }, [history]);
  const publish = async (n) => assert.deepEqual(await writer.ack("typing", { n }), { ok: true }, `event ${n} acknowledged`);
  for (const n of [1, 2]) await publish(n);
  const seen = await reader.received("typing", 2, () => true, "events 1-2");
  const { meta } = seen[1];
  assert.ok(meta.epoch && Number.isInteger(meta.offset), `meta carries the position: ${JSON.stringify(meta)}`);
  reader.close();
  for (const n of [3, 4, 5]) await publish(n);
  const again = await connect(
    "reader again",
    ns,
    { auth: { ...auth("reader"), positions: { [history]: { epoch: meta.epoch, offset: meta.offset } } }, node: node(0) },
    [history],
  );
  await publish(6);
  const after = await again.waitFor("events 3-6 on the other node", () => {
    const got = again.events("typing");
    return got.some(({ data }) => data.n === 6) && got;
  });
  assert.deepEqual(after.map(({ data }) => data.n), [3, 4, 5, 6], "replayed in order, exactly once, then live");
  assert.deepEqual(after.map((e) => e.meta.offset), [1, 2, 3, 4].map((i) => meta.offset + i));
  writer.close();
  again.close();
  ok("a reader that reconnects to another node with auth.positions gets what it missed in order, exactly once, then live events");
}

run("socket.io cluster interop", main);
