// Prints the same answer as it streams, over WebSocket with the official pusher-js client.
// Usage (after `npm ci` in interop/pusher): node examples/token_stream/ws_client.js
"use strict";
const path = require("node:path");
const Pusher = require(require.resolve("pusher-js", {
  paths: [path.join(__dirname, "..", "..", "interop", "pusher")],
}));

const pusher = new Pusher(process.env.HERALD_KEY || "demo-key", {
  cluster: "herald",
  wsHost: process.env.HERALD_HOST || "127.0.0.1",
  wsPort: Number(process.env.HERALD_PORT || 6001),
  forceTLS: false,
  enabledTransports: ["ws"],
});
const channel = pusher.subscribe(process.env.HERALD_CHANNEL || "history-answer");
channel.bind("answer-start", () => process.stdout.write("\n"));
channel.bind("token", (data) => process.stdout.write(data.text));
channel.bind("answer-done", (data) => {
  process.stdout.write(`\n[done: ${data.tokens} tokens]\n`);
  pusher.disconnect();
});
