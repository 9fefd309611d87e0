// pusher-js over wss:// and the pusher server SDK over https://, with a certificate reload
// (swapped on disk, then SIGHUP) while a pusher-js connection stays open.
//
// Run by tls.py, which starts Herald with TLS and passes:
//   HERALD_URL (https://...), HERALD_TOKEN, HERALD_PID,
//   TLS_CERT, TLS_KEY (the files Herald serves), NEXT_CERT, NEXT_KEY (the pair to swap in),
//   OLD_FINGERPRINT, NEW_FINGERPRINT (SHA-256, AB:CD:... as openssl prints them),
//   NODE_EXTRA_CA_CERTS (the test CA: Node's TLS, fetch and pusher-js trust it through it).
// Prints one `ok: ...` line per check; exits non-zero on any mismatch.
"use strict";
const fs = require("node:fs");
const path = require("node:path");
const tls = require("node:tls");
const { createRequire } = require("node:module");

// The clients pinned in pusher/package-lock.json (installed by `npm ci` there).
const requirePinned = createRequire(path.join(__dirname, "pusher", "package.json"));
const PusherClient = requirePinned("pusher-js");
const PusherServer = requirePinned("pusher");

const herald = new URL(process.env.HERALD_URL);
const token = process.env.HERALD_TOKEN;
const port = Number(herald.port);
// Named as a client would: the certificate covers localhost and 127.0.0.1.
const host = "localhost";

function ok(what) {
  console.log(`ok: ${what}`);
}

function check(condition, what) {
  if (!condition) throw new Error(what);
}

async function api(method, urlPath, body) {
  const response = await fetch(`${herald.origin}${urlPath}`, {
    method,
    headers: { authorization: `Bearer ${token}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  check(response.ok, `${method} ${urlPath}: ${response.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

/** Resolves with the next `event` on `emitter`, or fails after `ms`. */
function next(emitter, event, what, ms = 10000) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms);
    const handler = (data) => {
      clearTimeout(timer);
      emitter.unbind(event, handler);
      resolve(data);
    };
    emitter.bind(event, handler);
  });
}

/** The SHA-256 fingerprint of the certificate a new TLS handshake gets. */
function servedFingerprint() {
  return new Promise((resolve, reject) => {
    const socket = tls.connect({ host: "127.0.0.1", port, servername: host }, () => {
      const fingerprint = socket.getPeerCertificate().fingerprint256;
      socket.end();
      resolve(fingerprint);
    });
    socket.on("error", reject);
  });
}

/** Resolves once `found()` resolves truthy, checked every 50 ms, or fails after `ms`. */
async function until(found, what, ms = 10000) {
  const deadline = Date.now() + ms;
  for (;;) {
    if (await found()) return;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** Replaces `target` with `source`'s bytes by a rename, as certificate tools do. */
function install(source, target) {
  fs.copyFileSync(source, `${target}.new`);
  fs.renameSync(`${target}.new`, target);
}

function client(creds, sdk) {
  const pusher = new PusherClient(creds.key, {
    cluster: "herald",
    wsHost: host,
    wssPort: port,
    forceTLS: true,
    enabledTransports: ["ws"],
    disableStats: true,
    channelAuthorization: {
      customHandler: ({ socketId, channelName }, callback) =>
        callback(null, sdk.authorizeChannel(socketId, channelName)),
    },
  });
  return pusher;
}

async function main() {
  check(herald.protocol === "https:", `HERALD_URL is not https: ${herald}`);
  const app = await api("POST", "/api/v1/app", { name: "tls interop", uid: `tls-${Date.now()}` });
  const creds = app.pusher;
  const sdk = new PusherServer({
    appId: creds.appId,
    key: creds.key,
    secret: creds.secret,
    host,
    port: String(port),
    useTLS: true,
  });

  const first = client(creds, sdk);
  await next(first.connection, "connected", "pusher-js to connect over wss://");
  check(first.connection.socket_id, "a socket id");
  // Every state the first connection goes through from now on: it must stay connected.
  const changes = [];
  first.connection.bind("state_change", ({ current }) => changes.push(current));
  const orders = first.subscribe("private-orders");
  await next(orders, "pusher:subscription_succeeded", "the private subscription");
  ok("pusher-js connects over wss:// (the test CA trusted via NODE_EXTRA_CA_CERTS) and subscribes to a private channel signed by the pusher server SDK");

  let arrived = next(orders, "order.paid", "the event over wss://");
  await sdk.trigger("private-orders", "order.paid", { id: 1 });
  check((await arrived).id === 1, "the event's data");
  ok("the pusher server SDK triggers over https:// and pusher-js receives the event over wss://");

  check((await servedFingerprint()) === process.env.OLD_FINGERPRINT, "the first certificate is served");
  install(process.env.NEXT_KEY, process.env.TLS_KEY);
  install(process.env.NEXT_CERT, process.env.TLS_CERT);
  process.kill(Number(process.env.HERALD_PID), "SIGHUP");
  await until(
    async () => (await servedFingerprint()) === process.env.NEW_FINGERPRINT,
    "new handshakes to get the new certificate after SIGHUP",
  );
  ok("certificate swapped on disk and SIGHUP sent: new TLS handshakes get the new certificate");

  arrived = next(orders, "order.shipped", "an event on the connection opened before the reload");
  await sdk.trigger("private-orders", "order.shipped", { id: 2 });
  check((await arrived).id === 2, "the event's data");
  check(first.connection.state === "connected" && changes.length === 0, `the first connection changed state: ${changes}`);
  ok("the pusher-js connection opened before the reload stayed connected and keeps receiving events");

  const second = client(creds, sdk);
  await next(second.connection, "connected", "a new pusher-js client to connect after the reload");
  const again = second.subscribe("private-orders");
  await next(again, "pusher:subscription_succeeded", "the new client's subscription");
  const both = [next(orders, "order.closed", "the old client's event"), next(again, "order.closed", "the new client's event")];
  await sdk.trigger("private-orders", "order.closed", { id: 3 });
  for (const data of await Promise.all(both)) check(data.id === 3, "the event's data");
  ok("a new pusher-js client connects over wss:// with the new certificate, and both clients receive the next event");

  first.disconnect();
  second.disconnect();
}

main().then(
  () => process.exit(0),
  (e) => {
    console.error(`FAIL: ${e.stack || e}`);
    process.exit(1);
  },
);
