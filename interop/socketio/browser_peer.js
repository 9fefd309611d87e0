// The Node side of interop/socketio_browser.py: a socket.io-client that chats with the page in
// headless Chromium. Prints one JSON object per line: {"ready": true} once connected,
// {"received": data, "meta": meta} per 'chat message', {"error": "..."} on failure. When it
// receives a message from `chromium`, it answers with a text message and a binary one
// (bytes 00 01 02 7f 80 ff).
// Usage: PEER_URL=http://127.0.0.1:6001 PEER_NAMESPACE=demo [PEER_TOKEN=jwt] node browser_peer.js
"use strict";
const { io } = require("socket.io-client");

const say = (value) => console.log(JSON.stringify(value));
const plain = (value) =>
  JSON.parse(JSON.stringify(value === undefined ? null : value, (k, v) =>
    v && v.type === "Buffer" && Array.isArray(v.data) ? { binaryHex: Buffer.from(v.data).toString("hex") } : v));

const { PEER_URL, PEER_NAMESPACE, PEER_TOKEN } = process.env;
if (!PEER_URL || !PEER_NAMESPACE) {
  say({ error: "set PEER_URL and PEER_NAMESPACE" });
  process.exit(2);
}
const lifetime = Number(process.env.PEER_LIFETIME_MS || 120000);
setTimeout(() => {
  say({ error: `browser peer still running after ${lifetime / 1000} s` });
  process.exit(1);
}, lifetime).unref();

const socket = io(`${PEER_URL}/${PEER_NAMESPACE}`, {
  auth: PEER_TOKEN ? { token: PEER_TOKEN } : {},
  transports: ["websocket"],
  timeout: 5000,
});
let answered = false;
socket.on("connect", () => say({ ready: true, id: socket.id }));
socket.on("connect_error", (e) => {
  say({ error: `connect_error: ${e.message}` });
  process.exit(1);
});
socket.on("herald:error", (e) => say({ error: `herald:error: ${JSON.stringify(e)}` }));
socket.on("chat message", (data, meta) => {
  say({ received: plain(data), meta: plain(meta) });
  if (!answered && data && data.from === "chromium") {
    answered = true;
    socket.emit("chat message", { from: "node", text: "hello chromium, from socket.io-client" });
    socket.emit("chat message", Buffer.from([0x00, 0x01, 0x02, 0x7f, 0x80, 0xff]));
  }
});
// Closes cleanly when the test closes our stdin.
process.stdin.on("end", () => {
  socket.disconnect();
  process.exit(0);
});
process.stdin.resume();
